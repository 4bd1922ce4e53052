"""The cluster recipes under deploy/, run as far as one machine allows: the Slurm array job's script
as two array tasks on one PostgreSQL study (no Slurm here), and the Kubernetes Job's container
command as its `parallelism` pods would run it (no cluster here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.study.schema import counts_toward_budget

pytestmark = pytest.mark.system  # starts a PostgreSQL server

ROOT = Path(__file__).resolve().parent.parent
SPACE = {"stages": 1, "width": 8, "training": {"lr": {"float": [0.01, 0.1], "log": True}}}


def run_together(commands: list[list[str]], cwd: Path, envs: list[dict]) -> list[tuple[int, str]]:
    procs = [
        subprocess.Popen(c, cwd=cwd, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c, e in zip(commands, envs)
    ]
    try:
        return [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def assert_exactly_the_budget(url: str, study: str, trials: int) -> None:
    ended = optuna.load_study(study_name=study, storage=url).get_trials()
    assert sum(t.state == TrialState.COMPLETE and counts_toward_budget(t) for t in ended) == trials
    assert not [t for t in ended if t.state == TrialState.RUNNING]


def test_the_slurm_array_job_runs_one_worker_per_task_on_one_postgresql_study(pg_server, tmp_path):
    write_digits_run(
        tmp_path,
        SPACE,
        "sqlite:///unused.db",
        {"name": "slurm", "sampler": "random", "trials": 4},
        {"folds": 2, "epochs": 2},
    )
    env = {
        **os.environ,
        "NAS_STORAGE": pg_server,
        "NAS_CONFIG": "run.yaml",
        "NAS_PYTHON": sys.executable,
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "SLURM_CPUS_PER_TASK": "1",
    }
    script = str(ROOT / "deploy" / "slurm" / "nas-search.sbatch")
    results = run_together([["bash", script]] * 2, ROOT, [{**env, "SLURM_ARRAY_TASK_ID": str(i)} for i in range(2)])
    assert [code for code, _ in results] == [0, 0], results
    assert_exactly_the_budget(pg_server, "slurm", 4)
    assert not (tmp_path / "unused.db").exists()  # --storage from NAS_STORAGE, not the config's


def test_the_slurm_script_without_a_storage_says_what_to_set():
    proc = subprocess.run(
        ["bash", str(ROOT / "deploy" / "slurm" / "nas-search.sbatch")],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "NAS_STORAGE"},
    )
    assert proc.returncode != 0 and "set NAS_STORAGE" in proc.stderr


def test_the_kubernetes_job_runs_parallelism_workers_that_each_end_when_the_budget_is_reached(tmp_path):
    job = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "nas-search-job.yaml").read_text())
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (job["kind"], spec["parallelism"], pod["restartPolicy"]) == ("Job", spec["completions"], "OnFailure")
    container = pod["containers"][0]
    command = container["command"]
    assert command[:3] == ["python", "-m", "nas.cli"] and "$(NAS_STORAGE)" in command
    assert {e["name"] for e in container["env"]} >= {"NAS_STORAGE"}

    url = f"sqlite:///{tmp_path}/nas.db"  # the pods of this test share one machine
    config = write_digits_run(
        tmp_path, SPACE, url, {"name": "k8s", "sampler": "random", "trials": 4}, {"folds": 2, "epochs": 2}
    )
    as_kubernetes_runs = [
        sys.executable
        if a == "python"
        else str(config)
        if a == "configs/cifar.yaml"
        else a.replace("$(NAS_STORAGE)", url)
        for a in command
    ]  # the kubelet expands $(VAR) from env; the image's python is this one
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    results = run_together([as_kubernetes_runs] * 2, tmp_path, [env] * 2)  # 2 of the Job's pods on this 2-core machine
    assert [code for code, _ in results] == [0, 0], results  # exit 0: the pod counts as one of the Job's completions
    assert_exactly_the_budget(url, "k8s", 4)
