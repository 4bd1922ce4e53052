"""Recompute the statistics of stored nas-compare results from their per-seed scores, without training.

    python scripts/restat_compare.py experiments/compare_*/

Each FOLDER's compare.json is read, its cells re-ranked by the current test (nas.compare.stats),
and compare.md, compare.json and compare.png rewritten under the command stored in compare.json.
"""

import json
import sys
from pathlib import Path

from nas.compare import restat, write


def main(folders: list[str]) -> int:
    if not folders:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for folder in map(Path, folders):
        stored = json.loads((folder / "compare.json").read_text())
        command = stored.pop("command")
        for path in write(restat(stored), folder, command):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
