"""The docs read back: sections and tables of the Markdown files in docs/, for the tests that
keep the docs true (tests/test_docs_sync.py, tests/test_init.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator


def markdown_section(text: str, heading: str) -> str:
    """The body under ``heading`` (a whole heading line) up to the next heading of the
    same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    start = lines.index(heading) + 1
    end = next((i for i in range(start, len(lines))
                if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def table_rows(text: str) -> Iterator[tuple[list[str], list[str]]]:
    """(header cells, row cells) of every Markdown table row in ``text``."""
    header: list[str] | None = None
    for line in text.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if header is None:
            header = cells
        elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
            yield header, cells


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)
