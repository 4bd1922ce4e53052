"""The Optuna study: storage, samplers, pruners, the objective, the trial budget and resume.

`--trials N` is the study's total budget of finished (complete + pruned) trials, so the same
command rerun after an interruption runs only the remainder. The run config (with its search
space inline) is stored on the study, so a study can be resumed without its YAML.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from contextlib import contextmanager
import warnings
from typing import Callable

import optuna
from sqlalchemy.exc import SQLAlchemyError
from optuna.trial import TrialState

from nas.config import RunConfig
from nas.errors import StudyError, Terminated, TrialError
from nas.archspec import describe_activations, describe_norms
from nas.space import Space
from nas.storage import FINISHED, STOP_ATTR, load_existing_study, make_storage, one_line, quiet_optuna, sqlite_path

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


def make_pruner(name: str, epochs: int) -> optuna.pruners.BasePruner:
    """`median` compares per-epoch validation losses; `wilcoxon` compares fold losses (made for k-fold)."""
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, epochs // 3))
    if name == "wilcoxon":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1)
    return optuna.pruners.NopPruner()


def _prepare_storage(url: str) -> str:
    """Create the folder of a local SQLite file, so the default `sqlite:///runs/nas.db` just works."""
    path = sqlite_path(url)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StudyError(f"study.storage: cannot create {path.parent}: {exc.strerror or exc}") from None
    return url


def open_study(cfg: RunConfig, force: bool = False) -> optuna.Study:
    """Create the study or load it if it exists; store the run config on it.

    An existing study searched a space; continuing it with another space mixes two questions,
    so that needs `force`.
    """
    try:
        with quiet_optuna(), warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = make_storage(_prepare_storage(cfg.study.storage), cfg.study.heartbeat_seconds, cfg.study.retries)
            study = optuna.create_study(
                storage=storage,
                study_name=cfg.study.name,
                sampler=make_sampler(cfg.study.sampler, cfg.study.seed),
                pruner=make_pruner(cfg.evaluation.pruner, cfg.evaluation.epochs),
                directions=["minimize"] * len(cfg.objectives),
                load_if_exists=True,
            )
    except (ImportError, ValueError, SQLAlchemyError) as exc:
        raise StudyError(f"study.storage: cannot open {cfg.study.storage}: {one_line(exc)}") from None
    stored = study.user_attrs.get("run_config")
    if stored is not None and stored.get("space") != cfg.space and not force:
        raise StudyError(f"search_space: study '{cfg.study.name}' was searched with another space than {cfg.search_space}; "
                         "use another --study, or --force to continue it with this one")
    if len(study.directions) != len(cfg.objectives):
        raise StudyError(f"objectives: study '{cfg.study.name}' has {len(study.directions)} objective(s), the config asks for {len(cfg.objectives)}; use another --study")
    study.set_user_attr("run_config", cfg.to_dict())
    return study


def stored_config(study_name: str, storage: str) -> dict:
    """The run config a study was last run with, for `--resume`."""
    config = load_existing_study(storage, study_name).user_attrs.get("run_config")
    if config is None:
        raise StudyError(f"--study: '{study_name}' has no stored run config (not made by nas-search); run with --config")
    return config


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def make_objective(cfg: RunConfig, data, folds, device, epoch_bar: Callable | None = None) -> Callable:
    """The objective: sample an ArchSpec, cross-validate it, store the score on the trial."""
    from nas.bench import candidate_costs
    from nas.evaluate import cross_validate  # late: keeps torch out of `import nas.study` users that only read

    space = Space(cfg.space)
    epochs = cfg.evaluation.epochs

    def objective(trial: optuna.Trial) -> float:
        if over_budget(trial.study, trial.number, cfg.study.trials):
            trial.set_user_attr("fail_reason", OVER_BUDGET)
            raise TrialError(OVER_BUDGET)
        spec = space.sample(trial)
        trial.set_user_attr("arch", spec)
        fold_losses: list[float] = []
        bar = epoch_bar(trial.number) if epoch_bar else None

        def on_epoch(fold: int | None, epoch: int, loss: float, acc: float) -> None:
            """fold None: the folds train together, `loss` is their mean, reported at step `epoch`."""
            if bar is not None:
                bar.update(len(folds) if fold is None else 1)
                bar.set_postfix(fold="all" if fold is None else fold + 1, val_loss=f"{loss:.4f}")
            if cfg.evaluation.pruner == "median":
                _report(trial, epoch if fold is None else fold * epochs + epoch, loss, fold_losses)

        def on_fold(fold: int, loss: float) -> None:
            fold_losses.append(loss)
            if cfg.evaluation.pruner == "wilcoxon":
                _report(trial, fold, loss, fold_losses)

        try:
            per_epoch = on_epoch if bar is not None or cfg.evaluation.pruner == "median" else None  # else no per-epoch validation pass
            with SIGNALS.interruptible():
                score = cross_validate(spec, data, folds, epochs, device, cfg.study.seed, trial.number, per_epoch, on_fold,
                                       cfg.evaluation.recalibrate_bn, cfg.evaluation.fold_mode)
        except TrialError as exc:
            trial.set_user_attr("fail_reason", str(exc))
            raise
        except KeyboardInterrupt:  # SIGINT, and SIGTERM (see cli): Optuna marks the trial FAIL
            trial.set_user_attr("fail_reason", "interrupted")
            raise
        finally:
            if bar is not None:
                bar.close()
        for key in SCORE_ATTRS:
            if key in score:
                trial.set_user_attr(key, score[key])
        if cfg.objectives == ["cv_loss"]:
            return score["cv_loss"]
        costs = candidate_costs(spec, data.input_shape, data.num_classes, device, cfg.evaluation.latency_batch_size, cfg.objectives)
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
    return sum(t.number < number for t in live) >= budget


def _report(trial: optuna.Trial, step: int, value: float, fold_losses: list[float]) -> None:
    trial.report(value, step)
    if trial.should_prune():
        trial.set_user_attr("fold_losses", list(fold_losses))
        raise optuna.TrialPruned(f"pruned at step {step}")


class Signals:
    """SIGINT / SIGTERM stop the search, but interrupt only training, never a storage write.

    An exception raised at an arbitrary point could land inside SQLAlchemy or Optuna's own
    bookkeeping; so a signal during training raises at once (Optuna then marks the trial FAIL),
    and one between trials is kept until the trial boundary, where the search stops.
    """

    def __init__(self):
        self.pending: int | None = None
        self.training = False

    def handle(self, signum, frame) -> None:
        self.pending = signum
        if self.training:
            self.raise_pending()

    def raise_pending(self) -> None:
        if self.pending is not None:
            signum, self.pending = self.pending, None
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    @contextmanager
    def interruptible(self):
        self.raise_pending()
        self.training = True
        try:
            yield
        finally:
            self.training = False

    @contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def stop_at_boundary(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.pending is not None:
            study.stop()


SIGNALS = Signals()

class StopOnRequest:
    """Stop at a trial boundary when `request_stop` was called after this worker started."""

    def __init__(self):
        self.started, self.stopped = time.time(), False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        asked = study._storage.get_study_system_attrs(study._study_id).get(STOP_ATTR)
        if asked is not None and asked >= self.started:
            self.stopped = True
            study.stop()


class StopAfterFailures:
    """Stop the search after N trials in a row failed: something is wrong beyond one candidate."""

    def __init__(self, limit: int):
        self.limit, self.streak, self.tripped = limit, 0, False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.user_attrs.get("fail_reason") == OVER_BUDGET:
            study.stop()  # the other workers finish the budget
            return
        self.streak = self.streak + 1 if trial.state == TrialState.FAIL else 0
        if self.streak >= self.limit:
            self.tripped = True
            study.stop()


def run_search(cfg: RunConfig, progress: bool | None = None, out=print, force: bool = False,
               worker_command: list[str] | None = None, workers: int = 1) -> optuna.Study:
    """Run the study to its budget of finished trials; prints what it did and the top candidates.

    With `workers` > 1 this process is the first worker and starts `worker_command` as the
    others, once the study exists; they share it through the storage.
    """
    from tqdm.auto import tqdm

    from nas.data import load_dataset, stratified_folds
    from nas.train import resolve_device

    device = resolve_device(cfg.device)
    data = load_dataset(cfg.dataset, device)  # bad data is found before the storage is touched
    folds = stratified_folds(data.y_train, cfg.evaluation.folds, cfg.study.seed)
    study = open_study(cfg, force)
    budget, done = cfg.study.trials, finished_trials(study)
    if done >= budget:
        out(f"Study '{cfg.study.name}' already has {done} finished trials (budget {budget}): nothing to run. Raise --trials to search more.")
        out(summary_table(study))
        return study
    show = sys.stderr.isatty() if progress is None else progress
    out(f"Study '{cfg.study.name}' in {cfg.study.storage}: {done}/{budget} finished, running {budget - done} more "
        f"on {device.type} ({data.name}: {len(data.y_train)} training samples, {cfg.evaluation.folds} folds x {cfg.evaluation.epochs} epochs)")
    trials_bar = tqdm(total=budget, initial=done, desc="trials", unit="trial", disable=not show, dynamic_ncols=True)
    per_trial = cfg.evaluation.folds * cfg.evaluation.epochs

    def epoch_bar(number: int):
        return tqdm(total=per_trial, desc=f"trial {number}", unit="epoch", leave=False, position=1, disable=not show, dynamic_ncols=True)

    def advance(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in FINISHED:
            trials_bar.update(finished_trials(study) - trials_bar.n)  # other workers' trials too
        elif trial.state == TrialState.FAIL and trial.user_attrs.get("fail_reason") != OVER_BUDGET:
            trials_bar.write(f"trial {trial.number} failed: {trial.user_attrs.get('fail_reason', 'see its user attributes')}", file=sys.stderr)
        best = _best_value(study)
        if best is not None:
            trials_bar.set_postfix(best_cv_loss=f"{best:.4f}")

    failures, stop_request = StopAfterFailures(cfg.study.max_consecutive_failures), StopOnRequest()
    objective = make_objective(cfg, data, folds, device, epoch_bar if show else None)
    helpers = [subprocess.Popen(worker_command, stdout=subprocess.DEVNULL) for _ in range(workers - 1)] if worker_command else []
    with quiet_optuna(optuna.logging.ERROR), _stopping(helpers), SIGNALS.installed():  # failures: one line of ours
        try:
            study.optimize(
                objective,
                timeout=cfg.study.timeout,
                catch=(TrialError,),
                callbacks=[optuna.study.MaxTrialsCallback(budget, states=FINISHED), failures, advance, SIGNALS.stop_at_boundary, stop_request],
            )
            SIGNALS.raise_pending()  # a signal between trials: stop with its exit code
        finally:
            trials_bar.close()
    codes = [p.wait() for p in helpers]
    if any(codes):
        raise StudyError(f"--workers: {sum(map(bool, codes))} of {len(helpers)} extra workers exited with an error (exit codes {codes})")
    if failures.tripped:
        last = study.trials[-1].user_attrs.get("fail_reason", "see the trial's user attributes")
        raise StudyError(f"stopped after {failures.limit} failed trials in a row; last reason: {last}")
    if stop_request.stopped:
        out(f"Stopped on request after the running trial: {finished_trials(study)}/{budget} finished; "
            f"resume with nas-search --resume --study {cfg.study.name} --storage {cfg.study.storage}")
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
    values = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return min(values) if values else None


def top_trials(study: optuna.Study, k: int = 5) -> list[optuna.trial.FrozenTrial]:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return sorted(complete, key=lambda t: t.value)[:k]


def summary_table(study: optuna.Study, k: int = 5) -> str:
    """The top-k trials (or a multi-objective study's Pareto front) with their normalization choices."""
    objectives = study.user_attrs.get("run_config", {}).get("objectives", ["cv_loss"])
    if len(study.directions) > 1:
        return pareto_table(study, objectives)
    rows = [("trial", "cv loss", "cv acc", "params", "norm (type @ position)", "activation")]
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
    front = sorted(study.best_trials, key=lambda t: t.values)
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

