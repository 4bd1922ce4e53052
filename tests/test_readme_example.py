"""The README's "What a search looks like" shows what nas-search prints, line for line in shape.

The example comes from a full default run; this test runs a short one (3 trials, 1 epoch) of the
same config and compares the two with the numbers taken out: the same lines in the same order,
the same words, the same table columns.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TRIAL_LINE = re.compile(r"trial \d+ (complete|pruned|failed)")
NUMBER = re.compile(r"\d(?:[\d,]*\d)?(?:\.\d+)?")


def readme_example() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## What a search looks like", 1)[1].split("```", 2)[1]
    lines = block.strip("\n").splitlines()
    assert lines[0].startswith("$ nas-search --config configs/digits.yaml")
    return lines[1:]


def shape(line: str) -> str:
    """A printed line without its numbers; improvements and table cells reduced to their form."""
    line = NUMBER.sub("#", line)
    line = re.sub(r"# \(trial #, #:#\)( -> # \(trial #, #:#\))*", "…", line)  # the improvements
    cells = re.split(r"\s{2,}", line.strip())
    if cells[0] == "#":  # a table row: its trial number, then as many cells as the header
        return f"row of {len(cells)} cells"
    if set(line.replace(" ", "")) == {"-"}:
        return f"rule of {len(cells)} cells"
    return "  ".join(cells)


@pytest.mark.slow
def test_the_readme_example_has_the_lines_nas_search_prints(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nas",
            "search",
            "--config",
            str(ROOT / "configs/digits.yaml"),
            "--trials",
            "3",
            "--epochs",
            "1",
            "--no-progress",
        ],  # the config's storage, under tmp_path
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    status = [line for line in proc.stderr.splitlines() if not TRIAL_LINE.match(line)]  # a terminal shows bars instead
    printed = [shape(line) for line in [*status, *proc.stdout.splitlines()] if line.strip()]
    shown = [shape(line) for line in readme_example()]
    rows_printed = [s for s in printed if s.startswith("row of")]
    rows_shown = [s for s in shown if s.startswith("row of")]
    assert rows_printed and set(rows_printed) == set(rows_shown) == {rows_printed[0]}
    assert [s for s in printed if not s.startswith("row of")] == [s for s in shown if not s.startswith("row of")]
