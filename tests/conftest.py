"""Shared test helpers: a digits run folder with a tiny search space and budget; the cuda marker."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from postgres_server import postgres_server

# A tiny space with two searched parameters (norm type, learning rate): what most end-to-end runs search.
NORM_AND_LR_SPACE = {
    "stages": 1,
    "width": 8,
    "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
    "training": {"lr": {"float": [0.01, 0.1], "log": True}},
}


def write_digits_run(folder: Path, space: dict, storage: str, study: dict, evaluation: dict) -> Path:
    """Write `space.yaml` and `run.yaml` (digits on the CPU) into `folder`; returns the config path."""
    (folder / "space.yaml").write_text(yaml.safe_dump(space))
    config = {
        "dataset": {"name": "digits"},
        "search_space": "space.yaml",
        "study": {"storage": storage, "seed": 0, **study},
        "evaluation": evaluation,
        "device": "cpu",
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder / "run.yaml"


def spec_with(
    norm_type: str, position: str, activation: str = "relu", block_type: str = "plain", share: str = "global", **space
) -> dict:
    norm = {
        "type": norm_type,
        "position": position if block_type == "plain" else "post_conv",
        "share": share,
        "groups": 4,
    }
    block = {"type": block_type, "activation": activation, "norm": norm}
    if block_type == "residual":
        block["residual"] = {"order": position, "zero_init": True}
    """A generated-family ArchSpec: 2 stages x 2 blocks of width 4 with the given norm, position and block type."""
    from nas.search.space import default_spec

    return default_spec({"stages": 2, "blocks_per_stage": 2, "width": 4, "block": block, **space})


_OWN_FOLDERS: list[str] = []


def pytest_configure(config):
    """The tests' image-folder caches and nas-search's per-host records go to folders of their own
    (their subprocesses inherit them), not to the user's ~/.cache/bnnas and ~/.local/state/bnnas.
    Ray's local clusters start without token authentication whatever ~/.ray holds: with a token there
    (which any earlier local cluster may have written), Ray adds a warning line to a command's stderr."""
    for variable, prefix in (("BNNAS_CACHE", "bnnas-test-cache-"), ("XDG_STATE_HOME", "bnnas-test-state-")):
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        _OWN_FOLDERS.append(os.environ[variable])
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:  # torch's threads per worker (and per subprocess) share the cores instead of each taking all
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ.setdefault("OMP_NUM_THREADS", threads)
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_unconfigure(config):
    """The folders pytest_configure made go when the run ends: a CI machine's /tmp must not fill over runs."""
    for folder in _OWN_FOLDERS:
        shutil.rmtree(folder, ignore_errors=True)


# --- tests that need CUDA ------------------------------------------------------------------------
# `@pytest.mark.cuda` tests run on CUDA_TEST_DEVICE (default "cuda") and are skipped where it is
# not there. BNNAS_CUDA_TEST_DEVICE=cpu runs their code paths on the CPU, to prepare them there.
CUDA_TEST_DEVICE = os.environ.get("BNNAS_CUDA_TEST_DEVICE", "cuda")


# Module fixtures that run a real search and export (or a real CLI run on a missing dataset) before their
# first test: every test that uses one is `slow`, so the fast subset never pays for them.
SLOW_FIXTURES = {"study_dir", "exported", "missing_cifar_cli_run", "slim_source"}


# Under pytest-xdist (`-n auto`, with `--dist loadgroup` from pyproject) each file runs whole, in its own
# order, on one worker: module fixtures are built once and a test may build on the one before it. The
# files on the session's PostgreSQL server share one worker, so only one installs and starts it.
POSTGRES_GROUP = "postgresql"


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the group marks into node ids
def pytest_collection_modifyitems(config, items):
    import torch

    on_postgres = {item.path for item in items if "postgres" in getattr(item, "fixturenames", ())}
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(POSTGRES_GROUP if item.path in on_postgres else item.path.name))
    if CUDA_TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device (scripts/gpu_check.sh runs these on one)")
        for item in items:
            if "cuda" in item.keywords:
                item.add_marker(skip)


# --- servers shared by the tests -----------------------------------------------------------------
postgres = pytest.fixture(scope="session")(postgres_server)


@pytest.fixture(scope="module")
def pg_server(postgres) -> str:
    """The URL of an empty PostgreSQL database of its own for each test module, on the session's server."""
    return postgres()


# What Ray raises when its fixed startup waits run out: a raylet that did not register in 30 s, a GCS server that
# did not write its port file in time.
STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


@pytest.fixture
def cluster():
    """Ray's test cluster: a head and a second node on this machine, one CPU each (one worker per node)."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    for attempt in range(3):  # Ray waits fixed times for its processes to start: a loaded 2-core machine can miss them
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=1)
            cluster.add_node(num_cpus=1)
            break
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
            cluster.shutdown()
            if not any(slow in str(exc) for slow in STARTUP_TIMEOUTS) or attempt == 2:
                raise
    yield cluster
    cluster.shutdown()
