"""The console scripts: parse arguments, call the rooms, map errors to exit codes in one place.

0 success, 1 unexpected error or a failed self-check (one line), 2 bad usage or bad input
(one line, no traceback), 130 interrupted by SIGINT, 143 by SIGTERM (study left resumable),
141 stdout closed by its reader (`nas-search | head -1`; 128 + SIGPIPE, as a shell reports a
process killed by it), quietly. `main` is `python -m nas COMMAND`: every script in one.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import logging
import math
import os
import sys
import textwrap
import time
from pathlib import Path

import nas
from nas.errors import NasError, Terminated, VerificationError
from nas.options import DATASET_NAMES, DEFAULT_THREADS, RUNTIMES, SLIM_SCOPES, SPREAD_LIMIT
from nas.output import LOG, status
from nas.search.config import (
    FOLD_MODES,
    OBJECTIVES,
    SHORTCUTS,
    WARM_START_KEYS,
    Override,
    load_run_config,
    parse_override,
)
from nas.search.finetune_space import MODES
from nas.search.pruners import PRUNER_NAMES
from nas.search.samplers import SAMPLER_NAMES
from nas.validation import did_you_mean

__all__ = [
    "main",
    "search_main",
    "report_main",
    "export_main",
    "bench_main",
    "finetune_main",
    "slim_main",
    "dashboard_main",
    "compare_main",
    "predict_main",
    "storage_proxy_main",
]  # the console scripts
DEFAULT_STORAGE = "sqlite:///runs/nas.db"
STORAGE_ENV = "OPTUNA_STORAGE"  # read where the `optuna` CLI reads it: a --storage not given
# The embedded default run config: package data, so an installed bnnas has it; the repository's
# configs/digits.yaml and search_spaces/bn_placement.yaml are links to these files.
DEFAULT_CONFIG = Path(__file__).parent / "default" / "configs" / "digits.yaml"
EXIT_CLOSED_STDOUT = 141  # 128 + SIGPIPE
EXIT_CODES = f"""exit codes:
  0    success
  1    unexpected error, or an output that failed its own check (one line)
  2    bad usage or bad input (one line, no traceback, nothing written)
  130  interrupted by SIGINT; 143 terminated by SIGTERM (a study stays resumable)
  {EXIT_CLOSED_STDOUT}  stdout closed by its reader (nas-search | head -1): stops quietly"""

# One line per command: the start of its --help, and its line in `python -m nas --help`.
SUMMARIES = {
    "search": "Search a normalization-aware CNN space with Optuna, scoring each trial by k-fold cross-validation",
    "report": "Write report.md and PNGs about a study: what the normalization choices did",
    "export": "Retrain a trial on the full training split, fold BN, write TorchScript, torch.export and ONNX files",
    "bench": (
        "Time an exported model unfolded, folded, in onnxruntime (and its code files with --trust-code): what BN costs"
    ),
    "finetune": "Fine-tune an exported model on a run config's dataset with a BatchNorm strategy",
    "slim": "Make an exported model smaller: remove the channels with the smallest BatchNorm scales, fine-tune, export",
    "dashboard": "Web dashboard for the studies in one storage: browse, resume, stop, export",
    "compare": "Compare normalization choices fairly: one equal-budget study per cell, re-evaluated over fresh seeds",
    "predict": (
        "Classify raw inputs (PNG / JPEG images, .npy / .npz arrays) with an exported model, "
        "preprocessed as model.json says"
    ),
    "storage-proxy": (
        "Serve one study storage to workers through Optuna's gRPC storage proxy: "
        "only this machine holds the database URL"
    ),
}


def _console_script(main):
    """A reader that stops early (`| head -1`) ends the command quietly, not with a BrokenPipeError traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        _log_to_stderr()
        try:
            try:
                return main(argv)
            finally:
                sys.stdout.flush()  # now, while a closed pipe can still be caught, not at interpreter exit
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush then goes nowhere
            return EXIT_CLOSED_STDOUT

    return wrapper


class _Parser(argparse.ArgumentParser):
    """argparse, except that a --help into a closed pipe raises BrokenPipeError (argparse swallows it and exits 0),
    so that `_console_script` ends the command as `| head -1` expects."""

    def _print_message(self, message: str, file=None) -> None:
        if message:
            (file or sys.stderr).write(message)


_UNDER_MAIN: contextvars.ContextVar[str | None] = contextvars.ContextVar("under_main", default=None)  # usage's name


def _parser(command: str, details: str, epilog: str = "") -> argparse.ArgumentParser:
    """A command's parser: its summary and details, its epilog, the exit codes and --version."""
    p = _Parser(
        prog=_UNDER_MAIN.get() or f"nas-{command}",
        description=textwrap.fill(f"{SUMMARIES[command]}. {details}", 88, break_on_hyphens=False),
        epilog=f"{epilog}\n\n{EXIT_CODES}" if epilog else EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {nas.__version__}")
    loud = p.add_mutually_exclusive_group()
    loud.add_argument(
        "-q", "--quiet", action=_Verbosity, level=logging.WARNING, help="no status lines: results, warnings, errors"
    )
    loud.add_argument("-v", "--verbose", action=_Verbosity, level=logging.DEBUG, help="also Optuna's own log lines")
    return p


class _Verbosity(argparse.Action):
    """-q / -v: set the `nas` logger's level as soon as the flag is read, before the command says anything."""

    def __init__(self, option_strings, dest, level: int, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)
        self.level = level

    def __call__(self, parser, namespace, values, option_string=None):
        LOG.setLevel(self.level)


class _Stderr(logging.Handler):
    """Status lines to whatever sys.stderr is when they are written (a test's capture, a redirected stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler reports, never raises
            self.handleError(record)


def _log_to_stderr() -> None:
    """The console scripts' logging: the `nas` logger's status lines, bare, on stderr; INFO until -q / -v."""
    if not any(isinstance(h, _Stderr) for h in LOG.handlers):
        LOG.addHandler(_Stderr())
    LOG.propagate = False  # not twice through a root handler someone else configured
    LOG.setLevel(logging.INFO)


def _names(values) -> str:
    return ", ".join(values)


def search_parser() -> argparse.ArgumentParser:
    p = _parser(
        "search",
        "A trial's score is its mean validation loss over the folds; every trial is stored in an Optuna study.",
        f"""names the config takes:
  datasets (dataset.name)              {_names(DATASET_NAMES)}
  samplers (--sampler, study.sampler)  {_names(SAMPLER_NAMES)}
  pruners (evaluation.pruner)          {_names(PRUNER_NAMES)}
  fold modes (evaluation.fold_mode)    {_names(FOLD_MODES)}
  objectives (objectives)              {_names(OBJECTIVES)}

examples:
  nas-search --trials 5 --epochs 3       # the embedded default (configs/digits.yaml), smaller
  nas-search --config configs/digits.yaml
  nas-search --config configs/cifar.yaml --set dataset.root=~/data/cifar10 --trials 100
  nas-search --resume --study digits-bn --storage sqlite:///runs/nas.db --trials 60""",
    )
    p.add_argument(
        "--config",
        help="run config YAML (dataset, search space, study, evaluation); "
        "default: the embedded configs/digits.yaml (digits, offline)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue a stored study without its YAML (needs --study; --storage defaults to ${STORAGE_ENV}, "
        f"else {DEFAULT_STORAGE})",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override any config key (repeatable), e.g. --set dataset.root=~/data",
    )
    _shortcut_arguments(p, SHORTCUTS, "shortcuts (each overrides one config key)")
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes on this study (default %(default)s); across machines, run nas-search on each against "
        "one PostgreSQL --storage",
    )
    ray = p.add_argument_group("a Ray cluster (pip install 'bnnas[ray]')")
    ray.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run the workers as Ray tasks: no ADDRESS starts a local Ray for this run (or joins $RAY_ADDRESS), "
        "'auto' joins the cluster this machine belongs to, or give the head's address",
    )
    ray.add_argument(
        "--ray-workers", type=int, default=1, metavar="N", help="workers to start on the cluster (default %(default)s)"
    )
    ray.add_argument(
        "--gpus-per-trial",
        type=float,
        metavar="F",
        help="GPUs each worker reserves; 0.25 puts four on one GPU "
        "(default: 1 where the cluster has GPUs and the device is not cpu, else 0)",
    )
    ray.add_argument(
        "--cpus-per-trial", type=float, default=1.0, metavar="C", help="CPUs each worker reserves (default %(default)s)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="continue a study although its dataset, data, evaluation, objectives, seed or search space "
        "differ from the stored ones (the change is recorded in the study's config history); budget, timeout, "
        "device, sampler and progress flags may change without it",
    )
    p.add_argument(
        "--launched-at",
        type=float,
        metavar="EPOCH",
        help="when this run was launched, in seconds since the epoch "
        "(default: when it starts); a stop request from then on stops it. nas-dashboard passes its Resume time, so "
        "a Stop right after Resume is not missed while the worker imports torch and loads data",
    )
    _progress_arguments(p, "never show progress bars")
    return p


def _shortcut_arguments(p: argparse.ArgumentParser, shortcuts: dict, title: str) -> None:
    group = p.add_argument_group(title)
    for flag, key in shortcuts.items():
        extra = {"choices": ["auto", "cpu", "cuda"]} if flag == "device" else {"metavar": SHORTCUT_METAVARS.get(flag)}
        group.add_argument(
            f"--{flag}", type=SHORTCUT_TYPES.get(flag, str), help=SHORTCUT_HELP.get(flag, f"sets {key}"), **extra
        )


SHORTCUT_TYPES = {
    "trials": int,
    "epochs": int,
    "folds": int,
    "seed": int,
    "timeout": float,
    "stop-after": int,
    "top": int,
}
SHORTCUT_METAVARS = {"budget": "DURATION", "stop-after": "N", "warm-start": "STUDY", "warm-storage": "URL", "top": "K"}
SHORTCUT_HELP = {
    "timeout": "sets study.timeout: seconds after which no new trial starts (the running one finishes)",
    "budget": "sets study.budget: a wall time (90s, 10m, 1h30m) the search plans for and ends within; the trial "
    "count is what fits (--trials then only caps it)",
    "stop-after": "sets study.stop_after: stop after N finished trials without an improvement of the best CV loss "
    "beyond its fold noise",
    "warm-start": "sets study.warm_start.study: queue the best candidates of this earlier study as the first trials",
    "warm-storage": "sets study.warm_start.storage: where the --warm-start study is (default: --storage)",
    "top": "sets study.warm_start.top: how many of its best candidates --warm-start queues (default 5)",
}


def _progress_arguments(p: argparse.ArgumentParser, without: str) -> None:
    bars = p.add_mutually_exclusive_group()
    bars.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show progress bars even when stderr is not a terminal",
    )
    bars.add_argument("--no-progress", dest="progress", action="store_false", help=without)


def _overrides(args: argparse.Namespace, shortcuts: dict) -> list[Override]:
    """`--set` values and the shortcut flags given, each remembering its flag for error messages; $OPTUNA_STORAGE
    stands in for a --storage not given, as it does for the `optuna` CLI."""
    overrides = [parse_override(text) for text in args.overrides]
    if "storage" in shortcuts and args.storage is None and os.environ.get(STORAGE_ENV):
        overrides.append(Override(shortcuts["storage"], os.environ[STORAGE_ENV], STORAGE_ENV))
    given = {flag: getattr(args, flag.replace("-", "_")) for flag in shortcuts}
    return overrides + [
        Override(key, given[flag], f"--{flag}") for flag, key in shortcuts.items() if given[flag] is not None
    ]


def _storage_default() -> str:
    """A --storage not given: $OPTUNA_STORAGE (the `optuna` CLI's variable), else the default SQLite file."""
    return os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


STORAGE_HELP = f"Optuna storage URL or journal file (default: ${STORAGE_ENV}, else {DEFAULT_STORAGE})"


@_console_script
def search_main(argv: list[str] | None = None) -> int:
    called = time.time()  # before torch and the rest load
    parser = search_parser()
    args = parser.parse_args(argv)
    if args.resume and not args.study:
        parser.error("--resume needs --study NAME")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    if args.launched_at is not None and not math.isfinite(args.launched_at):
        parser.error("--launched-at must be a finite number of seconds since the epoch")
    if args.ray is not None and (
        args.ray_workers < 1 or (args.gpus_per_trial or 0) < 0 or args.cpus_per_trial <= 0 or args.workers > 1
    ):
        parser.error("--ray needs --ray-workers >= 1, --gpus-per-trial >= 0, --cpus-per-trial > 0, and no --workers")
    return _run(lambda: _search(args, argv, called))


def _search(args: argparse.Namespace, argv: list[str] | None, called: float) -> None:
    from nas.study.opening import stored_config
    from nas.study.run import run_search

    # When the command was called (its imports and data loading are part of what a user waits for): a stop request
    # from then on is for this run, and a time budget counts from it.
    launched = called if args.launched_at is None else args.launched_at
    overrides = _overrides(args, SHORTCUTS)
    if args.resume:
        storage = args.storage or _storage_default()
        cfg = load_run_config(None, overrides, stored=stored_config(args.study, storage))
    else:
        cfg = load_run_config(args.config or DEFAULT_CONFIG, overrides)
    if not args.resume and not args.config:
        status(
            f"No --config given: running the embedded default (configs/digits.yaml: {cfg.dataset.name}, "
            f"{_count_said(cfg)} --folds {cfg.evaluation.folds} --epochs {cfg.evaluation.epochs}, "
            f"study '{cfg.study.name}' in {cfg.study.storage})"
        )
    if args.ray is not None:
        from nas.cluster.ray_workers import run_on_ray
        from nas.study.storage import load_existing_study
        from nas.study.tables import summary_table

        argv = sys.argv[1:] if argv is None else argv
        run_on_ray(
            cfg,
            _worker_command(argv, launched),
            args.ray or None,
            args.ray_workers,
            args.gpus_per_trial,
            args.cpus_per_trial,
        )
        print(summary_table(load_existing_study(cfg.study.storage, cfg.study.name)))
        return
    worker = None
    if args.workers > 1:  # the other workers: this command again, one worker each, quiet
        argv = sys.argv[1:] if argv is None else argv
        worker = _worker_command(argv, launched)
    run_search(
        cfg, progress=args.progress, force=args.force, worker_command=worker, workers=args.workers, started=launched
    )


def _count_said(cfg) -> str:
    """What decides how many trials run: `--trials 13`, or `--budget 1:30` (`--trials` then only caps it)."""
    from nas.study.best_so_far import clock
    from nas.study.time_budget import NO_CAP, trial_cap

    if cfg.study.budget is None:
        return f"--trials {cfg.study.trials}"
    return f"--budget {clock(cfg.study.budget)}" + ("" if trial_cap(cfg) == NO_CAP else f" --trials {cfg.study.trials}")


LAUNCH_FLAGS = {
    "--workers",
    "--ray-workers",
    "--gpus-per-trial",
    "--cpus-per-trial",
    "--launched-at",
}  # each takes a value


def _worker_command(argv: list[str], launched_at: float) -> list[str]:
    """This nas-search command as one quiet worker, with this interpreter: without the flags that launch workers,
    and launched when its launcher was, so a stop requested while the worker starts up (on a busy node) stops it."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        name, has_value = arg.split("=", 1)[0], "=" in arg
        if skip:
            skip = False
        elif name in LAUNCH_FLAGS:
            skip = not has_value
        elif name == "--ray":  # its ADDRESS is optional
            skip = not has_value and i + 1 < len(argv) and not argv[i + 1].startswith("-")
        elif arg not in ("--progress", "--no-progress"):
            out.append(arg)
    return [sys.executable, "-m", "nas.cli", *out, "--no-progress", "--launched-at", repr(launched_at)]


def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", default=_storage_default(), help=STORAGE_HELP)
    p.add_argument("--study", required=True, help="study name")


def report_parser() -> argparse.ArgumentParser:
    p = _parser("report", "It only reads the study, so it works on one that a search is still writing.")
    _study_arguments(p)
    p.add_argument("--out", required=True, help="folder for report.md and the PNGs (created)")
    p.add_argument("--top", type=int, default=10, help="rows in the top-k table (default %(default)s)")
    _artifacts_argument(p, "the report")
    return p


def _artifacts_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--artifacts",
        metavar="DIR|none",
        help=f"Optuna artifact store that keeps {what} with the study, shown by optuna-dashboard (default: "
        "STORAGE_FILE.artifacts beside a local storage; none for a server storage unless named)",
    )


@_console_script
def report_main(argv: list[str] | None = None) -> int:
    args = report_parser().parse_args(argv)

    def report() -> None:
        from nas.study.report import write_report

        path = write_report(args.storage, args.study, args.out, top=args.top, artifacts=args.artifacts)
        status(f"wrote {path}")

    return _run(report)


def export_parser() -> argparse.ArgumentParser:
    p = _parser(
        "export",
        "The trial (default: the best) is tested on the held-out test split; model.ts (TorchScript), "
        "model.pt2 (torch.export), model.onnx (with the onnx extra), weights.pt and model.json (with the "
        "preprocessing from a raw input) are written, then every model file is verified in a fresh process. "
        "model.ts and model.pt2 are code to whoever loads them; model.json says so. With BNNAS_EXPORT_KEY set, "
        "model.sig signs model.json (HMAC-SHA256), and the commands that read an export then refuse any folder "
        "not signed with that key.",
    )
    _study_arguments(p)
    p.add_argument("--trial", type=int, help="trial number (default: the best; required for multi-objective studies)")
    p.add_argument("--out", default="exported", help="output folder (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an export already in --out")
    p.add_argument("--epochs", type=int, help="training epochs (default: the study's evaluation.epochs)")
    p.add_argument("--seed", type=int, help="seeds the training (default: a seed no CV fold of the trial used)")
    p.add_argument(
        "--bn-sparsity",
        type=float,
        metavar="W",
        help="train with this L1 weight on the norm scales instead of the trial's training.bn_sparsity, so that "
        "nas-slim can remove the channels it drives to zero",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the study's device")
    _artifacts_argument(p, "the export")
    p.add_argument(
        "--retrain", action="store_true", help="train again even if the store holds an export with these settings"
    )
    return p


@_console_script
def export_main(argv: list[str] | None = None) -> int:
    args = export_parser().parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        export_parser().error("--epochs must be >= 1")
    if args.bn_sparsity is not None and not args.bn_sparsity >= 0:
        export_parser().error("--bn-sparsity must be >= 0")

    def export() -> None:
        from nas.deploy.export import export_trial

        export_trial(
            args.storage,
            args.study,
            args.out,
            trial_number=args.trial,
            epochs=args.epochs,
            device=args.device,
            force=args.force,
            seed=args.seed,
            bn_sparsity=args.bn_sparsity,
            artifacts=args.artifacts,
            retrain=args.retrain,
        )

    return _run(export)


def _numbers(parser: argparse.ArgumentParser, flag: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        parser.error(f"{flag}: expected comma-separated numbers, got {text!r}")
    return values


def bench_parser() -> argparse.ArgumentParser:
    p = _parser(
        "bench",
        "Median latency and throughput of each variant, measured side by side in one run, with a "
        f"pinned CPU thread count; rows whose p90/p10 exceeds {SPREAD_LIMIT} are marked and warned about. "
        "The eager variants are rebuilt from model.json's arch and weights.pt (loaded as data), onnxruntime "
        "runs model.onnx; TorchScript (model.ts) and torch.export (model.pt2) are code and are timed only with "
        "--trust-code.",
    )
    p.add_argument("--model", required=True, help="an export folder written by nas-export")
    p.add_argument(
        "--trust-code",
        action="store_true",
        help="also time model.ts and model.pt2: loading them runs code from the folder, so trust it like a script",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="CPU threads for every variant (default %(default)s, as the latency_ms objective)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="cpu", help="default %(default)s")
    p.add_argument("--batch-sizes", default="1,64,256", help="comma-separated (default %(default)s)")
    p.add_argument(
        "--repeats", type=int, default=50, help="timed calls per variant and batch size (default %(default)s)"
    )
    p.add_argument("--warmup", type=int, default=10, help="untimed calls first (default %(default)s)")
    return p


@_console_script
def bench_main(argv: list[str] | None = None) -> int:
    parser = bench_parser()
    args = parser.parse_args(argv)
    sizes = _numbers(parser, "--batch-sizes", args.batch_sizes, int)
    if min(sizes) < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--batch-sizes must be positive integers, --repeats >= 1, --warmup >= 0, --threads >= 1")

    def bench() -> None:
        from nas.deploy.bench import bench_export
        from nas.deploy.export import CODE_FILES, code_note

        if args.trust_code:
            print(code_note(args.model, list(CODE_FILES)), file=sys.stderr)
        print(
            bench_export(
                args.model, args.device, sizes, args.warmup, args.repeats, args.threads, trust_code=args.trust_code
            )
        )

    return _run(bench)


def finetune_parser() -> argparse.ArgumentParser:
    p = _parser(
        "finetune",
        "It writes an export folder like nas-export's (BN folded, verified) plus metrics.json.",
        "modes: freeze (norm layers fixed, the rest trained), adabn (running statistics re-estimated on the "
        "target inputs; with K > 0 then the head trained), bn-only (norm affine parameters and head), "
        "full (everything), linear-probe (the head alone, norms in eval mode)\n"
        "examples:\n  nas-finetune --model exported/ --config configs/digits_shifted.yaml --bn-mode adabn\n"
        "  nas-finetune --model timm:resnet10t --weights resnet10t.safetensors --config configs/digits.yaml "
        "--bn-mode freeze --input-size 32 --out finetuned-resnet10t/",
    )
    p.add_argument(
        "--model",
        required=True,
        help="an export folder written by nas-export (or nas-finetune), read as data (model.json's arch and "
        "weights.pt), never its code files; or timm:NAME, torchvision:NAME, factory:pkg.mod:fn with --weights",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="a local checkpoint of --model NAME: a state dict (.pt/.pth, read with torch.load(weights_only=True)) "
        "or .safetensors; nothing is downloaded",
    )
    p.add_argument(
        "--strict",
        type=_boolean,
        default=True,
        metavar="true|false",
        help="refuse a checkpoint whose keys do not all match (default true; false loads what matches and reports "
        "the rest)",
    )
    p.add_argument(
        "--mean", type=float, nargs="+", help="per-channel mean the checkpoint expects (default: its library's)"
    )
    p.add_argument("--std", type=float, nargs="+", help="per-channel std the checkpoint expects")
    p.add_argument(
        "--input-size",
        type=int,
        help="square input size the checkpoint expects (default: dataset.image_size, else its library's)",
    )
    p.add_argument(
        "--config", required=True, help="run config YAML whose dataset (and dataset.transforms) is the target"
    )
    p.add_argument("--bn-mode", required=True, choices=MODES, help="how the norm layers adapt")
    p.add_argument(
        "--labels-per-class",
        type=_per_class,
        metavar="K|all",
        default=argparse.SUPPRESS,
        help="labelled target training samples per class, stratified and seeded (default: 0 for adabn, all otherwise)",
    )
    p.add_argument("--epochs", type=int, help="training epochs (default: the config's evaluation.epochs)")
    p.add_argument("--lr", type=float, help="learning rate (default: the model's searched training.lr)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: the model's training.batch_size)")
    p.add_argument(
        "--unfreeze-stages",
        type=int,
        metavar="K",
        help="train only the last K stages and the head (freeze, bn-only, full); earlier stages keep their weights "
        "and running statistics (default: all)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the labelled subset, a new head and the batch order (default %(default)s)",
    )
    p.add_argument("--out", default="finetuned", help="output folder (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite an export already in --out")
    p.add_argument(
        "--storage",
        help="the storage of the study the export came from: the result is kept there as an artifact of that study "
        "(beside a local storage file), with its exports and reports",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override any config key (repeatable)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: the config's device")
    return p


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _per_class(text: str) -> int | None:
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'all', got {text!r}")
    return value


@_console_script
def finetune_main(argv: list[str] | None = None) -> int:
    parser = finetune_parser()
    args = parser.parse_args(argv)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be >= 1")
    if args.lr is not None and not args.lr > 0:
        parser.error("--lr must be > 0")
    if args.batch_size is not None and args.batch_size < 2:
        parser.error("--batch-size must be >= 2")
    if args.input_size is not None and args.input_size < 1:
        parser.error("--input-size must be >= 1")
    if args.unfreeze_stages is not None and args.unfreeze_stages < 0:
        parser.error("--unfreeze-stages must be >= 0")
    default = 0 if args.bn_mode == "adabn" else None  # adabn alone needs no labels; None is all
    per_class = getattr(args, "labels_per_class", default)

    def finetune() -> None:
        from nas.deploy.finetune import finetune

        cfg = load_run_config(args.config, [parse_override(text) for text in args.overrides], needs_space=False)
        finetune(
            args.model,
            cfg,
            mode=args.bn_mode,
            out=args.out,
            labels_per_class=per_class,
            epochs=args.epochs,
            seed=args.seed,
            lr=args.lr,
            batch_size=args.batch_size,
            unfreeze_stages=args.unfreeze_stages,
            weights=args.weights,
            strict=args.strict,
            mean=args.mean,
            std=args.std,
            input_size=args.input_size,
            device=args.device,
            force=args.force,
            storage=args.storage,
        )

    return _run(finetune)


def slim_parser() -> argparse.ArgumentParser:
    p = _parser(
        "slim",
        "Network slimming (Liu et al. 2017): channels are ranked by the |scale| of the BatchNorm on them and cut "
        "out of the convs, norms and linear layers that share them (Torch-Pruning's dependency graph), then the "
        "model is fine-tuned on the training split it was trained on, folded and exported like nas-export's "
        "(verified in a fresh process). model.json records what was removed and the parameters, MACs, CPU latency "
        "and test accuracy before and after.",
        "examples:\n  nas-slim --model exported/ --ratio 0.5 --out slim/\n"
        "  nas-slim --model exported/ --target-params 20000 --out slim/\n"
        "  nas-slim --model exported/ --sweep 0.3,0.5,0.7 --out sweep/   (one export per ratio, sweep.md/.csv/.png)",
    )
    p.add_argument("--model", required=True, help="an export folder written by nas-export, nas-finetune or nas-slim")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, help="share of the ranked channels to remove, in (0, 1)")
    how.add_argument(
        "--target-params", type=float, metavar="N", help="remove the fewest channels that leave <= N parameters"
    )
    how.add_argument(
        "--target-macs", type=float, metavar="N", help="... that leave <= N multiply-accumulates per sample"
    )
    how.add_argument(
        "--target-latency",
        type=float,
        metavar="MS",
        help="... that bring the CPU latency at the first --batch-sizes to <= MS",
    )
    how.add_argument("--sweep", metavar="R,R,...", help="several ratios: one export per ratio and the trade-off table")
    p.add_argument(
        "--scope",
        choices=SLIM_SCOPES,
        default="global",
        help="global: one threshold over every layer (Liu et al.); layer: the same share of every layer "
        "(default %(default)s)",
    )
    p.add_argument(
        "--finetune-epochs",
        type=int,
        metavar="E",
        help="fine-tuning epochs after the cut (default: the export's; 0: none)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the fine-tuning batch order (default %(default)s)")
    p.add_argument(
        "--config",
        help="run config whose dataset the model was trained on (default: the dataset model.json records)",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config key"
    )
    p.add_argument(
        "--batch-sizes", default="1,64", help="latency measured at these, comma-separated (default %(default)s)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="CPU threads the latency is timed with (default %(default)s)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="fine-tuning device (default: the config's)")
    p.add_argument("--out", default="slimmed", help="output folder (default %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite what --out already holds")
    return p


@_console_script
def slim_main(argv: list[str] | None = None) -> int:
    parser = slim_parser()
    args = parser.parse_args(argv)
    sizes = _numbers(parser, "--batch-sizes", args.batch_sizes, int)
    if min(sizes) < 1 or args.threads < 1 or (args.finetune_epochs is not None and args.finetune_epochs < 0):
        parser.error("--batch-sizes must be positive integers, --threads >= 1, --finetune-epochs >= 0")
    targets = {"params": args.target_params, "macs": args.target_macs, "latency_ms": args.target_latency}
    target = next(((kind, value) for kind, value in targets.items() if value is not None), None)
    if target is not None and not target[1] > 0:
        parser.error(f"--target-{target[0].split('_')[0]} must be > 0")

    def slim() -> None:
        from nas.deploy.slim import slim

        slim(
            args.model,
            args.out,
            ratio=args.ratio,
            target=target,
            sweep=None if args.sweep is None else _numbers(parser, "--sweep", args.sweep, float),
            scope=args.scope,
            finetune_epochs=args.finetune_epochs,
            seed=args.seed,
            config=args.config,
            overrides=[parse_override(text) for text in args.overrides],
            device=args.device,
            batch_sizes=sizes,
            threads=args.threads,
            force=args.force,
        )

    return _run(slim)


def dashboard_parser() -> argparse.ArgumentParser:
    from nas.dashboard.security import SESSION_IDLE, SESSION_LIFETIME  # light: no web framework imported

    p = _parser("dashboard", "List and detail pages, Resume / Stop / Export best, and optuna-dashboard under /optuna/.")
    p.add_argument("--storage", default=_storage_default(), help=STORAGE_HELP)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default %(default)s, or ::1; any other needs a token)"
    )
    p.add_argument("--port", type=int, default=8080, help="default %(default)s; 0 picks a free port")
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="file holding the secret every request must carry (open the printed "
        "...?token= address once); or set BNNAS_DASHBOARD_TOKEN. Needed for any --host but loopback",
    )
    p.add_argument(
        "--token", help="the secret itself (visible to every user in ps: prefer --token-file or BNNAS_DASHBOARD_TOKEN)"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="another Host name browsers use to reach it (repeatable)",
    )
    p.add_argument("--workdir", default="runs/dashboard", help="worker logs and exports (default %(default)s)")
    p.add_argument(
        "--idle-timeout",
        type=int,
        default=30,
        metavar="SECONDS",
        help="close a connection that sent or received nothing for this long (default %(default)s)",
    )
    p.add_argument(
        "--session-idle",
        type=int,
        default=SESSION_IDLE,
        metavar="SECONDS",
        help="token mode: a login unused this long ends (default %(default)s; an open page keeps it in use)",
    )
    p.add_argument(
        "--session-lifetime",
        type=int,
        default=SESSION_LIFETIME,
        metavar="SECONDS",
        help="token mode: a login ends this long after it began, however used (default %(default)s)",
    )
    p.add_argument(
        "--trusted-proxy",
        metavar="ADDR",
        help="the address of the TLS reverse proxy in front: its "
        "X-Forwarded-Proto alone is believed (https: the session cookie is Secure). "
        "Beyond loopback, serve behind one",
    )
    return p


@_console_script
def dashboard_main(argv: list[str] | None = None) -> int:
    parser = dashboard_parser()
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if args.idle_timeout < 1:
        parser.error("--idle-timeout must be >= 1")
    for flag in ("session_idle", "session_lifetime"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")

    def dashboard() -> None:
        from nas.dashboard.security import Sessions, read_token, require_token_beyond_loopback

        token = read_token(args.token, args.token_file)
        require_token_beyond_loopback(args.host, token)  # before the slow imports below
        if args.token is not None:
            print(
                "nas-dashboard: --token shows the secret to every user of this machine (ps); "
                "prefer --token-file PATH or BNNAS_DASHBOARD_TOKEN",
                file=sys.stderr,
            )
        from nas.dashboard.server import serve

        serve(
            args.storage,
            args.host,
            args.port,
            token,
            args.workdir,
            args.allow_host,
            args.idle_timeout,
            sessions=Sessions(args.session_idle, args.session_lifetime),
            trusted_proxy=args.trusted_proxy,
        )

    return _run(dashboard)


SEARCH_ONLY = ("study.trials", "study.timeout", "study.budget", "study.stop_after", *WARM_START_KEYS)
COMPARE_SHORTCUTS = {
    flag: key for flag, key in SHORTCUTS.items() if key not in SEARCH_ONLY
}  # budgets: --trials-per-cell; every cell starts afresh


def compare_parser() -> argparse.ArgumentParser:
    p = _parser(
        "compare",
        "Every combination of the factors' levels (a cell) is its own study in the storage, searching the rest of "
        "the space with the config's sampler for exactly --trials-per-cell trials; each cell's best spec is then "
        "cross-validated under --seeds fresh seeds (the same for every cell: paired), and every pair of cells is "
        "tested (paired t-test, Bonferroni-corrected over all pairs); a cell is worse when shown worse than some "
        "other. A cell whose search stops short of its budget is marked. The same command resumes an interrupted "
        "comparison (never with a smaller --trials-per-cell than a cell holds).",
        """a factor is
  KEY                    a search-space key: its levels are the key's choices (or --levels KEY=A,B)
  FILE.yaml | NAME=FILE.yaml   named variants: each name maps to a small override of the space

examples:
  nas-compare --factor block.norm.type --factor block.norm.position --trials-per-cell 10 --seeds 5
  nas-compare --config configs/digits_shifted.yaml --factor training.batch_size --levels training.batch_size=4,8,32 \\
              --factor block.norm.type --out runs/compare
  nas-compare --factor regularizer=experiments/compare_regularizers_shifted/variants.yaml --out runs/regularizers""",
    )
    p.add_argument("--config", help="run config YAML (default: the embedded configs/digits.yaml)")
    p.add_argument(
        "--factor",
        action="append",
        default=[],
        required=True,
        metavar="KEY|FILE.yaml|NAME=FILE.yaml",
        help="a factor (repeatable)",
    )
    p.add_argument(
        "--levels",
        action="append",
        default=[],
        metavar="FACTOR=A,B",
        help="the levels of a factor to compare (repeatable)",
    )
    p.add_argument("--trials-per-cell", type=int, default=20, help="search budget of every cell (default %(default)s)")
    p.add_argument(
        "--seeds",
        type=int,
        default=5,
        help="fresh seeds each cell's best is re-evaluated with (default %(default)s; at least 2)",
    )
    p.add_argument("--out", help="folder for compare.md, compare.json and compare.png")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override any config key (repeatable)",
    )
    _shortcut_arguments(
        p,
        COMPARE_SHORTCUTS,
        "shortcuts (each overrides one config key; --study names the cells' studies: STUDY[levels])",
    )
    _progress_arguments(p, "never show progress bars (a line per trial instead)")
    return p


@_console_script
def compare_main(argv: list[str] | None = None) -> int:
    parser = compare_parser()
    args = parser.parse_args(argv)
    if args.trials_per_cell < 1:
        parser.error("--trials-per-cell must be >= 1")
    if args.seeds < 2:
        parser.error("--seeds must be >= 2 (an interval and a test need two re-evaluations at least)")

    def compare() -> None:
        import shlex

        from nas.compare.report import text_table, write
        from nas.compare.run import parse_factors, run_comparison

        cfg = load_run_config(args.config or DEFAULT_CONFIG, _overrides(args, COMPARE_SHORTCUTS))
        factors = parse_factors(cfg, args.factor, args.levels)
        if args.out:
            from nas.deploy.export import check_writable

            check_writable(Path(args.out))
        result = run_comparison(cfg, factors, args.trials_per_cell, args.seeds, args.progress)
        print(text_table(result))
        if args.out:
            command = shlex.join(["nas-compare", *(sys.argv[1:] if argv is None else argv)])
            for path in write(result, args.out, command):
                status(f"wrote {path}")

    return _run(compare)


def predict_parser() -> argparse.ArgumentParser:
    p = _parser(
        "predict",
        "Every input is preprocessed from its raw form by model.json's recipe (scale, mean / std, "
        "layout); the model file's sha256 is checked before it loads. A shape or channel count the model "
        "does not take is refused. By default no code from the folder runs: the model is rebuilt from "
        "model.json's arch and weights.pt, loaded as data.",
        "runtimes:\n"
        "  eager  bnnas builds model.json's arch, loads weights.pt (torch.load weights_only=True), folds BN\n"
        "  onnx   model.onnx in onnxruntime (a graph, no Python; needs the onnx extra)\n"
        "  ts     model.ts, TorchScript: code, loaded only from a folder you trust like a script\n"
        "  pt2    model.pt2, torch.export (its loader unpickles): code, likewise\n"
        "With BNNAS_EXPORT_KEY set, a folder whose model.sig was not made with that key is refused.\n"
        "example:\n  nas-predict --model exported/ digit.png samples.npy",
    )
    p.add_argument("--model", required=True, help="an export folder written by nas-export (or nas-finetune)")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files (.png, .jpg) or .npy / .npz arrays of raw samples"
    )
    p.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        default="eager",
        help="how the model runs (default %(default)s: no code from the folder; see runtimes below)",
    )
    p.add_argument("--top", type=int, default=1, help="classes shown per input (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a line per input")
    return p


@_console_script
def predict_main(argv: list[str] | None = None) -> int:
    parser = predict_parser()
    args = parser.parse_args(argv)
    if args.top < 1:
        parser.error("--top must be >= 1")

    def predict() -> None:
        from nas.deploy.export import code_note
        from nas.deploy.predict import CODE_RUNTIMES, RUNTIMES, format_predictions, predict

        if args.runtime in CODE_RUNTIMES:
            print(code_note(args.model, [RUNTIMES[args.runtime]]), file=sys.stderr)
        predictions, meta = predict(args.model, args.inputs, args.runtime, args.top)
        if "batch_dependent" in meta:
            print(meta["batch_dependent"]["message"], file=sys.stderr)
        print(format_predictions(predictions, args.json))

    return _run(predict)


def storage_proxy_parser() -> argparse.ArgumentParser:
    p = _parser(
        "storage-proxy",
        "Workers, the dashboard and reports then take --storage grpc://HOST:PORT "
        "(grpcs:// with TLS). Whoever reaches the port could read, rewrite and delete every study, so beyond "
        "loopback the proxy serves only callers with its token (BNNAS_PROXY_TOKEN or --token-file here, "
        "BNNAS_PROXY_TOKEN on every client) or a client certificate signed by --tls-client-ca (clients: "
        "grpcs:// with BNNAS_PROXY_TLS_CA, BNNAS_PROXY_TLS_CERT, BNNAS_PROXY_TLS_KEY). Without TLS the token "
        "crosses the network in clear.",
        "example:\n  export BNNAS_PROXY_TOKEN=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')\n"
        "  nas-storage-proxy --storage postgresql+psycopg2://nas:PASSWORD@db/nas --host 10.0.0.5 \\\n"
        "      --port 13000 --tls-cert proxy.pem --tls-key proxy.key --tls-client-ca cluster-ca.pem",
    )
    p.add_argument(
        "--storage",
        default=os.environ.get(STORAGE_ENV),
        required=not os.environ.get(STORAGE_ENV),
        help=f"the storage URL the proxy serves (SQLite, PostgreSQL, MySQL; default ${STORAGE_ENV})",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default %(default)s); any other than loopback "
        "needs a token or client certificates, or --insecure",
    )
    p.add_argument("--port", type=int, default=13000, help="default %(default)s")
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="a file holding the token every call must carry "
        "(default: $BNNAS_PROXY_TOKEN; at least 16 characters; never on the command line)",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="the proxy's TLS certificate (clients then use grpcs://)")
    p.add_argument("--tls-key", metavar="PEM", help="the key of --tls-cert")
    p.add_argument("--tls-client-ca", metavar="PEM", help="accept only clients whose certificate this CA signed")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="INSECURE: serve a non-loopback --host without "
        "authentication; anyone who reaches the port can then read, rewrite and delete every study",
    )
    return p


@_console_script
def storage_proxy_main(argv: list[str] | None = None) -> int:
    parser = storage_proxy_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error("--port must be between 1 and 65535")

    def serve() -> None:
        from nas.cluster.proxy_server import serve_storage_proxy

        serve_storage_proxy(
            args.storage,
            args.host,
            args.port,
            token_file=args.token_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            tls_client_ca=args.tls_client_ca,
            insecure=args.insecure,
        )

    return _run(serve)


def _run(action) -> int:
    """Run a command body; the one place errors become exit codes."""
    try:
        action()
    except NasError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    except VerificationError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except Terminated:
        print("terminated (SIGTERM); rerun the same command to resume", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


COMMANDS = {
    "search": search_main,
    "report": report_main,
    "export": export_main,
    "bench": bench_main,
    "finetune": finetune_main,
    "slim": slim_main,
    "dashboard": dashboard_main,
    "compare": compare_main,
    "predict": predict_main,
    "storage-proxy": storage_proxy_main,
}

PARSERS = {  # each command's parser, built without torch (tests hold it)
    "search": search_parser,
    "report": report_parser,
    "export": export_parser,
    "bench": bench_parser,
    "finetune": finetune_parser,
    "slim": slim_parser,
    "dashboard": dashboard_parser,
    "compare": compare_parser,
    "predict": predict_parser,
    "storage-proxy": storage_proxy_parser,
}


class _CommandList(argparse.RawDescriptionHelpFormatter):
    """Each command's summary on one line, all starting in one column: argparse measures sub-command names two
    columns short of where it prints them, which pushed storage-proxy's summary to the next line."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=24, width=200)
        self._action_max_length = max(map(len, COMMANDS)) + 6  # the names' indent under "commands:"


def main_parser() -> argparse.ArgumentParser:
    """`python -m nas`: one sub-command per console script; each parses its own arguments (its usage says
    `python -m nas COMMAND`)."""
    p = _Parser(
        prog="python -m nas",
        description="Every console script of bnnas (nas-COMMAND), run with this interpreter; "
        "python -m nas COMMAND --help for one.",
        epilog=EXIT_CODES,
        formatter_class=_CommandList,
    )
    p.add_argument("--version", action="version", version=f"bnnas {nas.__version__}")
    commands = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name in COMMANDS:
        command = commands.add_parser(name, help=SUMMARIES[name], add_help=False, prefix_chars="\0")
        command.add_argument("args", nargs=argparse.REMAINDER)  # the command's own parser reads them
    return p


@_console_script
def main(argv: list[str] | None = None) -> int:
    """`python -m nas COMMAND ARGS...`: the console scripts without relying on installed scripts."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or (argv[0] not in COMMANDS and not argv[0].startswith("-")):
        what = f"unknown command '{argv[0]}'" if argv else "give a command"
        hint = did_you_mean(argv[0], COMMANDS) if argv else "; python -m nas --help lists them"
        print(f"python -m nas: {what} (known: {_names(COMMANDS)}){hint}", file=sys.stderr)
        return 2
    args = main_parser().parse_args(argv)
    token = _UNDER_MAIN.set(f"python -m nas {args.command}")
    try:
        return COMMANDS[args.command](args.args)
    finally:
        _UNDER_MAIN.reset(token)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(search_main())
