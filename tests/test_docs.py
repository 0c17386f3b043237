"""Citations of docs/design.md stay true: the file is in the repository and has what is cited."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DESIGN = REPO / "docs" / "design.md"
SEARCHED = ("hsmbridge", "native", "benchmarks", "tests", "docs", "scripts", "README.md")
SUFFIXES = {".py", ".pyi", ".c", ".h", ".md", ".sh", ".toml"}

#: "docs/design.md, fact 5" and "docs/design.md, "Performance method"" (a section).
CITATION = re.compile(
    r'(?P<path>[\w./-]*design\.md)(?:,?\s+(?:fact\s+(?P<fact>\d+)|"(?P<section>[^"]+)"))?'
)


def _sources() -> list[Path]:
    files: list[Path] = []
    for name in SEARCHED:
        path = REPO / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files += [
                p
                for p in path.rglob("*")
                if p.suffix in SUFFIXES and p.is_file() and "build" not in p.parts
            ]
    return [f for f in files if f not in (DESIGN, Path(__file__).resolve())]


def _citations() -> list[tuple[str, re.Match[str]]]:
    found = []
    for path in _sources():
        text = re.sub(r"\s*\n\s*(?:[*#]\s|//\s)?\s*", " ", path.read_text(errors="replace"))
        found += [(str(path.relative_to(REPO)), m) for m in CITATION.finditer(text)]
    return found


def test_every_citation_names_the_file_in_the_repository() -> None:
    wrong = [
        (where, m.group("path")) for where, m in _citations() if m.group("path") != "docs/design.md"
    ]
    assert wrong == []
    assert DESIGN.is_file()


def test_every_cited_fact_and_section_exists() -> None:
    design = DESIGN.read_text()
    facts = set(re.findall(r"^### (\d+)\. ", design, re.MULTILINE))
    sections = set(re.findall(r"^#+ (.+)$", design, re.MULTILINE))
    cited = _citations()
    assert cited, "no citation found: the search itself is broken"
    missing = [
        (where, m.group(0))
        for where, m in cited
        if (m.group("fact") and m.group("fact") not in facts)
        or (m.group("section") and m.group("section") not in sections)
    ]
    assert missing == []


def test_facts_are_numbered_in_order_without_gaps() -> None:
    numbers = [int(n) for n in re.findall(r"^### (\d+)\. ", DESIGN.read_text(), re.MULTILINE)]
    assert numbers == list(range(1, len(numbers) + 1))
