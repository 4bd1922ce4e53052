"""Measure what a model costs at inference: MACs, parameters, and latency measured side by side.

Why this room exists: BatchNorm is cheap in FLOPs but not free at inference. Run eagerly and
unfolded, every BN is one more kernel launch and one more pass over the activations; folded
into the preceding conv it costs nothing; TorchScript and torch.export remove the Python
overhead around each layer. Which of these matters depends on the model and the batch size,
so it is measured, not assumed: `time_variants` times every variant ("eager unfolded", "eager
folded", "torchscript", "torch.export") in one run and reports each one's ratio to the first.
An export folder's TorchScript and torch.export files are code, so `bench_export` times them
only when told the folder is trusted.

CPU latency depends on how many threads run it and on what else the machine does: the thread
count is pinned (`pinned_threads`, printed), and a spread (p90 / p10) above `SPREAD_LIMIT` is
reported as a warning that the figure cannot be trusted rather than printed as if it could.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from nas.models.costs import (
    Variant,
    check_counts,
    count_macs,
    count_params,
    eval_mode,
    latency_summary,
    pinned_threads,
    synchronizer,
    time_call,
)
from nas.options import DEFAULT_THREADS, SPREAD_LIMIT
from nas.output import text_table


def time_variants(
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
        raise ValueError("time_variants needs at least one variant")
    check_counts(warmup, repeats)
    device = torch.device(device)
    sync = synchronizer(device)
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
                    seconds[name].append(time_call(fn, x, sync))
        stats = {name: latency_summary(s, batch_size) for name, s in seconds.items()}
        baseline = next(iter(stats.values()))["median_ms"]
        for name, s in stats.items():
            rows.append(
                {"variant": name, "batch_size": batch_size, **s, "ratio_to_baseline": s["median_ms"] / baseline}
            )
    return rows


def format_table(rows: list[dict], extra: dict | None = None) -> str:
    """`time_variants`' rows as a plain-text table, with `extra` facts (params, MACs) as lines above."""
    lines = [f"{key}: {value}" for key, value in (extra or {}).items()]
    table = [("variant", "batch", "median ms", "p10-p90 ms", "p90/p10", "samples/s", "ratio")]
    for r in rows:
        table.append(
            (
                r["variant"],
                str(r["batch_size"]),
                f"{r['median_ms']:.3f}",
                f"{r['p10_ms']:.3f}-{r['p90_ms']:.3f}",
                f"{r['spread']:.2f}" + (" !" if r["spread"] > SPREAD_LIMIT else ""),
                f"{r['throughput']:,.0f}",
                f"{r['ratio_to_baseline']:.2f}",
            )
        )
    body = text_table(table)
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
    return [
        f"warning: {len(wide)} of {len(rows)} rows (marked !) spread more than p90/p10 = {SPREAD_LIMIT} "
        f"(worst {worst['spread']:.1f}, {worst['variant']} at batch {worst['batch_size']}): the machine was busy or "
        "throttling, so those medians cannot be trusted; rerun with nothing else running, or with fewer --threads"
    ]


def bench_export(
    folder: str,
    device_name: str,
    batch_sizes: list[int],
    warmup: int,
    repeats: int,
    threads: int = DEFAULT_THREADS,
    log=print,
    trust_code: bool = False,
) -> str:
    """`nas-bench`: the ways to run an exported model, side by side, as a table (onnxruntime on CPU when
    the export has model.onnx). model.ts and model.pt2 are code, so they are timed only with `trust_code`;
    the eager variants are rebuilt from data (`nas.deploy.export.rebuild`)."""
    from nas.deploy.export import CODE_FILES, ONNX_FILE, load_code_file, load_exported, onnx_session, verified_bytes
    from nas.models.bn_fold import fold_norms
    from nas.training.train import resolve_device

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
        log(
            f"TorchScript and torch.export not timed: {' and '.join(CODE_FILES)} are code; --trust-code times them "
            "for a folder you trust like a script"
        )
    if ONNX_FILE not in exported.meta["files"]:
        log(f"onnxruntime not timed: {exported.meta.get('onnx', {}).get('reason', 'the export has no model.onnx')}")
    elif device.type != "cpu":
        log(
            "onnxruntime not timed: it runs on the CPU here (CPUExecutionProvider), the other variants on "
            + device.type
        )
    else:
        path = exported.folder / ONNX_FILE
        session = onnx_session(path, verified_bytes(exported.folder, exported.meta, ONNX_FILE), threads)
        name = session.get_inputs()[0].name
        variants["onnxruntime folded"] = lambda x: session.run(None, {name: x.numpy()})
    with pinned_threads(threads if device.type == "cpu" else None):
        rows = time_variants(variants, shape, batch_sizes, device, warmup, repeats)
        used = torch.get_num_threads()
    extra = {
        "model": (
            f"{folder} (study {exported.meta.get('study')}, trial {exported.meta.get('trial')}, input {list(shape)})"
        ),
        "device": f"{device.type}, torch {torch.__version__}, {used} CPU thread(s) (--threads)",
        "params": f"{count_params(unfolded):,} unfolded, {count_params(folded):,} folded",
        "MACs per sample": f"{count_macs(unfolded, shape):,} unfolded, {count_macs(folded, shape):,} folded",
    }
    return format_table(rows, extra)
