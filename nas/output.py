"""What bnnas writes for people and for other processes: status lines, tables, and files that appear whole.

Status and progress go through the `nas` logger (`status`), which the console scripts send to stderr (`-q` hides
it, `-v` adds Optuna's own log); results (tables, predictions) are printed to stdout, so `nas-search | head -1`
reads the results. Used as a library, bnnas says nothing until the caller configures logging.
Every command's plain-text table (nas-search, nas-compare, nas-bench) and markdown table
(nas-report, nas-compare) comes from here, and every file a reader may open while it is being
written (exports, reports, worker records) goes through `atomic_write`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

LOG = logging.getLogger("nas")


def status(message: str) -> None:
    """A status or progress line (stderr under the console scripts)."""
    LOG.info(message)


def notice(message: str) -> None:
    """A line worth reading even with -q: something changed that the user should check."""
    LOG.warning(message)


def text_table(rows: list[tuple | list]) -> list[str]:
    """Rows of strings (the first the header) as padded columns with a dashed line under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A GitHub-flavoured markdown table; a `|` inside a cell is escaped."""

    def cell(text) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def atomic_write(path: Path | str, write: Callable[[str], object], mode: int | None = None) -> None:
    """Write through `write(tmp_path)` to a temporary name in the same folder, then rename over `path`:
    a reader sees the old file or the new one, never half of one. The file gets `mode`, by default
    what the umask allows (mkstemp's 0600 would keep an export from whoever deploys it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(  # the real suffix last: torch.export warns about a .pt2 not ending in .pt2
        prefix=f".{path.stem}.", suffix=".tmp" + path.suffix, dir=path.parent
    )
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: Path | str, text: str, mode: int | None = None) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), mode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
