"""`nas-search --ray`: the same worker loop as `--workers`, started as Ray tasks on a cluster.

A worker is `nas-search` itself, run by a Ray task on whichever node Ray places it, against the
study's shared storage: budget, heartbeats, retries, the stop request, the worker record and the
study contract behave exactly as with `--workers` on one machine, because it is the same code.
Ray only places the workers and gives each its share of a node (`num_cpus`, `num_gpus`:
fractional GPUs put several workers on one GPU, with CUDA_VISIBLE_DEVICES set by Ray). Each
worker runs in the driver's working directory with the driver's interpreter path: the nodes are
expected to share the project's file system (or image), as a Slurm or Kubernetes job would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

from nas.errors import NasError, StudyError
from nas.study.storage import sqlite_path
from nas.training.signals import SIGNALS

INSTALL = "pip install 'bnnas[ray]'"


@dataclass
class WorkerResult:
    node: str
    exit_code: int
    last_line: str  # of its stderr (why it failed)


def import_ray():
    try:
        import ray
    except ImportError:
        raise NasError(f"--ray: Ray is not installed; install it with {INSTALL}") from None
    return ray


def die_with_parent() -> None:
    """In the worker's child process (Linux): SIGKILL it when the Ray worker that started it dies.

    When a node dies, Ray's worker processes on it die, but their children would live on,
    orphaned, holding their trials; killed with their parent they leave their trials to be
    reclaimed and retried, as a dead node's must be. (Defensive: in the node-kill test the
    orphan also dies without it, on its broken pipes, but only once it next writes.)
    """
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


RESTARTS = 2  # times a worker process killed by a signal (OOM killer, kill -9) is started again on its node


FORWARDED_ENV_PREFIX = "BNNAS_PROXY_"  # a grpc:// proxy's token and TLS paths (nas.study.storage_proxy)


def forwarded_env(environ: dict | None = None) -> dict:
    """What every worker needs from the driver's environment wherever its node's Ray was started:
    the storage proxy's credentials, so workers on other nodes authenticate as the driver does."""
    environ = os.environ if environ is None else environ
    return {
        name: value
        for name, value in environ.items()
        if name.startswith(FORWARDED_ENV_PREFIX) or name == "OPTUNA_STORAGE"  # a --storage the driver did not give
    }


def worker_task(ray, cpus: float, gpus: float):
    """`run_worker` as a Ray task with its reservation, carrying `forwarded_env()` to every node."""
    options = {"runtime_env": {"env_vars": forwarded}} if (forwarded := forwarded_env()) else {}
    return ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=RESTARTS, **options)(run_worker)


def run_worker(command: list[str], cwd: str, restarts: int = RESTARTS) -> WorkerResult:
    """Body of one Ray task: run the worker command on this node.

    Ctrl-C (ray.cancel) is passed on as SIGINT, so the worker marks its trial interrupted and the
    study stays resumable. A worker killed by a signal is started again (up to `restarts` times):
    on the same host the new one reclaims the killed one's trial at once and retries it. A node
    that dies takes the task and its worker with it (`die_with_parent`); Ray retries the task
    elsewhere, and the trial is reclaimed by its heartbeat (or at once, by a worker on its host).
    """
    import socket

    host = socket.gethostname()
    while True:
        try:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        except OSError as exc:  # the interpreter or the folder is not on this node
            return WorkerResult(host, 127, f"cannot start {command[0]} in {cwd}: {exc.strerror or exc}")
        try:
            _, err = process.communicate()
        except KeyboardInterrupt:
            process.send_signal(signal.SIGINT)
            _, err = process.communicate()
            restarts = 0
        lines = [line for line in (err or "").splitlines() if line.strip()]
        if process.returncode >= 0 or restarts <= 0:
            return WorkerResult(
                host, process.returncode, lines[-1] if lines else f"killed by signal {-process.returncode}"
            )
        restarts -= 1


def study_ready(storage, study_name: str) -> bool:
    """Whether the first worker has made the study and stored its run config (the others then only join it)."""
    from nas.study.schema import read_run_config

    try:
        return read_run_config(storage, storage.get_study_id_from_name(study_name)) is not None
    except KeyError:
        return False


def gpus_per_worker(requested: float | None, device: str, cluster_gpus: float) -> float:
    """The GPUs each worker reserves: by default one where the cluster has GPUs and the device is not the CPU.

    Ray hides every GPU from a task that reserves none (CUDA_VISIBLE_DEVICES=""), so 0 on a GPU
    cluster would train on the CPU (device auto) or fail (device cuda); and a reservation the
    cluster cannot meet would wait forever. Both are refused. One trial per GPU is the default
    until a GPU measurement (scripts/bench_workers.py --ray) shows that sharing one pays.
    """
    if requested is None:
        return 1.0 if cluster_gpus > 0 and device != "cpu" else 0.0
    if requested > 0 and cluster_gpus == 0:
        raise StudyError(
            f"--gpus-per-trial {requested:g}: the Ray cluster has no GPUs; leave it out (or 0) to train on CPUs"
        )
    if requested == 0 and device == "cuda":
        raise StudyError(
            "--gpus-per-trial 0 with device cuda: Ray hides the GPUs from a worker that reserves none; "
            "give --gpus-per-trial (1, or 0.25 for four trials per GPU)"
        )
    return requested


# What Ray says when its processes missed one of the fixed times it waits for them (30 s for the raylet): on a
# loaded machine a local Ray can miss them and start on the next try.
STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")
STARTS = 3


def start_ray(ray, address: str, log=print, **options) -> None:
    """`ray.init` at `address` (with `options`); a Ray of this run's own ("local") that timed out starting is started
    again, up to STARTS times in all (a cluster at an address is someone else's to start: its errors are raised at
    once)."""
    settings = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False, **options}
    for attempt in range(1, STARTS + 1):
        try:
            ray.init(address=address, **settings)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for a startup timeout
            ray.shutdown()
            if address != "local" or attempt == STARTS or not any(text in str(exc) for text in STARTUP_TIMEOUTS):
                raise
            log(f"Ray: the local Ray did not start in time (try {attempt} of {STARTS}); starting it again")


def run_on_ray(
    cfg,
    command: list[str],
    address: str | None,
    workers: int,
    gpus_per_trial: float | None,
    cpus_per_trial: float,
    log=print,
) -> list[WorkerResult]:
    """Start `workers` Ray tasks, each running `command` (a nas-search worker), and wait for them all.

    SQLite is a file on one machine: with nodes other than this one it is refused before any starts.
    The storage's tables are made here and the first worker makes (or checks) the study before the
    others start, as `--workers` does: workers racing to create one schema or study collide.
    """
    from nas.study.storage import open_for_search

    storage_url = cfg.study.storage
    ray = import_ray()
    # no address: a Ray of this run's own ("local"), or $RAY_ADDRESS; ray.init(address=None) would join whichever
    # cluster this machine started last
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    start_ray(ray, address, log)
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        if sqlite_path(storage_url) is not None and len(nodes) > 1:
            raise StudyError(
                f"--ray: the Ray cluster has {len(nodes)} nodes and the storage is SQLite ({storage_url}), a file on "
                "one machine; use PostgreSQL (or Optuna's gRPC storage proxy) for workers on several nodes"
            )
        gpus_per_trial = gpus_per_worker(gpus_per_trial, cfg.device, ray.cluster_resources().get("GPU", 0))
        storage = open_for_search(storage_url, cfg.study.heartbeat_seconds, cfg.study.retries)
        task = worker_task(ray, cpus_per_trial, gpus_per_trial)
        log(f"Ray: {workers} worker(s) on {len(nodes)} node(s), {cpus_per_trial:g} CPU and {gpus_per_trial:g} GPU each")
        with SIGNALS.installed():  # after ray.init, which installs a SIGTERM handler of its own
            results = wait_for_workers(ray, task, command, workers, storage, cfg.study.name, log)
    finally:
        ray.shutdown()
    failed = [r for r in results if r.exit_code != 0]
    if failed:
        first = failed[0]
        raise StudyError(
            f"--ray: {len(failed)} of {workers} workers failed; on node {first.node}: exit {first.exit_code}: "
            f"{first.last_line}"
        )
    return results


def wait_for_workers(ray, task, command: list[str], workers: int, storage, study_name: str, log) -> list:
    """Start the workers (the first alone, until it has made the study) and wait for them all.

    A signal is only recorded by its handler and acted on here, between waits of at most a second:
    a KeyboardInterrupt raised by the handler can be dropped (see nas.training.signals), and the
    workers would then run out the whole budget behind a driver that was asked to stop.
    """
    pending = [task.remote(command, os.getcwd())]
    while SIGNALS.pending is None and not study_ready(storage, study_name) and not ray.wait(pending, timeout=0.5)[0]:
        pass  # ray.wait is the pause: until the first worker has the study, or has ended
    if SIGNALS.pending is None:
        pending += [task.remote(command, os.getcwd()) for _ in range(workers - 1)]
    while SIGNALS.pending is None and not all_ended(ray, pending):
        pass
    if SIGNALS.pending is not None:
        stop_workers(ray, pending, storage, study_name, log)
    return ray.get(pending)


def all_ended(ray, pending: list) -> bool:
    """Wait up to a second for every task: a longer blocking wait would hold a signal until the workers ended."""
    return len(ray.wait(pending, num_returns=len(pending), timeout=1.0)[0]) == len(pending)


def stop_workers(ray, pending: list, storage, study_name: str, log) -> None:
    """On the signal pending in SIGNALS, stop the workers and raise it (KeyboardInterrupt, or Terminated).

    Ctrl-C asks every worker to stop after its current trial (the stored stop request, as the
    dashboard's Stop) and waits for them; a second Ctrl-C, or SIGTERM, interrupts them now (SIGINT:
    their trials are marked interrupted, the study stays resumable)."""
    from nas.study.schema import request_stop

    signum, SIGNALS.pending = SIGNALS.pending, None
    if signum == signal.SIGINT:
        request_stop(storage, study_name)
        log(
            "Stopping: every worker finishes its current trial (Ctrl-C again to interrupt them now); "
            "the same command resumes"
        )
        while SIGNALS.pending is None and not all_ended(ray, pending):
            pass
    if signum != signal.SIGINT or SIGNALS.pending is not None:
        SIGNALS.pending = None  # acted on here
        for ref in pending:
            ray.cancel(ref)  # KeyboardInterrupt in each task: its worker gets SIGINT
        ray.wait(pending, num_returns=len(pending), timeout=120)
    raise SIGNALS.exception(signum)
