"""Terminal output that never cuts a value: what fico prints can be pasted back.

Rich ends a cell that does not fit in ``…`` and, when stdout is not a terminal, lays tables
out for 80 columns. fico's tables fold long values onto the next line instead, and output
to a file or a pipe is as wide as its content (unless ``COLUMNS`` says otherwise).
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table as RichTable

#: the width of output that goes to a file or a pipe: no line is wrapped before this
UNLIMITED_WIDTH = 10_000


class Table(RichTable):
    """A rich ``Table`` whose columns fold a value that does not fit instead of cutting it."""

    def add_column(self, *args, overflow: str = "fold", **kwargs) -> None:
        super().add_column(*args, overflow=overflow, **kwargs)


def output_console(stderr: bool = False) -> Console:
    """A console for a command's output: the terminal's width on a terminal; as wide as the
    content for a file or a pipe (``COLUMNS`` still sets a width when given)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, width=UNLIMITED_WIDTH)
    return console
