"""`run_search`: one process's run of a study to its budget, with progress bars, extra workers and a summary.

`--trials N` is the study's total budget of finished (complete + pruned) trials that trained a
new candidate, so the same command rerun after an interruption runs only the remainder. The run
config (with its search space inline) is stored on the study, so a study can be resumed without
its YAML; it is also the study's contract (`nas.study.opening`). Every process seeds its sampler
from the study seed and what the study already holds, so no process replays another's draws
(`nas.search.samplers.process_seed`), and a proposal that repeats a tried candidate costs no
training and is kept from the sampler (`nas.study.duplicates`).

The steps, in order: open the storage (a new SQLite file only once the data has loaded), record
this process as a worker of the study, load the data, check the contract, reclaim the trials of
dead workers, store the config, then search with a sampler seeded for this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

import optuna

from nas.errors import StudyError, Terminated, TrialError
from nas.output import notice, status
from nas.search.config import RunConfig, blamed
from nas.search.finetune_space import checkpoint_input, epochs_said, load_search_data
from nas.search.samplers import process_seed
from nas.study.best_so_far import anytime_line, clock, improvements
from nas.study.contract import changed_on_this_host, show
from nas.study.duplicates import Novelty
from nas.study.objective import make_objective
from nas.study.opening import check_contract, create_or_load, existing_study_id, load_for_search, store_config
from nas.study.schema import CUT_ATTR, FAIL_REASON_ATTR, FINISHED, OVER_BUDGET, is_failure
from nas.study.stopping import BudgetReached, StopAfterFailures, StopOnRequest, StopOnStagnation, finished_trials
from nas.study.storage import open_for_search, quiet_optuna, storage_file
from nas.study.tables import best_value, summary_table
from nas.study.time_budget import NO_CAP, TimeBudget, trial_cap
from nas.study.warm_start import queue_warm_start, warm_start_source
from nas.study.workers import WorkerRecord, live_workers, reclaim_dead_trials
from nas.training.signals import SIGNALS

OnTrial = Callable[[int, int, "float | None"], None]  # (finished, budget, best CV loss) after each trial


def run_search(
    cfg: RunConfig,
    *,
    progress: bool | None = None,
    out: Callable[[str], None] = status,
    results: Callable[[str], None] = print,
    force: bool = False,
    worker_command: list[str] | None = None,
    workers: int = 1,
    started: float | None = None,
    on_trial: OnTrial | None = None,
) -> optuna.Study:
    """Run the study to its budget of finished trials; says what it does (`out`: status lines) and prints the
    best-so-far line and the top candidates (`results`).

    This process is recorded as a worker of the study from the moment the study exists (while it
    loads data, too). With `workers` > 1 it is the first worker and starts `worker_command` as
    the others, once the study exists; they share it through the storage. `started`: when the
    run was launched (the dashboard's Resume), if earlier than this call. `on_trial(finished,
    budget, best)` is called after each trial this process ends (nas-compare's progress lines).
    """
    search = Search(
        cfg,
        progress=progress,
        out=out,
        results=results,
        force=force,
        worker_command=worker_command,
        workers=workers,
        on_trial=on_trial,
    )
    if started is not None:
        search.started = started
    return search.run()


@dataclass
class Search:
    """One process's run of a study: what it was asked to do, and the steps it takes."""

    cfg: RunConfig
    progress: bool | None = None  # None: bars when stderr is a terminal
    out: Callable[[str], None] = status  # what it does: stderr
    results: Callable[[str], None] = print  # the best-so-far line and the table: stdout
    force: bool = False
    worker_command: list[str] | None = None
    workers: int = 1
    on_trial: OnTrial | None = None
    started: float = field(default_factory=time.time)  # a stop requested from then on is for this run
    run_start: datetime = field(default_factory=datetime.now)  # Optuna's trial times are naive local datetimes
    warm_source: tuple | None = None  # the earlier study a warm start queues from (nas.study.warm_start)

    def run(self) -> optuna.Study:
        from nas.training.train import resolve_device

        cfg = self.cfg
        device = resolve_device(cfg.device)
        self.warm_source = warm_start_source(cfg)  # a mistake there is found before anything is written
        path = storage_file(cfg.study.storage)
        storage = self._open() if path is None or path.exists() else None  # a new file waits for good data
        with SIGNALS.installed(), WorkerRecord(cfg.study.heartbeat_seconds) as record:
            study_id = existing_study_id(storage, cfg.study.name) if storage is not None else None
            if study_id is not None:
                record.attach(storage, study_id)  # visible to the dashboard and other workers from now on
            data, folds = self._load(device)
            storage = storage or self._open()
            changes = check_contract(cfg, storage, data.fingerprint, self.force)
            handle = create_or_load(cfg, storage)  # for bookkeeping; the search runs on `load_for_search`'s study
            record.attach(storage, handle._study_id)  # a no-op when attached above
            return self._search(handle, record, data, folds, device, changes)

    def _open(self):
        return open_for_search(self.cfg.study.storage, self.cfg.study.heartbeat_seconds, self.cfg.study.retries)

    def _load(self, device):
        from nas.data.datasets import stratified_folds
        from nas.search.model_check import check_model  # late: builds on torch

        cfg = self.cfg
        moved = changed_on_this_host(cfg.study.storage, cfg.study.name, vars(cfg.dataset))
        if moved:  # before the data is read from where the storage now says
            (notice if self.out is status else self.out)(
                f"Study '{cfg.study.name}' changed since this host last ran it: "
                + "; ".join(f"{key} {show(a, 200)} -> {show(b, 200)}" for key, a, b in moved)
                + " (a resume takes these from the study, and whoever can write its storage can rewrite them; "
                "check them)"
            )
        with blamed(cfg), SIGNALS.interruptible():  # loading writes nothing: a signal stops it at once
            data = load_search_data(cfg, device)  # bad data is found before a new study is made
            check_model(  # and a model that cannot take it
                cfg.space, cfg.search_space, data.input_shape, data.num_classes, data.raw.layout if data.raw else None
            )
            return data, stratified_folds(data.y_train, cfg.evaluation.folds, cfg.study.seed)

    def _search(self, handle: optuna.Study, record: WorkerRecord, data, folds, device, changes: list) -> optuna.Study:
        cfg, out = self.cfg, self.out
        reclaimed = reclaim_dead_trials(handle, 2 * cfg.study.heartbeat_seconds, cfg.study.retries)
        if reclaimed:
            out(
                f"Reclaimed trial(s) {', '.join(map(str, reclaimed))}: their worker process is gone "
                "(retried per study.retries)"
            )
        budget, done = trial_cap(cfg), finished_trials(handle)
        if done >= budget:
            out(
                f"Study '{cfg.study.name}' already has {done} finished trials (budget {budget}): nothing to run. "
                "Raise --trials to search more."
            )
            self.results(summary_table(handle))
            return handle
        stagnant = StopOnStagnation(cfg.study.stop_after)
        stalled = stagnant.check(handle)
        if stalled is not None:
            out(
                f"Study '{cfg.study.name}' has stagnated: {stalled} (--stop-after {cfg.study.stop_after}): nothing to "
                "run. Raise --stop-after or leave it out to search on."
            )
            self.results(summary_table(handle))
            return handle
        if self.warm_source is not None:  # before other workers may join
            out(str(queue_warm_start(handle, cfg, self.warm_source, data.input_shape, data.num_classes)))
        version = store_config(handle, cfg, data.fingerprint, changes)
        if changes:
            out(
                f"Continuing '{cfg.study.name}' with a changed config (--force), recorded as config version {version}: "
                + "; ".join(f"{key}: {show(a)} -> {show(b)}" for key, a, b in changes)
            )
        others = [
            w
            for w in live_workers(handle._storage, handle._study_id, 2 * cfg.study.heartbeat_seconds)
            if w.identity != record.identity
        ]
        seed = process_seed(cfg.study.seed, len(handle.get_trials(deepcopy=False)), others)
        study = load_for_search(cfg, handle._storage, seed)
        novelty = Novelty(cfg.space, seed, version, cfg.study.retries, data.input_shape, data.num_classes)
        plan = f"{done}/{budget} finished, running {budget - done} more"
        if cfg.study.budget is not None:
            cap = "" if budget == NO_CAP else f", at most {budget - done} (--trials {budget})"
            plan = f"{done} finished, searching for {clock(cfg.study.budget)} (as many trials as fit{cap})"
        out(
            f"Study '{cfg.study.name}' in {cfg.study.storage}: {plan} on {device.type} ({data.name}: "
            f"{len(data.y_train)} training samples, {cfg.evaluation.folds} folds x "
            f"{epochs_said(cfg.space, cfg.evaluation.epochs)})"
        )
        out(f"Dataset in memory: {data.memory()}")
        said = checkpoint_input(cfg.space, data)
        if said:
            out(said)
        if cfg.evaluation.fold_mode == "together" and "model" in cfg.space:
            from nas.search.model_space import OURS, family_of  # late: builds on torch
            from nas.training.cross_validation import no_stacked_form

            if family_of(cfg.space) not in OURS:
                out(f"evaluation.fold_mode together: {no_stacked_form({'model': {'family': family_of(cfg.space)}})}")
        bars = Bars(
            self.progress, None if budget == NO_CAP else budget, done, cfg.evaluation.folds, self.on_trial is None
        )

        def after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            best = bars.trial_ended(study, trial)
            if self.on_trial is not None:
                self.on_trial(finished_trials(study), budget, best)

        def stop_when_used_up(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if novelty.stop_reason is not None:
                study.stop()

        SIGNALS.raise_pending()  # a signal while the study opened: stop before the first trial
        failures, stop_request = StopAfterFailures(cfg.study.max_consecutive_failures), StopOnRequest(self.started)
        if stop_request.asked(study):  # asked while this worker started: not even one trial
            bars.close()
            out(f"Stopped on request before the first trial: {of_budget(done, budget)} finished")
            return study
        time_budget = TimeBudget(cfg.study.budget, self.started, out) if cfg.study.budget is not None else None
        objective = make_objective(
            cfg,
            data,
            folds,
            device,
            epoch_bar=bars.epoch_bar if bars.shown else None,
            novelty=novelty,
            version=version,
            trials=budget,
            time_budget=time_budget,
        )
        gpus = visible_gpus() if cfg.device != "cpu" else []
        helpers = (
            [
                subprocess.Popen(self.worker_command, stdout=subprocess.DEVNULL, env=gpu_env(gpus, worker))
                for worker in range(1, self.workers)
            ]
            if self.worker_command
            else []
        )
        with quiet_optuna(optuna.logging.ERROR), _passing_signals_to(helpers):  # failures: one line of ours
            try:
                limits = [cfg.study.timeout, time_budget.left() if time_budget else None]
                if time_budget is not None and time_budget.left() <= 0:  # loading the data took it all
                    time_budget.ended = "the deadline came before the first trial could start"
                study.optimize(
                    objective,
                    timeout=min((s for s in limits if s is not None), default=None),
                    catch=(TrialError,),
                    callbacks=[
                        BudgetReached(budget),
                        failures,
                        after_trial,
                        SIGNALS.stop_at_boundary,
                        stop_request,
                        stop_when_used_up,
                        stagnant,
                        *([time_budget] if time_budget else []),
                    ],
                )
                SIGNALS.raise_pending()  # a signal between trials: stop with its exit code
            finally:
                bars.close()
        codes = [p.wait() for p in helpers]
        if any(codes):
            raise StudyError(
                f"--workers: {sum(map(bool, codes))} of {len(helpers)} extra workers exited with an error "
                f"(exit codes {codes})"
            )
        if failures.tripped:
            last = study.trials[-1].user_attrs.get(FAIL_REASON_ATTR, "see the trial's user attributes")
            raise StudyError(f"stopped after {failures.limit} failed trials in a row; last reason: {last}")
        if stop_request.stopped:
            out(
                f"Stopped on request after the running trial: {of_budget(finished_trials(study), budget)} finished; "
                f"resume with nas-search --resume --study {cfg.study.name} --storage {cfg.study.storage}"
            )
        if novelty.stop_reason is not None:
            out(f"Stopped: {novelty.stop_reason} ({of_budget(finished_trials(study), budget)} of the budget used).")
        self.results(summary_table(study))  # first: `nas-search | head -1` reads the table's first line
        if len(study.directions) == 1:
            self.results(
                anytime_line(improvements(study.get_trials(deepcopy=False), self.run_start), time.time() - self.started)
            )
        if time_budget is not None:
            self.results(time_budget.summary(study, self.run_start))
        if stagnant.stalled is not None:
            used = "" if budget == NO_CAP else f"; {finished_trials(study)}/{budget} of the budget used"
            self.results(f"Stopped: {stagnant.stalled} (--stop-after {cfg.study.stop_after}{used}).")
        return study


class Bars:
    """The progress bars on stderr: trials over the budget (with the best CV loss) and epochs of the running trial."""

    def __init__(self, progress: bool | None, budget: int | None, done: int, folds: int, lines: bool = True):
        from tqdm.auto import tqdm

        self.tqdm, self.folds, self.budget = tqdm, folds, budget
        self.shown = sys.stderr.isatty() if progress is None else progress
        self.lines = lines and not self.shown  # without bars (CI, Slurm logs), a line per finished trial instead
        self.trials = tqdm(
            total=budget, initial=done, desc="trials", unit="trial", disable=not self.shown, dynamic_ncols=True
        )

    def epoch_bar(self, number: int, epochs: int):
        """The running trial's bar over its folds x `epochs` (a fine-tuning search may search the epochs)."""
        return self.tqdm(
            total=self.folds * epochs,
            desc=f"trial {number}",
            unit="epoch",
            leave=False,
            position=1,
            disable=not self.shown,
            dynamic_ncols=True,
        )

    def trial_ended(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> float | None:
        """Advance (other workers' trials count too), say why a trial failed; returns the best CV loss."""
        best = best_value(study)
        if trial.state in FINISHED:
            done = finished_trials(study)
            self.trials.update(done - self.trials.n)
            if self.lines:
                status(finished_line(trial, done, self.budget, best))
        elif is_failure(trial) and trial.user_attrs.get(FAIL_REASON_ATTR) != OVER_BUDGET:
            reason = trial.user_attrs.get(FAIL_REASON_ATTR, "see its user attributes")
            self.trials.write(f"trial {trial.number} failed: {reason}", file=sys.stderr)
        if best is not None:
            self.trials.set_postfix(best_cv_loss=f"{best:.4f}")
        return best

    def close(self) -> None:
        self.trials.close()


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA names them to a child process: $CUDA_VISIBLE_DEVICES's list, else 0..n-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [] if listed.strip() in ("", "-1") else [gpu.strip() for gpu in listed.split(",")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]  # counts without creating a CUDA context


def gpu_env(gpus: list[str], worker: int) -> dict | None:
    """Worker `worker`'s environment (None: this one's): one of `gpus`, round robin, so N workers on G GPUs put
    N / G on each. Worker 0 is this process, which trains on cuda:0, the first of them."""
    if len(gpus) < 2:
        return None  # one GPU or none: every worker shares it
    return {**os.environ, "CUDA_VISIBLE_DEVICES": gpus[worker % len(gpus)]}


def finished_line(trial: optuna.trial.FrozenTrial, done: int, budget: int | None, best: float | None) -> str:
    """`trial 4 complete (5/13): cv loss 0.2224, best 0.2224`: the log line of a trial ended without bars."""
    if CUT_ATTR in trial.user_attrs:
        head, result = f"trial {trial.number} {trial.user_attrs[CUT_ATTR]}", ""
    elif trial.state == optuna.trial.TrialState.PRUNED:  # a step is an epoch, or a fold when folds run one by one
        head = f"trial {trial.number} pruned" + ("" if trial.last_step is None else f" at step {trial.last_step}")
        result = ""
    else:
        head = f"trial {trial.number} complete"
        result = ": cv loss " + ", ".join(f"{v:.4f}" for v in trial.values)
    ahead = "" if best is None else f", best {best:.4f}"
    return f"{head} ({of_budget(done, budget)}){result}{ahead}"


def of_budget(done: int, budget: int | None) -> str:
    """`5/13` finished trials of the budget; `5` where a time budget decides their count."""
    return f"{done}" if budget in (None, NO_CAP) else f"{done}/{budget}"


@contextmanager
def _passing_signals_to(helpers: list[subprocess.Popen]):
    """On Ctrl-C / SIGTERM here, pass the signal on so every worker leaves its trial resumable."""
    try:
        yield
    except KeyboardInterrupt as exc:
        for p in helpers:
            p.send_signal(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
        for p in helpers:
            p.wait()
        raise
