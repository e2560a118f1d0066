"""A griffe extension for the API pages: doctest blocks outside an ``Examples:`` section become code blocks.

curvplan's docstrings keep short runnable examples (``>>>`` lines, checked by ``pytest --doctest-modules``)
next to the prose they illustrate; Markdown would render them as paragraphs."""

from __future__ import annotations

import griffe

_SECTIONS = ("Examples:", "Example:")


def fence_doctests(text: str) -> str:
    lines, out, i, in_examples = text.splitlines(), [], 0, False
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped in _SECTIONS:
            in_examples = True
        elif stripped and not line.startswith((" ", "\t")) and stripped.endswith(":"):
            in_examples = False
        if stripped.startswith(">>>") and not in_examples:
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{indent}```")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
