"""The console scripts as a user meets them: real processes, their help, their exit codes, a closed pipe."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import optuna
import pytest
from conftest import write_digits_run

from nas.cli import COMMANDS as ALL_COMMANDS
from nas.cli import EXIT_CLOSED_STDOUT, EXIT_CODES, SUMMARIES, search_main
from nas.data.datasets import LOADERS
from nas.search.config import FOLD_MODES
from nas.search.pruners import PRUNER_NAMES
from nas.search.samplers import SAMPLER_NAMES

COMMANDS = ("search", "report", "export", "bench", "finetune", "slim", "dashboard")
REPO = Path(__file__).resolve().parents[1]
TINY = ["--trials", "1", "--epochs", "1", "--folds", "2", "--no-progress"]


def run_with_closed_stdout(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    """`python -m nas ARGS` writing into a pipe whose reader is gone, as `| head -1` leaves it once head exits.

    The read end is closed before the process starts, so every write it makes meets a closed
    pipe: the outcome does not depend on who runs first.
    """
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run(
            [sys.executable, "-m", "nas", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
            cwd=cwd,
        )
    finally:
        os.close(write_end)


@pytest.mark.slow
def test_search_table_into_a_closed_pipe_exits_quietly(tmp_path):
    space = {"stages": 1, "width": 8, "training": {"batch_size": 64}}
    write_digits_run(
        tmp_path, space, f"sqlite:///{tmp_path}/nas.db", {"name": "piped", "trials": 1}, {"folds": 2, "epochs": 1}
    )
    assert search_main(["--config", str(tmp_path / "run.yaml"), "--no-progress"]) == 0

    proc = run_with_closed_stdout(["search", "--config", "run.yaml"], cwd=tmp_path)  # finished: prints the table

    assert proc.returncode == EXIT_CLOSED_STDOUT
    assert "Traceback" not in proc.stderr and "BrokenPipeError" not in proc.stderr
    assert (
        proc.stderr
        == "Study 'piped' already has 1 finished trials (budget 1): nothing to run. Raise --trials to search more.\n"
    )


@pytest.mark.parametrize("args", [["--help"], ["report", "--help"]])
def test_help_into_a_closed_pipe_exits_quietly(args):
    proc = run_with_closed_stdout(args)

    assert proc.returncode == EXIT_CLOSED_STDOUT
    assert proc.stderr == ""


def python_m_nas(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nas", *args], capture_output=True, text=True, timeout=300)


def test_python_m_nas_help_lists_every_command_with_one_line_and_the_exit_codes():
    proc = python_m_nas("--help")

    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("  ") and line.split()[0] in ALL_COMMANDS]
    assert [row.split()[0] for row in rows] == list(ALL_COMMANDS)
    columns = {row.index(SUMMARIES[row.split()[0]]) for row in rows}
    assert len(columns) == 1  # every summary starts in the same column, storage-proxy's too
    assert EXIT_CODES in proc.stdout


def test_python_m_nas_version_prints_the_version_and_exits_0():
    import nas

    proc = python_m_nas("--version")

    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"bnnas {nas.__version__}\n", "")


@pytest.mark.parametrize("args, words", [((), "give a command"), (("serach",), "unknown command 'serach'")])
def test_python_m_nas_without_a_known_command_is_one_line_and_exit_2(args, words):
    proc = python_m_nas(*args)

    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and words in proc.stderr and ", ".join(COMMANDS) in proc.stderr
    assert proc.stdout == ""


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_runs_through_python_m_nas_and_its_help_states_the_exit_codes(command):
    proc = python_m_nas(command, "--help")

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m nas {command} ")  # the name it was called by
    assert SUMMARIES[command] in " ".join(proc.stdout.split())  # the description is wrapped
    assert EXIT_CODES in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_a_console_scripts_help_names_the_script(command):
    proc = subprocess.run(
        [str(Path(sys.executable).with_name(f"nas-{command}")), "--help"], capture_output=True, text=True, timeout=60
    )

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: nas-{command} ")


def test_every_parser_and_the_python_m_nas_parser_build_without_importing_torch():
    """--help and --version answer in a fraction of a second: a parser that loaded torch took 2-5 s."""
    code = (
        "import sys\n"
        "from nas.cli import PARSERS, main_parser\n"
        "for build in (*PARSERS.values(), main_parser):\n"
        "    build().format_help()\n"
        "print(sorted(m for m in ('torch', 'torchvision', 'timm', 'sklearn', 'optuna') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.slow
def test_search_help_names_the_datasets_samplers_pruners_and_fold_modes():
    proc = python_m_nas("search", "--help")

    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for label, names in [
        ("datasets (dataset.name)", LOADERS),
        ("samplers (--sampler, study.sampler)", SAMPLER_NAMES),
        ("pruners (evaluation.pruner)", PRUNER_NAMES),
        ("fold modes (evaluation.fold_mode)", FOLD_MODES),
    ]:
        assert any(line.startswith(f"  {label} ") and line.endswith(f" {', '.join(names)}") for line in lines), label


def run_the_default(cwd: Path, env: dict | None = None, *extra: str) -> tuple[subprocess.CompletedProcess, str]:
    """`python -m nas search` with no --config, a tiny budget and a storage in `cwd`."""
    storage = f"sqlite:///{cwd}/x.db"
    proc = subprocess.run(
        [sys.executable, "-m", "nas", "search", *TINY, "--storage", storage, *extra],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )
    return proc, storage


def assert_ran_the_default(proc: subprocess.CompletedProcess, storage: str) -> None:
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == (
        "No --config given: running the embedded default (configs/digits.yaml: digits, "
        f"--trials 1 --folds 2 --epochs 1, study 'digits-bn' in {storage})"
    )
    trials = optuna.load_study(study_name="digits-bn", storage=storage).get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE]
    assert {"block.activation", "block.norm.type", "training.lr"} <= set(
        trials[0].params
    )  # sampled from bn_placement.yaml


@pytest.mark.slow
def test_search_without_a_config_runs_the_embedded_default_and_says_so_first(tmp_path):
    proc, storage = run_the_default(tmp_path)

    assert_ran_the_default(proc, storage)
    assert [p.name for p in tmp_path.iterdir()] == ["x.db"]  # the shortcut flags applied: no runs/nas.db


@pytest.mark.slow
@pytest.mark.parametrize("loudness", ["", "-q", "-v"])
def test_stdout_holds_the_results_and_stderr_the_status_as_loud_as_asked(tmp_path, loudness):
    proc, _ = run_the_default(tmp_path, None, *([loudness] if loudness else []))

    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "Top 1 of 1 finished trials in 'digits-bn' (lower cv loss is better):"  # what | head -1 reads
    assert out[-1].startswith("Best CV loss over this run") and len(out) == 5  # the table (header, rule, row), best
    err = proc.stderr.splitlines()
    if loudness == "-q":
        assert err == []
    else:
        assert err[0].startswith("No --config given") and any(line.startswith("trial 0 complete (1/1)") for line in err)
        optunas = [line for line in err if line.startswith("[I ")]  # Optuna's own log format
        assert bool(optunas) == (loudness == "-v") and (not optunas or "Trial 0 finished" in " ".join(optunas))


@pytest.mark.slow
def test_an_installed_wheel_carries_its_license_and_runs_the_embedded_default(tmp_path):
    pytest.importorskip("setuptools")  # the wheel is built offline, in this environment
    source = tmp_path / "source"
    shutil.copytree(REPO / "nas", source / "nas", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(tmp_path / "wheel"),
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    site, cwd = tmp_path / "site", tmp_path / "cwd"
    wheel = zipfile.ZipFile(next((tmp_path / "wheel").glob("bnnas-*.whl")))
    metadata = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in metadata.splitlines() and "Requires-Python: >=3.11" in metadata.splitlines()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())  # the license ships (PEP 639)
    wheel.extractall(site)  # what pip install puts in site-packages
    cwd.mkdir()

    env = {**os.environ, "PYTHONPATH": str(site)}
    imported = subprocess.run(
        [sys.executable, "-c", "import nas; print(nas.__file__)"], capture_output=True, text=True, env=env, cwd=cwd
    )
    assert Path(imported.stdout.strip()).is_relative_to(site)  # not the source tree

    proc, storage = run_the_default(cwd, env)

    assert_ran_the_default(proc, storage)
