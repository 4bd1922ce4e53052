"""The console scripts as a user meets them: real processes, their help, their exit codes, a closed pipe."""

import os
import subprocess
import sys

from conftest import write_digits_run
from nas.cli import EXIT_CLOSED_STDOUT, search_main


def run_with_closed_stdout(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    """`python -m nas ARGS` writing into a pipe whose reader is gone, as `| head -1` leaves it once head exits.

    The read end is closed before the process starts, so every write it makes meets a closed
    pipe: the outcome does not depend on who runs first.
    """
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([sys.executable, "-m", "nas", *args], stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=300, cwd=cwd)
    finally:
        os.close(write_end)


def test_search_table_into_a_closed_pipe_exits_quietly(tmp_path):
    space = {"stages": 1, "width": 8, "training": {"batch_size": 64}}
    write_digits_run(tmp_path, space, f"sqlite:///{tmp_path}/nas.db", {"name": "piped", "trials": 1}, {"folds": 2, "epochs": 1})
    assert search_main(["--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0

    proc = run_with_closed_stdout(["search", "--config", "run.yaml"], cwd=tmp_path)  # finished: prints the table

    assert proc.returncode == EXIT_CLOSED_STDOUT
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert proc.stderr == ""
