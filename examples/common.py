"""Small helpers the examples share: the bundled data, minibatches, and progress output."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from collections.abc import Iterable, Iterator

import numpy as np

from curvplan.examples.digits import load_digits  # noqa: F401  (re-exported: 1500 / 297 digits, offline)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHAKESPEARE = ROOT / "benchmarks" / "data" / "shakespeare_plays.txt"


def parser(doc: str, steps: int, batch_size: int) -> argparse.ArgumentParser:
    """The command line every example starts from (``--steps``, ``--batch-size``); examples add their own."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch-size", type=int, default=batch_size)
    return ap


def minibatches(x: np.ndarray, y: np.ndarray, batch_size: int, steps: int, seed: int = 0) -> Iterator:
    """``steps`` random minibatches ``(x, y)`` drawn without replacement within each batch."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.choice(len(x), batch_size, replace=False)
        yield x[idx], y[idx]


def progress(items: Iterable, total: int, desc: str, every: int = 0) -> Iterator:
    """``items`` with a progress bar: tqdm when it is installed (``pip install curvplan[progress]``), else a
    line every ``every`` items (``every=0``: about ten lines per run)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        every = every or max(total // 10, 1)
        t0 = time.perf_counter()
        for i, x in enumerate(items):
            yield x
            if (i + 1) % every == 0 or i + 1 == total:
                print(f"  [{desc}] {i + 1}/{total}  {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        return
    yield from tqdm(items, total=total, desc=desc, leave=False, mininterval=1.0)
