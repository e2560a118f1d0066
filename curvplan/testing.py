"""Test helpers: golden plan texts that can be re-accepted in place.

`assert_plan_text` compares ``str(plan)`` with an expected text written as an indented triple-quoted literal
in the test file. Both sides are dedented, stripped, and stripped of trailing whitespace on every line:

>>> import curvplan as cp
>>> from curvplan.ir.toy import Toy
>>> from curvplan.testing import assert_plan_text
>>> plan = cp.compile_plan([Toy(name="sgd", reads=("grad",), makes=("update",))], name="sgd")
>>> assert_plan_text(plan, '''
...     plan sgd: 1 phase, period 1
...     phase 0 @every(1) [value_and_grad]
...       %grad, %loss = value_and_grad(params, batch)
...       %update      = toy:sgd(%grad)
...     state: step
... ''')

On a mismatch it raises `AssertionError` with a unified diff and the full actual text. Run the tests with
``CURVPLAN_ACCEPT=1`` to rewrite the expected literals in the calling test files instead of failing; then read
the new goldens before committing them (an accepted golden is only as right as the plan it copied).

Pure Python (no JAX).
"""

from __future__ import annotations

import ast
import difflib
import os
import sys
import textwrap
from typing import Any

__all__ = ["assert_plan_text", "normalize_text"]

ACCEPT_ENV = "CURVPLAN_ACCEPT"

# file -> [(original line after which the edit happened, number of lines added)]: the running test module was
# compiled from the original file, so later calls in it report original line numbers.
_shifts: dict[str, list[tuple[int, int]]] = {}


def normalize_text(text: str) -> str:
    """Dedents, strips the whole text and the end of every line."""
    lines = textwrap.dedent(str(text)).strip().splitlines()
    return "\n".join(line.rstrip() for line in lines)


def assert_plan_text(plan: Any, expected: str) -> None:
    """Asserts that ``str(plan)`` equals ``expected`` up to indentation and surrounding/trailing whitespace.

    Args:
        plan: a `Plan` (or anything whose ``str`` is the text to check).
        expected: the expected text, usually an indented triple-quoted literal passed positionally.

    Raises:
        AssertionError: with a unified diff and the full actual text (ready to paste), unless the environment
            variable ``CURVPLAN_ACCEPT=1`` is set: then the literal in the calling file is rewritten instead.
    """
    __tracebackhide__ = True  # pytest: show the caller's line, not this one
    actual = normalize_text(str(plan))
    want = normalize_text(expected)
    if actual == want:
        return
    if os.environ.get(ACCEPT_ENV) == "1":
        frame = sys._getframe(1)
        _rewrite_literal(frame.f_code.co_filename, frame.f_lineno, actual)
        return
    diff = "\n".join(
        difflib.unified_diff(want.splitlines(), actual.splitlines(), "expected", "actual", lineterm="")
    )
    raise AssertionError(
        f"plan text differs from the expected text:\n{diff}\n\n"
        f"actual text (paste it, or rerun with {ACCEPT_ENV}=1 to accept):\n{actual}"
    )


def _rewrite_literal(path: str, orig_line: int, actual: str) -> None:
    """Replaces the expected literal of the `assert_plan_text` call at ``orig_line`` of ``path``."""
    line = orig_line + sum(n for at, n in _shifts.get(path, ()) if at < orig_line)
    with open(path, encoding="utf-8") as f:
        source = f.read()
    node = _find_expected_literal(ast.parse(source, path), line)
    if node is None:
        raise AssertionError(
            f"{ACCEPT_ENV}=1: found no `assert_plan_text(plan, '''...''')` call with a string literal as "
            f"its expected text at {path}:{line}; update it by hand"
        )
    lines = source.splitlines(keepends=True)
    call_line = lines[node.lineno - 1]
    base = call_line[: len(call_line) - len(call_line.lstrip())]
    indent = _content_indent(node, base)
    body = actual.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
    new = '"""\n' + "".join(f"{indent}{x}\n" if x else "\n" for x in body.splitlines()) + base + '"""'
    # ast column offsets count UTF-8 bytes
    start = _offset(lines, node.lineno, node.col_offset)
    end = _offset(lines, node.end_lineno, node.end_col_offset)
    data = source.encode("utf-8")
    out = data[:start] + new.encode("utf-8") + data[end:]
    with open(path, "wb") as f:
        f.write(out)
    added = new.count("\n") - (node.end_lineno - node.lineno)
    _shifts.setdefault(path, []).append((orig_line, added))
    print(f"{ACCEPT_ENV}: rewrote the expected plan text at {path}:{node.lineno}", file=sys.stderr)


def _find_expected_literal(tree: ast.AST, line: int) -> ast.Constant | None:
    calls = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call):
            f = n.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name == "assert_plan_text":
                calls.append(n)
    around = [c for c in calls if c.lineno <= line <= (c.end_lineno or c.lineno)]
    after = sorted((c for c in calls if c.lineno >= line), key=lambda c: c.lineno)
    for call in sorted(around, key=lambda c: -c.lineno) + after[:1]:
        arg = call.args[1] if len(call.args) > 1 else next(
            (k.value for k in call.keywords if k.arg == "expected"), None
        )
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg
    return None


def _content_indent(node: ast.Constant, base: str) -> str:
    """The indentation of the literal's current content, or the call's indentation plus four spaces."""
    old = [x for x in node.value.splitlines()[1:] if x.strip()]
    if old:
        return min((x[: len(x) - len(x.lstrip())] for x in old), key=len)
    return base + "    "


def _offset(lines: list[str], lineno: int, col_bytes: int) -> int:
    return sum(len(x.encode("utf-8")) for x in lines[: lineno - 1]) + col_bytes
