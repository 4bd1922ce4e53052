"""Benchmark: one candidate's k-fold evaluation with the folds trained one by one vs together.

Times `nas.training.cross_validation.cross_validate` end to end (models built, k folds trained, validated and
their BN diagnostics computed, as a trial of nas-search does) with `fold_mode` `sequential`
and `together`, alternating, repeated, in one run; prints median seconds and the ratio.

    .venv/bin/python scripts/bench_cv.py --device cpu --dataset digits
    .venv/bin/python scripts/bench_cv.py --device cuda --dataset cifar-shaped
    .venv/bin/python scripts/bench_cv.py --trial 7 --storage sqlite:///runs/nas.db --study digits-bn
    .venv/bin/python scripts/bench_cv.py --sample 8 --epochs 4     # 8 candidates of configs/digits.yaml's space
    .venv/bin/python scripts/bench_cv.py --step 80 --threads 1     # one training step alone

Targets: together >= 1.4x faster on CPU digits (k = 3); >= 3x on CUDA with CIFAR-shaped data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from nas.build import build
from nas.data import Dataset, load_dataset, stratified_folds
from nas.search import DatasetConfig, Space, default_spec, load_run_config
from nas.training import autocast, cross_validate, on_device_layout, resolve_device

# A representative digits CNN: two stages (32, 64 channels), BatchNorm after each conv.
SPEC = default_spec({"width": 32, "training": {"batch_size": 64}})
DIGITS_CONFIG = Path(__file__).parent.parent / "configs" / "digits.yaml"
DIGITS_EPOCHS = load_run_config(DIGITS_CONFIG).evaluation.epochs
TARGETS = {"digits": ("cpu", 1.4), "cifar-shaped": ("cuda", 3.0)}
MODES = ("sequential", "together")


def cifar_shaped(n: int, device: torch.device, seed: int = 0) -> Dataset:
    """n random normalized 3x32x32 images in 10 classes, augmented with crop and flip like CIFAR-10."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    return Dataset("cifar-shaped", x, y, x[:256], y[:256], [str(c) for c in range(10)], "crop_flip").to(device)


def candidate(args) -> dict:
    """The spec to time: --spec (JSON text or a file), a study's --trial, or SPEC."""
    if args.trial is not None:
        import optuna

        study = optuna.load_study(study_name=args.study, storage=args.storage)
        return study.trials[args.trial].user_attrs["arch"]
    if args.spec:
        text = args.spec if args.spec.lstrip().startswith("{") else open(args.spec).read()
        return json.loads(text)
    return SPEC


def run(
    spec: dict, data: Dataset, folds, epochs: int, device: torch.device, mode: str, every_epoch: bool = False
) -> tuple[float, float, dict]:
    """(wall seconds, this process's CPU seconds, score) of one k-fold evaluation."""
    start, cpu = time.perf_counter(), time.process_time()
    on_epoch = (lambda report: None) if every_epoch else None  # as nas-search with a progress bar or the median pruner
    score = cross_validate(spec, data, folds, epochs, device, on_epoch=on_epoch, fold_mode=mode)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu, score


def compare(spec: dict, data: Dataset, folds, args, device: torch.device) -> dict[str, dict[str, list[float]]] | None:
    """Wall and CPU seconds of every repeat in both modes, alternating; None if the spec cannot train together."""
    for mode in MODES:  # warm-up: allocator, cuDNN autotuning, lazy imports
        *_, score = run(spec, data, folds, 1, device, mode, args.every_epoch)
    if score["fold_mode"] != "together":
        print(f"this spec trains sequentially even when asked for together: {score.get('fold_mode_fallback')}")
        return None
    times = {"wall": {m: [] for m in MODES}, "cpu": {m: [] for m in MODES}}
    for r in range(args.repeats):  # alternate (and swap who goes first) so drift hits both alike
        for mode in MODES if r % 2 == 0 else MODES[::-1]:
            seconds, cpu_seconds, _ = run(spec, data, folds, args.epochs, device, mode, args.every_epoch)
            times["wall"][mode].append(seconds)
            times["cpu"][mode].append(cpu_seconds)
    return times


def print_one(times: dict, device: torch.device, dataset: str) -> None:
    """Median seconds, their ratio, each repeat's own ratio (robust to drift), and the target."""
    print(f"  {'median':>8} {'sequential s':>13} {'together s':>11} {'speed-up':>9}")
    ratios = {}
    for kind, label in (("wall", "wall"), ("cpu", "CPU")):  # CPU: the work alone, without waiting for a core
        seq, tog = (statistics.median(times[kind][m]) for m in MODES)
        ratios[kind] = seq / tog
        print(f"  {label:>8} {seq:13.3f} {tog:11.3f} {ratios[kind]:8.2f}x")
    wall = times["wall"]
    pairs = sorted(s / t for s, t in zip(wall["sequential"], wall["together"]))
    print(
        "  (wall, sequential: "
        + " ".join(f"{t:.3f}" for t in wall["sequential"])
        + "; together: "
        + " ".join(f"{t:.3f}" for t in wall["together"])
        + ")"
    )
    print(
        f"  speed-up of each repeat's pair: min {pairs[0]:.2f}x, median {statistics.median(pairs):.2f}x, "
        f"max {pairs[-1]:.2f}x"
    )
    ratio = ratios["wall"]
    target_device, target = TARGETS[dataset]
    if device.type == target_device:
        print(
            f"  target: together >= {target}x faster on {target_device}: {'met' if ratio >= target else 'NOT met'} "
            f"({ratio:.2f}x)"
        )
    else:
        print(f"  target: together >= {target}x faster on {target_device}: not measured here (device {device.type})")


def time_steps(spec: dict, data: Dataset, k: int, device: torch.device, rounds: int) -> None:
    """One training step of k fold models: one after another vs the stacked model, interleaved rounds.

    The step alone (forward, summed loss, backward, optimizer), without data indexing or
    augmentation: it tells the arithmetic apart from the loop's per-step work.
    """
    import torch.nn.functional as F

    from nas.models import stack
    from nas.training import fold_losses, make_optimizer, optimizer_for, prepare_model

    hp, bs = spec["training"], spec["training"]["batch_size"]
    gen = torch.Generator().manual_seed(0)
    picks = torch.randint(0, len(data.y_train), (k, bs), generator=gen).to(data.y_train.device)
    xs, ys = data.x_train[picks], data.y_train[picks]
    models = [prepare_model(build(spec, data.input_shape, data.num_classes), device) for _ in range(k)]
    optimizers = [make_optimizer(m, hp) for m in models]
    stacked = stack([build(spec, data.input_shape, data.num_classes) for _ in range(k)])
    model = prepare_model(stacked.model, device)
    optimizer = optimizer_for(*stacked.parameters_by_decay(), hp)
    x_stacked = on_device_layout(stacked.fold_input(xs), device)

    def one_by_one():
        for m, opt, x, y in zip(models, optimizers, xs, ys):
            with autocast(device):
                loss = F.cross_entropy(m(on_device_layout(x, device)).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    def together():
        with autocast(device):
            loss = fold_losses(model(x_stacked).float(), ys).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    steps = {"one by one": one_by_one, "stacked": together}
    times = {name: [] for name in steps}
    for r in range(rounds + 3):  # 3 warm-up rounds
        for name, step in steps.items() if r % 2 == 0 else reversed(steps.items()):
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= 3:
                times[name].append((time.perf_counter() - start) * 1e3)
    alone, stacked_ms = (statistics.median(times[name]) for name in steps)
    print(
        f"  one training step of {k} folds, median of {rounds} interleaved rounds: one by one {alone:.2f} ms, "
        f"stacked {stacked_ms:.2f} ms, {alone / stacked_ms:.2f}x"
    )


def sampled_candidates(config: str, n: int) -> list[dict]:
    """n ArchSpecs drawn at random (seed 0) from `config`'s search space: what a search trains."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = Space(load_run_config(config).space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return [space.sample(study.ask()) for _ in range(n)]


def describe(spec: dict) -> str:
    block = spec["stages"][0]["blocks"][0]
    norm = block["norm"]
    return (
        f"{len(spec['stages'])}x{len(spec['stages'][0]['blocks'])} w{spec['stages'][0]['width']} k{block['kernel']} "
        f"{norm['type']}{'@' + norm['position'] if 'position' in norm else ''} {spec['stages'][-1]['downsample']} "
        f"b{spec['training']['batch_size']}"
    )


def print_sample(specs: list[dict], data: Dataset, folds, args, device: torch.device) -> None:
    """One line per candidate, then the ratio of the summed medians: the speed-up of the whole search."""
    print(f"  {'candidate':40} {'sequential s':>13} {'together s':>11} {'speed-up':>9}")
    totals = dict.fromkeys(MODES, 0.0)
    for spec in specs:
        times = compare(spec, data, folds, args, device)
        if times is None:
            continue
        seq, tog = (statistics.median(times["wall"][m]) for m in MODES)
        totals["sequential"] += seq
        totals["together"] += tog
        print(f"  {describe(spec):40} {seq:13.3f} {tog:11.3f} {seq / tog:8.2f}x", flush=True)
    seq, tog = totals["sequential"], totals["together"]
    print(f"  {'all candidates (sum of medians)':40} {seq:13.3f} {tog:11.3f} {seq / tog:8.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dataset", default="digits", choices=list(TARGETS))
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument(
        "--epochs",
        type=int,
        default=DIGITS_EPOCHS,
        help="epochs per fold in each timed evaluation (default: configs/digits.yaml's, "
        "as a trial of the default search)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cifar-n", type=int, default=10000, help="number of generated CIFAR-shaped images")
    parser.add_argument("--spec", help="an ArchSpec as JSON text or a JSON file (default: a two-stage BatchNorm CNN)")
    parser.add_argument("--trial", type=int, help="time this trial's ArchSpec from --study in --storage")
    parser.add_argument(
        "--sample", type=int, metavar="N", help="time N candidates drawn from --config's search space instead of one"
    )
    parser.add_argument(
        "--config", default=str(DIGITS_CONFIG), help="the run config whose search space --sample draws from"
    )
    parser.add_argument(
        "--every-epoch",
        action="store_true",
        help="validate after every epoch, as nas-search does with a progress bar or the median pruner",
    )
    parser.add_argument(
        "--step",
        type=int,
        metavar="ROUNDS",
        help="instead: time one training step of the folds, one by one vs stacked, over ROUNDS interleaved rounds",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--study", default="digits-bn")
    parser.add_argument("--storage", default="sqlite:///runs/nas.db")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load_dataset(DatasetConfig(), device) if args.dataset == "digits" else cifar_shaped(args.cifar_n, device)
    folds = stratified_folds(data.y_train, args.folds, 0)
    specs = sampled_candidates(args.config, args.sample) if args.sample else [candidate(args)]
    timed = (
        f"{args.epochs} epochs, {args.repeats} repeats; timed: cross_validate end to end"
        f"{', validating every epoch' if args.every_epoch else ''}"
    )
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads; {args.dataset}: "
        f"{len(data.y_train)} samples of {data.input_shape}, {args.folds} folds"
        f"{'; timed: one training step' if args.step else ' x ' + timed}"
    )
    if args.sample:
        print_sample(specs, data, folds, args, device)
        return
    print(f"candidate: {describe(specs[0])}")
    if args.step:
        time_steps(specs[0], data, args.folds, device, args.step)
        return
    times = compare(specs[0], data, folds, args, device)
    if times is not None:
        print_one(times, device, args.dataset)


if __name__ == "__main__":
    main()
