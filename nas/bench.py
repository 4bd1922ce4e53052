"""Measure what a model costs at inference: MACs, parameters, and latency measured side by side.

Why this room exists: BatchNorm is cheap in FLOPs but not free at inference. Run eagerly and
unfolded, every BN is one more kernel launch and one more pass over the activations; folded
into the preceding conv it costs nothing; TorchScript and torch.export remove the Python
overhead around each layer. Which of these matters depends on the model and the batch size,
so it is measured, not assumed: `compare` times every variant ("eager unfolded", "eager
folded", "torchscript", "torch.export") in one run and reports each one's ratio to the first.
An export folder's TorchScript and torch.export files are code, so `bench_export` times them
only when told the folder is trusted.
Multi-objective search calls `measure_latency` on each candidate at a fixed batch size.

CPU latency depends on how many threads run it and on what else the machine does: the thread
count is pinned (`pinned_threads`, printed), and a spread (p90 / p10) above `SPREAD_LIMIT` is
reported as a warning that the figure cannot be trusted rather than printed as if it could.

MACs come from PyTorch's own `FlopCounterMode` (convolutions, linear layers, matmuls); norms,
activations and pooling are memory-bound, add no MACs, and show up only in the latency.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, contextmanager
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

Variant = Callable[[torch.Tensor], object]
DEFAULT_THREADS = 1  # CPU inference threads of nas-bench and the latency_ms objective: the same on every machine
SPREAD_LIMIT = 1.5  # p90 / p10 of the timed calls above this: the machine was busy, the median is not a figure


@contextmanager
def pinned_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to `threads` (None: left as they are), then given back."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def count_params(model: nn.Module) -> int:
    """Every parameter, trainable or not (at inference the flag means nothing); shared ones once."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of one sample of `input_shape` (no batch axis).

    The count follows from tensor shapes alone, so the pass runs wherever the model's
    parameters are (CPU for a fresh model) rather than moving the caller's model.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    x = torch.zeros(1, *input_shape, device=device, dtype=dtype)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() // 2  # one multiply-accumulate = two flops


@contextmanager
def eval_mode(model: object) -> Iterator[None]:
    """Run `model` in eval mode, then give every submodule back its own train/eval flag.

    Flags are set per submodule instead of calling `.eval()`: torch.export's modules refuse
    `.eval()` (their graph is fixed at export anyway), and restoring one flag per submodule
    keeps a mixed state (say, a frozen BN inside a training model) exactly as it was.
    Plain callables pass through untouched.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in model.modules() if hasattr(m, "training")]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _time_call(fn: Variant, x: torch.Tensor, sync: Callable[[], None]) -> float:
    """Seconds for one call, end to end.

    Wall clock between two synchronizations rather than CUDA events: events time only the
    GPU stream and miss the host-side Python and launch overhead before the first kernel,
    which is exactly what folding, TorchScript and torch.export change on small models.
    """
    sync()
    start = time.perf_counter()
    fn(x)
    sync()
    return time.perf_counter() - start


def _summary(seconds: list[float], batch_size: int) -> dict:
    ms = np.asarray(seconds) * 1e3
    p10, median, p90 = np.percentile(ms, [10, 50, 90])
    return {"median_ms": float(median), "p10_ms": float(p10), "p90_ms": float(p90), "spread": float(p90 / p10),
            "throughput": batch_size / (float(median) / 1e3)}


def _check_counts(warmup: int, repeats: int) -> None:
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")


def measure_latency(
    model: Variant,
    example: torch.Tensor,
    device: torch.device | str,
    warmup: int = 10,
    repeats: int = 50,
    min_seconds: float = 0.0,
) -> dict:
    """Milliseconds per call of `model(example)`: median, p10, p90, and samples per second.

    `model` is an nn.Module (eager, TorchScript, or a torch.export `.module()`) or any callable
    of one tensor; modules run in eval mode and get their flags back afterwards. `example`
    must already be on `device`; its first axis is the batch. Warm-up calls are not timed;
    each of the `repeats` timed calls is one call, and timing goes on past `repeats` until
    the timed calls add up to `min_seconds`.
    """
    _check_counts(warmup, repeats)
    sync = _synchronizer(torch.device(device))
    seconds: list[float] = []
    with eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            model(example)
        while len(seconds) < repeats or sum(seconds) < min_seconds:
            seconds.append(_time_call(model, example, sync))
    return _summary(seconds, example.shape[0] if example.dim() else 1)


def compare(
    variants: dict[str, Variant],
    input_shape: tuple[int, ...],
    batch_sizes: list[int],
    device: torch.device | str,
    warmup: int = 10,
    repeats: int = 50,
) -> list[dict]:
    """Time every variant at every batch size; one row per (variant, batch size).

    Each row has variant, batch_size, median_ms, p10_ms, p90_ms, throughput and
    ratio_to_baseline = median_ms / the first variant's median_ms at that batch size
    (below 1 is faster than the baseline; the baseline's own ratio is 1.0).
    """
    if not variants:
        raise ValueError("compare needs at least one variant")
    _check_counts(warmup, repeats)
    device = torch.device(device)
    sync = _synchronizer(device)
    rows = []
    for batch_size in batch_sizes:
        x = torch.randn(batch_size, *input_shape, device=device)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        with ExitStack() as stack:
            for fn in variants.values():
                stack.enter_context(eval_mode(fn))
            stack.enter_context(torch.inference_mode())
            for _ in range(warmup):
                for fn in variants.values():
                    fn(x)
            # Round-robin, one call of each variant per repeat, instead of all repeats of one
            # variant then all of the next: clock boosts, thermal throttling and background
            # load drift over seconds, and interleaving spreads that drift over every variant
            # alike, so the ratios stay fair even when the absolute times wander.
            for _ in range(repeats):
                for name, fn in variants.items():
                    seconds[name].append(_time_call(fn, x, sync))
        stats = {name: _summary(s, batch_size) for name, s in seconds.items()}
        baseline = next(iter(stats.values()))["median_ms"]
        for name, s in stats.items():
            rows.append({"variant": name, "batch_size": batch_size, **s, "ratio_to_baseline": s["median_ms"] / baseline})
    return rows


def format_table(rows: list[dict], extra: dict | None = None) -> str:
    """`compare`'s rows as a plain-text table, with `extra` facts (params, MACs) as lines above."""
    lines = [f"{key}: {value}" for key, value in (extra or {}).items()]
    table = [("variant", "batch", "median ms", "p10-p90 ms", "p90/p10", "samples/s", "ratio")]
    for r in rows:
        table.append((
            r["variant"],
            str(r["batch_size"]),
            f"{r['median_ms']:.3f}",
            f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}",
            f"{r['spread']:.2f}" + (" !" if r["spread"] > SPREAD_LIMIT else ""),
            f"{r['throughput']:,.0f}",
            f"{r['ratio_to_baseline']:.2f}",
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    body = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    body.insert(1, "  ".join("-" * w for w in widths))
    if rows:
        body.append(f"ratio = median ms / {rows[0]['variant']}'s median ms at the same batch size (below 1 is faster)")
    body.extend(spread_warnings(rows))
    return "\n".join(lines + body)


def spread_warnings(rows: list[dict]) -> list[str]:
    """One warning line when any row's timings spread too far to stand for the model (marked ! above)."""
    wide = [r for r in rows if r["spread"] > SPREAD_LIMIT]
    if not wide:
        return []
    worst = max(wide, key=lambda r: r["spread"])
    return [f"warning: {len(wide)} of {len(rows)} rows (marked !) spread more than p90/p10 = {SPREAD_LIMIT} "
            f"(worst {worst['spread']:.1f}, {worst['variant']} at batch {worst['batch_size']}): the machine was busy or "
            "throttling, so those medians cannot be trusted; rerun with nothing else running, or with fewer --threads"]


def candidate_costs(spec: dict, input_shape: tuple[int, ...], num_classes: int, device: torch.device,
                    batch_size: int, wanted: list[str], threads: int = DEFAULT_THREADS) -> dict:
    """The inference costs a multi-objective search asks for, of the candidate as it would deploy:
    folded, eval mode, on `device`, at a fixed batch size (weights do not change the cost), with
    `threads` CPU threads as nas-bench uses by default (the training's thread count would make
    the latency depend on the machine and on other workers)."""
    from nas.build import build
    from nas.fold import fold_norms

    model = fold_norms(build(spec, input_shape, num_classes)).to(device)
    costs = {}
    if "params" in wanted:
        costs["params"] = count_params(model)
    if "macs" in wanted:
        costs["macs"] = count_macs(model, input_shape)
    if "latency_ms" in wanted:
        example = torch.randn(batch_size, *input_shape, device=device)
        with pinned_threads(threads if device.type == "cpu" else None):
            costs["latency_ms"] = measure_latency(model, example, device, warmup=5, repeats=20)["median_ms"]
    return costs


def bench_export(folder: str, device_name: str, batch_sizes: list[int], warmup: int, repeats: int,
                 threads: int = DEFAULT_THREADS, log=print, trust_code: bool = False) -> str:
    """`nas-bench`: the ways to run an exported model, side by side, as a table (onnxruntime on CPU when
    the export has model.onnx). model.ts and model.pt2 are code, so they are timed only with `trust_code`;
    the eager variants are rebuilt from data (`nas.export.rebuild`)."""
    from nas.export import CODE_FILES, ONNX_FILE, load_code_file, load_exported, onnx_session, verified_bytes
    from nas.fold import fold_norms
    from nas.train import resolve_device

    device = resolve_device(device_name)
    exported = load_exported(folder)
    shape = tuple(exported.meta["input_shape"])
    unfolded = exported.model.to(device)
    folded = fold_norms(exported.model).to(device)
    variants = {"eager unfolded": unfolded, "eager folded": folded}
    if trust_code:
        variants["TorchScript folded"] = load_code_file(exported.folder, exported.meta, "model.ts", device)
        variants["torch.export folded"] = load_code_file(exported.folder, exported.meta, "model.pt2", device)
    else:
        log(f"TorchScript and torch.export not timed: {' and '.join(CODE_FILES)} are code; --trust-code times them "
            "for a folder you trust like a script")
    if ONNX_FILE not in exported.meta["files"]:
        log(f"onnxruntime not timed: {exported.meta.get('onnx', {}).get('reason', 'the export has no model.onnx')}")
    elif device.type != "cpu":
        log("onnxruntime not timed: it runs on the CPU here (CPUExecutionProvider), the other variants on " + device.type)
    else:
        path = exported.folder / ONNX_FILE
        session = onnx_session(path, verified_bytes(exported.folder, exported.meta, ONNX_FILE), threads)
        name = session.get_inputs()[0].name
        variants["onnxruntime folded"] = lambda x: session.run(None, {name: x.numpy()})
    with pinned_threads(threads if device.type == "cpu" else None):
        rows = compare(variants, shape, batch_sizes, device, warmup, repeats)
        used = torch.get_num_threads()
    extra = {
        "model": f"{folder} (study {exported.meta.get('study')}, trial {exported.meta.get('trial')}, input {list(shape)})",
        "device": f"{device.type}, torch {torch.__version__}, {used} CPU thread(s) (--threads)",
        "params": f"{count_params(unfolded):,} unfolded, {count_params(folded):,} folded",
        "MACs per sample": f"{count_macs(unfolded, shape):,} unfolded, {count_macs(folded, shape):,} folded",
    }
    return format_table(rows, extra)
