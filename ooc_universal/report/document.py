"""The report as a document: sections of paragraphs, tables, figures and code blocks.

Built by sections.py (from tables.py and figures.py), turned into text by render.py.
Nothing here reads or writes files.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Table:
    """A table as shown (text cells) plus the source numbers behind every cell."""
    id: str
    title: str
    columns: list
    rows: list                  # list of lists of str (what is displayed)
    source: str                 # file the numbers come from, relative to RUN
    rounding: str               # how the source numbers were rounded for display
    records: list = field(default_factory=list)   # source numbers, full precision
    note: str = ""


@dataclass
class Figure:
    """A drawn figure: its PNG bytes (written as `file` beside index.md) and what it plots."""
    id: str
    file: str                   # fig_<id>.png
    title: str
    caption: str
    source: str
    data: dict = field(default_factory=dict)      # the series plotted (report_data.json)
    png: bytes = field(default=b"", repr=False)


@dataclass
class Code:
    text: str


@dataclass
class Section:
    id: str
    title: str
    status: str = "ok"          # ok | not run | not available | unreadable
    blocks: list = field(default_factory=list)   # str (paragraph) | Table | Figure | Code
    message: str = ""           # the status line of a section that is not "ok"

    def set_status(self, status: str, message: str) -> "Section":
        """Mark the section as not shown; the message is also its only paragraph."""
        self.status, self.message = status, message
        self.blocks.append(message)
        return self


def collect(sections: list[Section], kind: type) -> dict:
    """Every block of `kind` (Table or Figure) in the sections, by id; ids are unique
    because report_data.json and the figure files are keyed by them."""
    found = {}
    for section in sections:
        for block in section.blocks:
            if isinstance(block, kind):
                if block.id in found:
                    raise ValueError(f"duplicate {kind.__name__.lower()} id {block.id}")
                found[block.id] = block
    return found
