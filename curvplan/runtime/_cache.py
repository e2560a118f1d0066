"""JAX's persistent compilation cache, switched on in one call: the second run of a script loads its phase
programs from disk instead of compiling them again."""

from __future__ import annotations

import os
import pathlib

import jax

ENV = "CURVPLAN_COMPILATION_CACHE"
"""Where the cache lives when no path is given; set it to ``off`` to leave JAX's setting alone."""


def enable_compilation_cache(path: str | os.PathLike | None = None, min_compile_time_s: float = 0.5) -> str | None:
    """Point JAX's persistent compilation cache at ``path`` and return the directory (None when turned off).

    Without ``path`` the directory is ``$CURVPLAN_COMPILATION_CACHE``, else ``~/.cache/curvplan/jax``; the
    variable set to ``off`` turns this into a no-op, and a cache directory the user already configured for JAX
    is kept. Programs that compile faster than ``min_compile_time_s`` are not written. Call it before the first
    compile: JAX reads the setting when it first compiles.

    >>> import tempfile, curvplan as cp
    >>> cp.enable_compilation_cache(tempfile.mkdtemp()) is not None
    True
    """
    env = os.environ.get(ENV)
    if path is None and env == "off":
        return None
    configured = getattr(jax.config, "jax_compilation_cache_dir", None)
    if path is None and configured:
        return configured
    where = pathlib.Path(path or env or pathlib.Path.home() / ".cache" / "curvplan" / "jax").expanduser()
    where.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    return str(where)
