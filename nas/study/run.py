"""The Optuna study: storage, samplers, pruners, the objective, the trial budget and resume.

`--trials N` is the study's total budget of finished (complete + pruned) trials that trained a
new candidate, so the same command rerun after an interruption runs only the remainder. The run
config (with its search space inline) is stored on the study, so a study can be resumed without
its YAML; it is also the study's contract (`nas.study.contract`): a continuation that would score
trials differently is refused unless forced. Every process seeds its sampler from the study seed
and what the study already holds, so no process replays another's draws (`process_seed`), and a
proposal that repeats a tried candidate costs no training and is kept from the sampler (`nas.study.duplicates`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from datetime import datetime
from typing import Callable

import numpy as np
import optuna
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from nas.study.best_so_far import anytime_line, improvements
from nas.search.archspec import describe_activations, describe_norms
from nas.search.config import RunConfig, blamed
from nas.study.contract import VERSION_ATTR, changed_on_this_host, contract, differences, history_entry, show, summary
from nas.errors import ConfigError, StudyError, Terminated, TrialError
from nas.study.workers import WorkerRecord, live_workers, mark_trial, reclaim_dead_trials
from nas.study.duplicates import Novelty, record_repeat
from nas.search.pruning import Reporter, make_pruner, reports_every_epoch
from nas.training.signals import SIGNALS
from nas.search.space import Space
from nas.study.storage import (FAIL_REASON_ATTR, FINISHED, HISTORY_ATTR, INTERRUPTED, budget_count,
                         check_writable_sqlite, counts_toward_budget, is_duplicate, is_failure, load_existing_study,
                         make_storage, one_line, quiet_optuna, read_config_history, read_data_fingerprint, read_run_config,
                         read_stop_request,
                         sqlite_path, write_run_config)

SCORE_ATTRS = ("fold_losses", "fold_accuracies", "cv_accuracy", "cv_loss_std", "params", "train_seconds",
               "eval_mode_loss", "train_mode_loss", "recalibrated_loss", "fold_mode", "fold_mode_fallback")


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    """Seeded samplers; TPE models the conditional space jointly (multivariate + group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, constant_liar=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=20)
    raise ValueError(f"unknown sampler {name!r}")


def _prepare_storage(url: str) -> str:
    """Create the folder of a local SQLite file, so the default `sqlite:///runs/nas.db` just works."""
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"study.storage: cannot create {path.parent}: {exc.strerror or exc}") from None
    return url


def open_storage(cfg: RunConfig):
    """The study's storage, refused in one line when it cannot be opened or written."""
    check_writable_sqlite(cfg.study.storage)
    url = _prepare_storage(cfg.study.storage)
    for attempt in range(2):
        try:
            with quiet_optuna():
                return make_storage(url, cfg.study.heartbeat_seconds, cfg.study.retries)
        except (ImportError, ValueError, SQLAlchemyError) as exc:
            if attempt == 0 and "already exists" in str(exc):
                continue  # another worker made the tables of a fresh storage between our check and create: use them
            raise StudyError(f"study.storage: cannot open {cfg.study.storage}: {one_line(exc)}") from None


def existing_study_id(storage, name: str) -> int | None:
    try:
        return storage.get_study_id_from_name(name)
    except KeyError:
        return None


def open_study(cfg: RunConfig, storage, fingerprint: dict | None = None, force: bool = False) -> tuple[optuna.Study, list]:
    """Create the study or load it; refuse a continuation that breaks its contract unless `force`.

    Returns the study and the contract's differences (empty unless forced). Nothing is written
    to an existing study here: the run config is stored only when a run trains (`store_config`).
    """
    study_id = existing_study_id(storage, cfg.study.name)
    changes = []
    if study_id is not None:
        stored = read_run_config(storage, study_id)
        directions = storage.get_study_directions(study_id)
        if len(directions) != len(cfg.objectives):
            raise ConfigError(cfg.where("objectives"), "objectives", f"study '{cfg.study.name}' has {len(directions)} objective(s), "
                              f"this run asks for {len(cfg.objectives)}; use another --study")
        if stored is not None:
            old = contract(stored, read_data_fingerprint(storage, study_id))
            new = contract(cfg.to_dict(), fingerprint if "data" in old else None)
            changes = differences(old, new)
        if changes and not force:
            key, before, after = changes[0]
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            raise ConfigError(cfg.where(_config_key(key)), key, f"study '{cfg.study.name}' was run with {show(before)}; this run has "
                              f"{show(after)}{more}. Use another --study, or --force to continue it and record the change")
    try:
        with quiet_optuna(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(
                storage=storage,
                study_name=cfg.study.name,
                sampler=optuna.samplers.RandomSampler(),  # replaced by `make_sampler(.., process_seed(..))` once this worker is recorded
                pruner=make_pruner(cfg.evaluation.pruner, cfg.evaluation.epochs, cfg.evaluation.folds, cfg.evaluation.fold_mode),
                directions=["minimize"] * len(cfg.objectives),
                load_if_exists=True,
            )
    except (ImportError, ValueError, SQLAlchemyError) as exc:
        raise StudyError(f"study.storage: cannot open {cfg.study.storage}: {one_line(exc)}") from None
    return study, changes


def _config_key(contract_key: str) -> str:
    """The config key a contract key comes from (the data fingerprint belongs to `dataset`)."""
    if contract_key.startswith("data."):
        return "dataset"
    if contract_key.startswith("space."):
        return "search_space"
    return contract_key


def store_config(study: optuna.Study, cfg: RunConfig, fingerprint: dict | None, changes: list) -> int:
    """Store the run config a run trains with (a forced change appended to the history); returns its version."""
    storage, study_id = study._storage, study._study_id
    history = read_config_history(storage, study_id)
    if changes:
        previous = read_run_config(storage, study_id)
        history.append(history_entry(changes, previous, read_data_fingerprint(storage, study_id), cfg.source))
        storage.set_study_system_attr(study_id, HISTORY_ATTR, history)
    config = cfg.to_dict()
    write_run_config(storage, study_id, config, fingerprint, summary(config))
    return len(history)


def stored_config(study_name: str, storage: str) -> dict:
    """The run config a study was last run with, for `--resume`."""
    study = load_existing_study(storage, study_name)
    config = read_run_config(study._storage, study._study_id)
    if config is None:
        raise StudyError(f"--study: '{study_name}' has no stored run config (not made by nas-search); run with --config")
    return config


def process_seed(study_seed: int, trials_in_study: int, others: list) -> int:
    """This process's sampler seed: the study seed itself for a fresh study searched by one process, so
    that run reproduces exactly; otherwise derived from the seed, the trials the study already holds,
    and, while other workers are live, this process's identity, so that no process replays another's draws.
    """
    if trials_in_study == 0 and not others:
        return study_seed
    entropy = [study_seed, trials_in_study]
    if others:
        entropy += [os.getpid(), int(time.time() * 1e6) % 2**32, *socket.gethostname().encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def finished_trials(study: optuna.Study) -> int:
    """Trials that count toward the budget (finished, and not a duplicate of another)."""
    return budget_count(study.get_trials(deepcopy=False, states=FINISHED))


def make_objective(cfg: RunConfig, data, folds, device, epoch_bar: Callable | None = None, novelty: Novelty | None = None,
                   version: int = 0) -> Callable:
    """The objective: sample an ArchSpec, cross-validate it, store the score on the trial.

    A proposal that repeats a tried candidate is recorded as a FAIL repeat without training (`novelty`).
    """
    from nas.models.costs import candidate_costs
    from nas.training.cross_validation import cross_validate  # late: keeps torch out of `import nas.study.run` users that only read

    space = Space(cfg.space)
    epochs = cfg.evaluation.epochs

    def objective(trial: optuna.Trial) -> float:
        mark_trial(trial)
        trial.set_user_attr(VERSION_ATTR, version)
        reclaim_dead_trials(trial.study, 2 * cfg.study.heartbeat_seconds, cfg.study.retries)
        if over_budget(trial.study, trial.number, cfg.study.trials):
            trial.set_user_attr(FAIL_REASON_ATTR, OVER_BUDGET)
            raise TrialError(OVER_BUDGET)
        spec = space.sample(trial)
        trial.set_user_attr("arch", spec)
        original = novelty.original_of(trial.study, trial.params) if novelty is not None else None
        if original is not None:
            record_repeat(trial, original)  # raises: a FAIL trial, caught by `optimize`
        reporter = Reporter(trial, cfg.evaluation.pruner, epochs, len(folds))
        bar = epoch_bar(trial.number) if epoch_bar else None

        def on_epoch(fold: int | None, epoch: int, loss: float, acc: float, per_fold: list[float] | None = None) -> None:
            """fold None: the folds train together, `loss` is their mean and `per_fold` each fold's."""
            if bar is not None:
                bar.update(len(folds) if fold is None else 1)
                bar.set_postfix(fold="all" if fold is None else fold + 1, val_loss=f"{loss:.4f}")
            reporter.epoch(fold, epoch, loss, per_fold)

        try:
            every_epoch = bar is not None or reports_every_epoch(cfg.evaluation.pruner, cfg.evaluation.fold_mode)  # else none
            with SIGNALS.interruptible():
                score = cross_validate(spec, data, folds, epochs, device, cfg.study.seed, trial.number, on_epoch if every_epoch else None,
                                       reporter.fold, cfg.evaluation.recalibrate_bn, cfg.evaluation.fold_mode)
        except TrialError as exc:
            trial.set_user_attr(FAIL_REASON_ATTR, str(exc))
            raise
        except KeyboardInterrupt:  # SIGINT, and SIGTERM (see cli): Optuna marks the trial FAIL
            trial.set_user_attr(FAIL_REASON_ATTR, INTERRUPTED)
            raise
        finally:
            if bar is not None:
                bar.close()
        for key in SCORE_ATTRS:
            if key in score:
                trial.set_user_attr(key, score[key])
        if cfg.objectives == ["cv_loss"]:
            return score["cv_loss"]
        costs = candidate_costs(spec, data.input_shape, data.num_classes, device, cfg.evaluation.latency_batch_size, cfg.objectives,
                                cfg.evaluation.latency_threads)
        for key, value in costs.items():
            trial.set_user_attr(key, value)
        values = {**score, **costs}
        return tuple(values[name] for name in cfg.objectives)

    return objective


OVER_BUDGET = "budget already reached by other workers"


def over_budget(study: optuna.Study, number: int, budget: int) -> bool:
    """With several workers, trial `number` runs only if fewer than `budget` live trials precede it.

    Trial numbers are unique and ordered, so every worker reaches the same verdict: the study
    ends with exactly its budget of finished trials however many workers race for the last ones.
    """
    live = study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING, TrialState.WAITING))
    return sum(t.number < number and (t.state not in FINISHED or counts_toward_budget(t)) for t in live) >= budget


class BudgetReached:
    """Stop once the study holds its budget of counted trials (Optuna's MaxTrialsCallback would count duplicates)."""

    def __init__(self, budget: int):
        self.budget = budget

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if finished_trials(study) >= self.budget:
            study.stop()



class StopOnRequest:
    """Stop at a trial boundary when `request_stop` was called after this worker started.

    `started` is when the run began (before its data loads), so a Stop that comes while the
    worker loads data or opens the study is not missed.
    """

    def __init__(self, started: float):
        self.started, self.stopped = started, False

    def asked(self, study: optuna.Study) -> bool:
        asked = read_stop_request(study._storage, study._study_id)
        return asked is not None and asked >= self.started

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.asked(study):
            self.stopped = True
            study.stop()


class StopAfterFailures:
    """Stop the search after N trials in a row failed: something is wrong beyond one candidate.

    A repeat (FAIL only to keep it from the sampler) trained nothing: it neither fails nor breaks the streak.
    """

    def __init__(self, limit: int):
        self.limit, self.streak, self.tripped = limit, 0, False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get(FAIL_REASON_ATTR) == OVER_BUDGET:
            study.stop()  # the other workers finish the budget
            return
        if is_duplicate(trial):
            return
        self.streak = self.streak + 1 if trial.state == TrialState.FAIL else 0
        if self.streak >= self.limit:
            self.tripped = True
            study.stop()


def run_search(cfg: RunConfig, progress: bool | None = None, out=print, force: bool = False,
               worker_command: list[str] | None = None, workers: int = 1, started: float | None = None,
               on_trial: Callable[[int, int, float | None], None] | None = None) -> optuna.Study:
    """Run the study to its budget of finished trials; prints what it did and the top candidates.

    This process is recorded as a worker of the study from the moment the study exists (while it
    loads data, too). With `workers` > 1 it is the first worker and starts `worker_command` as
    the others, once the study exists; they share it through the storage. `started`: when the
    run was launched (the dashboard's Resume), if earlier than this call. `on_trial(finished,
    budget, best)` is called after each trial this process ends (nas-compare's progress lines).
    """
    from nas.training.train import resolve_device

    started = time.time() if started is None else started  # a stop requested from then on is for this run (loading data included)
    run_start = datetime.now()  # Optuna's trial times are naive local datetimes
    device = resolve_device(cfg.device)
    check_writable_sqlite(cfg.study.storage)
    path = sqlite_path(cfg.study.storage)
    storage = open_storage(cfg) if path is None or path.exists() else None  # a new SQLite file waits for good data
    with SIGNALS.installed(), WorkerRecord(cfg.study.heartbeat_seconds) as record:
        study_id = existing_study_id(storage, cfg.study.name) if storage is not None else None
        if study_id is not None:
            record.attach(storage, study_id)  # visible to the dashboard and other workers from now on
        return _search(cfg, storage, record, device, progress, out, force, worker_command, workers, started, run_start, on_trial)


def _search(cfg: RunConfig, storage, record: WorkerRecord, device, progress, out, force, worker_command, workers, started,
            run_start: datetime, on_trial: Callable | None) -> optuna.Study:
    from tqdm.auto import tqdm

    from nas.data.datasets import load_dataset, stratified_folds

    moved = changed_on_this_host(cfg.study.storage, cfg.study.name, vars(cfg.dataset))
    if moved:  # before the data is read from where the storage now says
        out(f"Study '{cfg.study.name}' changed since this host last ran it: "
            + "; ".join(f"{key} {show(a, 200)} -> {show(b, 200)}" for key, a, b in moved)
            + " (a resume takes these from the study, and whoever can write its storage can rewrite them; check them)")
    with blamed(cfg), SIGNALS.interruptible():  # loading writes nothing: a signal stops it at once
        data = load_dataset(cfg.dataset, device)  # bad data is found before a new study is made
        folds = stratified_folds(data.y_train, cfg.evaluation.folds, cfg.study.seed)
    study, changes = open_study(cfg, storage or open_storage(cfg), data.fingerprint, force)
    record.attach(study._storage, study._study_id)
    reclaimed = reclaim_dead_trials(study, 2 * cfg.study.heartbeat_seconds, cfg.study.retries)
    if reclaimed:
        out(f"Reclaimed trial(s) {', '.join(map(str, reclaimed))}: their worker process is gone (retried per study.retries)")
    budget, done = cfg.study.trials, finished_trials(study)
    if done >= budget:
        out(f"Study '{cfg.study.name}' already has {done} finished trials (budget {budget}): nothing to run. Raise --trials to search more.")
        out(summary_table(study))
        return study
    version = store_config(study, cfg, data.fingerprint, changes)
    if changes:
        out(f"Continuing '{cfg.study.name}' with a changed config (--force), recorded as config version {version}: "
            + "; ".join(f"{key}: {show(a)} -> {show(b)}" for key, a, b in changes))
    others = [w for w in live_workers(study._storage, study._study_id, 2 * cfg.study.heartbeat_seconds) if w.identity != record.identity]
    seed = process_seed(cfg.study.seed, len(study.get_trials(deepcopy=False)), others)
    study.sampler = make_sampler(cfg.study.sampler, seed)
    novelty = Novelty(cfg.space, seed, version, cfg.study.retries)
    show_bars = sys.stderr.isatty() if progress is None else progress
    out(f"Study '{cfg.study.name}' in {cfg.study.storage}: {done}/{budget} finished, running {budget - done} more "
        f"on {device.type} ({data.name}: {len(data.y_train)} training samples, {cfg.evaluation.folds} folds x {cfg.evaluation.epochs} epochs)")
    out(f"Dataset in memory: {data.memory()}")
    trials_bar = tqdm(total=budget, initial=done, desc="trials", unit="trial", disable=not show_bars, dynamic_ncols=True)
    per_trial = cfg.evaluation.folds * cfg.evaluation.epochs

    def epoch_bar(number: int):
        return tqdm(total=per_trial, desc=f"trial {number}", unit="epoch", leave=False, position=1, disable=not show_bars, dynamic_ncols=True)

    def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in FINISHED:
            trials_bar.update(finished_trials(study) - trials_bar.n)  # other workers' trials too
        elif is_failure(trial) and trial.user_attrs.get(FAIL_REASON_ATTR) != OVER_BUDGET:
            reason = trial.user_attrs.get(FAIL_REASON_ATTR, "see its user attributes")
            trials_bar.write(f"trial {trial.number} failed: {reason}", file=sys.stderr)
        best = _best_value(study)
        if best is not None:
            trials_bar.set_postfix(best_cv_loss=f"{best:.4f}")
        if on_trial is not None:
            on_trial(finished_trials(study), budget, best)

    def stop_when_used_up(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if novelty.stop_reason is not None:
            study.stop()

    SIGNALS.raise_pending()  # a signal while the study opened: stop before the first trial
    failures, stop_request = StopAfterFailures(cfg.study.max_consecutive_failures), StopOnRequest(started)
    if stop_request.asked(study):  # asked while this worker started: not even one trial
        trials_bar.close()
        out(f"Stopped on request before the first trial: {done}/{budget} finished")
        return study
    objective = make_objective(cfg, data, folds, device, epoch_bar if show_bars else None, novelty, version)
    helpers = [subprocess.Popen(worker_command, stdout=subprocess.DEVNULL) for _ in range(workers - 1)] if worker_command else []
    with quiet_optuna(optuna.logging.ERROR), _stopping(helpers):  # failures: one line of ours
        try:
            study.optimize(
                objective,
                timeout=cfg.study.timeout,
                catch=(TrialError,),
                callbacks=[BudgetReached(budget), failures, advance, SIGNALS.stop_at_boundary, stop_request, stop_when_used_up],
            )
            SIGNALS.raise_pending()  # a signal between trials: stop with its exit code
        finally:
            trials_bar.close()
    codes = [p.wait() for p in helpers]
    if any(codes):
        raise StudyError(f"--workers: {sum(map(bool, codes))} of {len(helpers)} extra workers exited with an error (exit codes {codes})")
    if failures.tripped:
        last = study.trials[-1].user_attrs.get(FAIL_REASON_ATTR, "see the trial's user attributes")
        raise StudyError(f"stopped after {failures.limit} failed trials in a row; last reason: {last}")
    if stop_request.stopped:
        out(f"Stopped on request after the running trial: {finished_trials(study)}/{budget} finished; "
            f"resume with nas-search --resume --study {cfg.study.name} --storage {cfg.study.storage}")
    if novelty.stop_reason is not None:
        out(f"Stopped: {novelty.stop_reason} ({finished_trials(study)}/{budget} of the budget used).")
    if len(study.directions) == 1:
        out(anytime_line(improvements(study.get_trials(deepcopy=False), run_start), time.time() - started))
    out(summary_table(study))
    return study


@contextmanager
def _stopping(helpers: list[subprocess.Popen]):
    """On Ctrl-C / SIGTERM here, pass the signal on so every worker leaves its trial resumable."""
    try:
        yield
    except KeyboardInterrupt as exc:
        for p in helpers:
            p.send_signal(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
        for p in helpers:
            p.wait()
        raise


def _best_value(study: optuna.Study) -> float | None:
    if len(study.directions) > 1:
        return None
    values = [t.value for t in scored_trials(study)]
    return min(values) if values else None


def scored_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """COMPLETE trials that trained their own candidate (duplicates repeat another's score)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if counts_toward_budget(t)]


def top_trials(study: optuna.Study, k: int = 5) -> list[optuna.trial.FrozenTrial]:
    return sorted(scored_trials(study), key=lambda t: (t.value, t.number))[:k]


def summary_table(study: optuna.Study, k: int = 5) -> str:
    """The top-k trials (or a multi-objective study's Pareto front) with their normalization choices."""
    objectives = (read_run_config(study._storage, study._study_id) or {}).get("objectives", ["cv_loss"])
    if len(study.directions) > 1:
        return pareto_table(study, objectives)
    # cv_loss_std is the population SD of the fold losses (nas.training.cross_validation), so the column says so
    rows = [("trial", "cv loss ± SD over folds", "cv acc", "params", "norm (type @ position)", "activation")]
    for t in top_trials(study, k):
        arch, attrs = t.user_attrs.get("arch", {}), t.user_attrs
        std = attrs.get("cv_loss_std")
        loss = f"{t.value:.4f}" + (f" ± {std:.4f}" if std is not None else "")
        rows.append((str(t.number), loss, f"{attrs.get('cv_accuracy', float('nan')):.4f}", f"{attrs.get('params', 0):,}", describe_norms(arch), describe_activations(arch)))
    if len(rows) == 1:
        return f"Study '{study.study_name}': no completed trials yet."
    header = f"Top {len(rows) - 1} of {finished_trials(study)} finished trials in '{study.study_name}' (lower cv loss is better):"
    return "\n".join([header, *text_table(rows)])


def pareto_table(study: optuna.Study, objectives: list[str]) -> str:
    """The Pareto front of a multi-objective study, sorted by its first objective."""
    front = sorted((t for t in study.best_trials if counts_toward_budget(t)), key=lambda t: t.values)
    if not front:
        return f"Study '{study.study_name}': no completed trials yet."
    rows = [("trial", *objectives, "cv acc", "norm (type @ position)")]
    for t in front:
        cells = [f"{v:.4f}" if isinstance(v, float) and not float(v).is_integer() else f"{int(v):,}" for v in t.values]
        rows.append((str(t.number), *cells, f"{t.user_attrs.get('cv_accuracy', float('nan')):.4f}", describe_norms(t.user_attrs.get("arch", {}))))
    header = (f"Pareto front of '{study.study_name}' ({len(front)} of {finished_trials(study)} finished trials; all objectives minimized; "
              f"export one with nas-export --trial N):")
    return "\n".join([header, *text_table(rows)])


def text_table(rows: list[tuple]) -> list[str]:
    """Rows of strings as padded columns with a dashed line under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines

