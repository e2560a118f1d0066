"""Section references in the code resolve to the documentation pages.

Code, tests, benchmarks, examples and the README cite the docs as ``docs/<page>.md §N`` or ``§N.M`` (several
numbers may follow one page: ``§2.1-2.5, §3``, ``§2.2/§2.3``). Each cited page must exist and have a heading
that starts with the number (``## 7. ...`` or ``## 7 ...`` for ``§7``, ``### 6.1 ...`` for ``§6.1``); a range
``§2.1-2.5`` needs every section from 2.1 to 2.5. The second test checks that no file still cites the two
design documents that lived outside the repository (their sections now live in docs/math.md and
docs/architecture.md under the same numbers).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED_DIRS = ("curvplan", "tests", "benchmarks", "examples")
THIS = Path(__file__).resolve()

_NUM = r"\d+(?:\.\d+)?"
_ONE = rf"§{_NUM}(?:\s*[-–]\s*{_NUM})?"
REF = re.compile(rf"(?:docs/([\w\-/]+\.md)|\b(DESIGN|ALGORITHMS)\.md)((?:\s*[,/]?\s*{_ONE})+)")
# Until the citations are rewritten, the old names are checked against the pages that took their sections.
OLD_PAGE = {"DESIGN": "architecture.md", "ALGORITHMS": "math.md"}
SECTION = re.compile(rf"§({_NUM})(?:\s*[-–]\s*({_NUM}))?")
HEADING = re.compile(r"^#{1,6}\s+(\d+(?:\.\d+)*)(?:[.\s]|$)")
# Spelled as a pattern (not the literal file names) so a textual rewrite of the old names leaves it intact.
OLD_DOCS = re.compile(r"\b(?:DESIGN|ALGORITHMS)\.md\b")


def scanned_files() -> list[Path]:
    files = [ROOT / "README.md"]
    for d in SCANNED_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py") if ".venv" not in p.parts)
    return [p for p in files if p.is_file()]


def headings(page: Path) -> set[str]:
    """The section numbers a page defines (``"7"``, ``"6.1"``), outside fenced code blocks."""
    out, fenced = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            out.add(m.group(1))
    return out


def expand(lo: str, hi: str | None) -> list[str]:
    """The section numbers a citation needs: ``2.1``-``2.5`` is 2.1, 2.2, ..., 2.5; a plain number is itself."""
    if hi is None:
        return [lo]
    a, b = lo.split("."), hi.split(".")
    if len(a) == len(b) == 2 and a[0] == b[0] and int(a[1]) <= int(b[1]):
        return [f"{a[0]}.{i}" for i in range(int(a[1]), int(b[1]) + 1)]
    if len(a) == len(b) == 1 and int(a[0]) <= int(b[0]):
        return [str(i) for i in range(int(a[0]), int(b[0]) + 1)]
    return [lo, hi]


def references() -> list[tuple[str, int, str, str]]:
    """``(file, line, page, section)`` for every section a file cites."""
    out = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8")
        for m in REF.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            page = m.group(1) or OLD_PAGE[m.group(2)]
            for s in SECTION.finditer(m.group(3)):
                for num in expand(s.group(1), s.group(2)):
                    out.append((str(path.relative_to(ROOT)), line, page, num))
    return out


def test_every_cited_section_exists():
    cache: dict[str, set[str] | None] = {}
    bad = []
    for file, line, page, num in references():
        if page not in cache:
            p = ROOT / "docs" / page
            cache[page] = headings(p) if p.is_file() else None
        have = cache[page]
        if have is None:
            bad.append(f"{file}:{line}: docs/{page} does not exist")
        elif num not in have:
            bad.append(f"{file}:{line}: docs/{page} has no heading numbered {num} (cited as §{num})")
    assert not bad, "unresolved documentation references:\n" + "\n".join(bad)


def test_the_pages_define_the_sections_the_code_relies_on():
    # the numbering is a contract: the code cites these, and the architecture page mirrors the design's nine
    arch = headings(ROOT / "docs" / "architecture.md")
    assert {str(i) for i in range(1, 10)} <= arch
    math = headings(ROOT / "docs" / "math.md")
    wanted = {str(i) for i in range(10)}
    wanted |= {f"2.{i}" for i in range(1, 8)} | {f"3.{i}" for i in range(1, 6)}
    wanted |= {f"6.{i}" for i in range(1, 5)} | {f"7.{i}" for i in range(1, 7)} | {f"8.{i}" for i in range(1, 10)}
    assert wanted <= math, sorted(wanted - math)


def test_no_file_cites_the_old_design_documents():
    bad = []
    for path in scanned_files():
        if path.resolve() == THIS:
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if OLD_DOCS.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:100]}")
    assert not bad, (
        "cite docs/math.md (the methods) or docs/architecture.md (the design) instead, same § numbers:\n"
        + "\n".join(bad)
    )
