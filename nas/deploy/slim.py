"""`nas-slim`: an export made smaller by network slimming, fine-tuned, measured and exported again.

Channels are ranked by their BatchNorm scale and cut out of the model for real (`nas.models.slimming`), so the
files written are smaller and faster, not masked. The cut model is fine-tuned on the training split of the data
the export was trained on (without the sparsity penalty, as Liu et al. fine-tune), folded and written like any
export; `removed_channels` in its model.json lets bnnas rebuild it from `arch` as data (`nas.deploy.export.rebuild`).
Parameters and MACs are counted on the folded models as deployed; latency is timed on the CPU with pinned threads,
the source and every slimmed model interleaved in one run (nas-bench's protocol, `nas.deploy.bench.time_variants`).
"""

from __future__ import annotations

import copy
import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nas.errors import NasError
from nas.models import slimming
from nas.models.bn_fold import fold_norms
from nas.models.costs import count_macs, count_params, median_latency_ms, pinned_threads
from nas.options import DEFAULT_THREADS
from nas.output import status

TARGETS = {"params": "--target-params", "macs": "--target-macs", "latency_ms": "--target-latency"}
SWEEP_FILES = ("sweep.md", "sweep.csv", "sweep.png")


@dataclass
class Cut:
    """One slimmed model: what was removed, and how it scores and costs."""

    ratio: float
    removed: dict[str, list[int]]
    model: nn.Module
    pruned: dict | None = None  # test loss / accuracy right after the cut, before fine-tuning
    finetuned: dict | None = None

    @property
    def folder_name(self) -> str:
        return f"ratio-{self.ratio:.2f}"


def costs(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """Parameters and MACs of `model` as it deploys (norms folded)."""
    folded = fold_norms(model.eval())
    return {"params": count_params(folded), "macs": count_macs(folded, input_shape)}


def source_config(meta: dict, model_dir: Path, config: str | None, overrides: list):
    """The run config whose dataset the export was trained on: `config` when given, else the dataset model.json
    records (an export older than that record names only a bundled dataset that needs no root)."""
    from nas.search.config import load_run_config

    if config is not None:
        return load_run_config(config, overrides, needs_space=False)
    dataset = meta.get("dataset_config") or {"name": meta.get("dataset")}
    if dataset.get("name") is None:
        raise NasError(
            f"--config: {model_dir / 'model.json'} records no dataset; give the run config it was trained on"
        )
    stored = {"dataset": dataset, "space": None, "source": str(model_dir / "model.json")}
    return load_run_config(None, overrides, stored=stored, needs_space=False)


def check_same_dataset(meta: dict, cfg, model_dir: Path) -> None:
    """Refuse to fine-tune on other data than the export's (another transform, split or label budget): the
    fingerprint covers the source arrays, these keys what is made of them."""
    from nas.study.contract import DATASET_KEYS, HOST_KEYS, show

    recorded = meta.get("dataset_config")
    if recorded is None:
        return
    # the study contract's dataset keys, less where the files are (this host's) and augment (how training draws)
    for key in (k for k in DATASET_KEYS if k not in HOST_KEYS and k != "augment"):
        here = getattr(cfg.dataset, key)
        if key in recorded and recorded[key] != here:
            raise NasError(
                f"{cfg.where('dataset.' + key)}: dataset.{key}: {show(here)} here, {show(recorded[key])} in the data "
                f"{model_dir} was trained on; nas-slim fine-tunes on that data (nas-finetune adapts a model to other "
                "data)"
            )


def target_ratio(
    source: nn.Module, found: slimming.Survey, input_shape, scope: str, kind: str, value: float, measure
) -> float:
    """The smallest ratio whose cut model's `kind` (params, macs, latency_ms by `measure`) is at most `value`:
    a bisection over the ratios that keep a channel in every layer (the costs only fall as channels go)."""
    if scope == "global":
        steps = [k / found.channels for k in range(round(slimming.largest_ratio(found) * found.channels) + 1)]
    else:
        steps = [i / 100 for i in range(100) if i / 100 <= slimming.largest_ratio(found, scope)]

    def cost(ratio: float) -> float:
        cut = slimming.remove_channels(copy.deepcopy(source), input_shape, slimming.plan(found, ratio, scope))
        return measure(cut) if kind == "latency_ms" else costs(cut, input_shape)[kind]

    flag, unit = TARGETS[kind], {"latency_ms": " ms"}.get(kind, "")
    start = cost(0.0)
    if start <= value:
        raise NasError(f"{flag} {value:g}: the model already has {start:,.4g}{unit}; nothing to remove")
    smallest = cost(steps[-1])
    if smallest > value:
        raise NasError(
            f"{flag} {value:g}: cannot be met: removing the most channels that keeps one in every layer (ratio "
            f"{steps[-1]:.3f}, scope {scope}) still leaves {smallest:,.4g}{unit}"
        )
    low, high = 0, len(steps) - 1  # cost(steps[low]) > value >= cost(steps[high])
    while high - low > 1:
        mid = (low + high) // 2
        if cost(steps[mid]) <= value:
            high = mid
        else:
            low = mid
    return steps[high]


def latency_of(model: nn.Module, input_shape, batch_size: int, threads: int) -> float:
    """Median CPU ms of the folded model at `batch_size` (the latency target's measure)."""
    return median_latency_ms(fold_norms(model.eval()), tuple(input_shape), torch.device("cpu"), batch_size, threads)


def time_side_by_side(models: dict[str, nn.Module], input_shape, batch_sizes: list[int], threads: int) -> list[dict]:
    """nas-bench's protocol: every model folded, timed in turn per repeat, on the CPU with pinned threads."""
    from nas.deploy.bench import time_variants

    folded = {name: fold_norms(model.eval()) for name, model in models.items()}
    with pinned_threads(threads):
        return time_variants(folded, input_shape, batch_sizes, "cpu")


def by_model(rows: list[dict]) -> dict[str, dict]:
    """`time_variants` rows as model -> batch size -> median / p10 / p90 ms (model.json's `latency`)."""
    latency: dict[str, dict] = {}
    for r in rows:
        latency.setdefault(r["variant"], {})[str(r["batch_size"])] = {
            k: r[k] for k in ("median_ms", "p10_ms", "p90_ms")
        }
    return latency


def check_outputs(model_dir: Path, out: Path, ratios: list[float] | None, force: bool) -> None:
    """Refuse, before any work, an --out that is the source or holds what this run would overwrite."""
    from nas.deploy.export import check_writable

    if out.resolve() == model_dir.resolve():
        raise NasError(f"--out: {out} is the source model's folder; write the slimmed model elsewhere")
    if ratios is None:
        check_writable(out, force)
        return
    existing = [name for name in SWEEP_FILES if (out / name).exists()]
    if existing and not force:
        raise NasError(f"--out: {out} already holds a sweep ({', '.join(existing)}); choose another folder or --force")
    for ratio in ratios:
        check_writable(out / f"ratio-{ratio:.2f}", force)


def slim(
    model_dir: str | Path,
    out: str | Path,
    *,
    ratio: float | None = None,
    target: tuple[str, float] | None = None,
    sweep: list[float] | None = None,
    scope: str = "global",
    finetune_epochs: int | None = None,
    seed: int = 0,
    config: str | None = None,
    overrides: list = (),
    device: str | None = None,
    batch_sizes: list[int] = (1, 64),
    threads: int = DEFAULT_THREADS,
    force: bool = False,
    log: Callable[[str], None] = status,
) -> Path:
    """Slim the export in `model_dir` by one `ratio`, to one `target` (kind, value), or at every ratio of `sweep`;
    write the export(s) to `out` (a sweep: one folder per ratio plus the trade-off table and plot)."""
    from nas.deploy.bench import spread_warnings
    from nas.deploy.export import check_same_data, load_meta
    from nas.deploy.finetune import from_export
    from nas.training.train import resolve_device

    model_dir, out = Path(model_dir), Path(out)
    if sum(x is not None for x in (ratio, target, sweep)) != 1:
        raise NasError("give one of --ratio, --target-params, --target-macs, --target-latency or --sweep")
    for r in [ratio] if ratio is not None else sweep or []:
        if not 0 < r < 1:
            raise NasError(f"--{'ratio' if sweep is None else 'sweep'}: {r:g} is not a share of channels in (0, 1)")
    check_outputs(model_dir, out, sweep, force)
    meta = load_meta(model_dir)
    cfg = source_config(meta, model_dir, config, list(overrides))
    check_same_dataset(meta, cfg, model_dir)
    dev = resolve_device(device or cfg.device)
    start = from_export(model_dir, cfg, dev)
    data, source = start.data, start.model.cpu().eval()
    check_same_data(meta.get("data"), data.fingerprint, f"{model_dir} was trained on")
    shape = tuple(data.input_shape)
    found = slimming.survey(source, shape)
    slimming.check_prunable(found)
    log(f"{model_dir}: {slimming.explain(found)}")
    if target is not None:
        kind, value = target
        measure = lambda m: latency_of(m, shape, batch_sizes[0], threads)  # noqa: E731
        ratio = target_ratio(source, found, shape, scope, kind, value, measure)
        log(f"{TARGETS[kind]} {value:g}: ratio {ratio:.3f} (scope {scope}) is the smallest that meets it")
    ratios = sweep or [ratio]
    plans = [slimming.plan(found, r, scope) for r in ratios]  # every ratio checked before anything trains
    hp = {**meta["arch"]["training"], "bn_sparsity": 0.0}
    epochs = meta.get("epochs", cfg.evaluation.epochs) if finetune_epochs is None else finetune_epochs
    cuts = [finetune_cut(source, r, removed, data, hp, epochs, seed, dev, log) for r, removed in zip(ratios, plans)]
    rows = time_side_by_side(
        {"source": source, **{f"ratio {c.ratio:.2f}": c.model for c in cuts}}, shape, list(batch_sizes), threads
    )
    for warning in spread_warnings(rows):
        log(warning)
    latency = by_model(rows)
    before = {**costs(source, shape), "latency": latency["source"], "test": meta.get("test")}
    common = {
        "source": str(model_dir),
        "scope": scope,
        "target": None if target is None else {"kind": target[0], "value": target[1]},
        "finetune_epochs": epochs,
        "seed": seed,
        "threads": threads,
        "ranked": slimming.explain(found),
        "before": before,
    }
    table = []
    for cut in cuts:
        folder = out if sweep is None else out / cut.folder_name
        after = {**costs(cut.model, shape), "latency": latency[f"ratio {cut.ratio:.2f}"]}
        write_cut(cut, found, start.meta, {**common, "ratio": cut.ratio, "after": after}, data, folder, log)
        table.append({"ratio": cut.ratio, **after, "pruned": cut.pruned, "finetuned": cut.finetuned})
        log(summary_line(cut, before, after, batch_sizes))
    if sweep is not None:
        write_sweep(out, before, table, list(batch_sizes), threads, log)
    return out


def finetune_cut(source, ratio, removed, data, hp, epochs, seed, dev, log) -> Cut:
    """Cut `removed` out of a copy of `source`, score it, fine-tune it on the whole training split, score it again."""
    from nas.training.train import evaluate, fit, prepare_model, scoring_batch_size

    model = slimming.remove_channels(copy.deepcopy(source), tuple(data.input_shape), removed)
    model = prepare_model(model, dev)
    scored_in = scoring_batch_size(model, hp)
    pruned = dict(zip(("loss", "accuracy"), evaluate(model, data.x_test, data.y_test, dev, scored_in)))
    if epochs > 0:
        torch.manual_seed(seed)
        everything = torch.arange(len(data.y_train), device=dev)
        fit(model, data, everything, None, hp, epochs, dev, seed=seed)
    finetuned = dict(zip(("loss", "accuracy"), evaluate(model, data.x_test, data.y_test, dev, scored_in)))
    log(
        f"ratio {ratio:.2f}: {sum(map(len, removed.values()))} channels removed; test accuracy "
        f"{pruned['accuracy']:.4f} after the cut, {finetuned['accuracy']:.4f} after {epochs} fine-tuning epochs"
    )
    model = model.to("cpu", memory_format=torch.contiguous_format).eval()
    return Cut(ratio, removed, model, pruned, finetuned)


def write_cut(cut: Cut, found: slimming.Survey, source_meta: dict, record: dict, data, folder: Path, log) -> None:
    """The slimmed model as an export: its test scores, what was removed (after any earlier slimming), the record."""
    from nas.deploy.export import VERIFY_SAMPLES, write_export

    keep = {k: v for k, v in source_meta.items() if k not in ("files", "fold_max_abs_diff", "versions", "onnx")}
    meta = {
        **keep,
        "removed_channels": [*source_meta.get("removed_channels", []), cut.removed],
        "test": {**cut.finetuned, "samples": len(data.y_test)},
        "slim": {**record, "pruned_test": cut.pruned, "removed": slimming.describe(found, cut.removed)},
    }
    write_export(cut.model, data.x_test[:VERIFY_SAMPLES].cpu(), meta, folder, log)


def summary_line(cut: Cut, before: dict, after: dict, batch_sizes) -> str:
    parts = [
        f"params {before['params']:,} -> {after['params']:,} ({after['params'] / before['params']:.2f}x)",
        f"MACs {before['macs']:,} -> {after['macs']:,} ({after['macs'] / before['macs']:.2f}x)",
    ]
    for b in map(str, batch_sizes):
        old, new = before["latency"][b]["median_ms"], after["latency"][b]["median_ms"]
        parts.append(f"latency at batch {b} {old:.3f} -> {new:.3f} ms ({new / old:.2f}x)")
    test = before.get("test") or {}
    accuracy = f"test accuracy {test['accuracy']:.4f} -> " if "accuracy" in test else "test accuracy "
    return f"ratio {cut.ratio:.2f}: " + ", ".join(parts) + f"; {accuracy}{cut.finetuned['accuracy']:.4f}"


def sweep_rows(before: dict, table: list[dict], batch_sizes: list[int]) -> list[dict]:
    """One flat row per model (the source first) for the CSV and the Markdown table."""
    source = {"ratio": 0.0, **before, "pruned": before.get("test"), "finetuned": before.get("test")}
    rows = []
    for entry in [source, *table]:
        row = {
            "ratio": entry["ratio"],
            "test_accuracy_pruned": (entry["pruned"] or {}).get("accuracy"),
            "test_accuracy": (entry["finetuned"] or {}).get("accuracy"),
            "params": entry["params"],
            "macs": entry["macs"],
        }
        for b in map(str, batch_sizes):
            timing = entry["latency"][b]
            row[f"latency_ms_b{b}"] = timing["median_ms"]
            row[f"latency_p10_p90_b{b}"] = f"{timing['p10_ms']:.3f}-{timing['p90_ms']:.3f}"
        rows.append(row)
    return rows


def write_sweep(out: Path, before: dict, table: list[dict], batch_sizes: list[int], threads: int, log) -> None:
    """sweep.csv, sweep.md and sweep.png: ratio against test accuracy, parameters, MACs and measured latency."""
    from nas.output import atomic_write_text, text_table

    rows = sweep_rows(before, table, batch_sizes)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep.csv", buffer.getvalue())
    header = ["ratio", "test acc (cut)", "test acc", "params", "MACs"] + [
        f"ms @ batch {b} (p10-p90)" for b in batch_sizes
    ]
    lines = [header]
    for row in rows:
        cut = row["test_accuracy_pruned"]
        lines.append(
            [
                "source" if row["ratio"] == 0 else f"{row['ratio']:.2f}",
                "" if cut is None or row["ratio"] == 0 else f"{cut:.4f}",
                "" if row["test_accuracy"] is None else f"{row['test_accuracy']:.4f}",
                f"{row['params']:,}",
                f"{row['macs']:,}",
                *(f"{row[f'latency_ms_b{b}']:.3f} ({row[f'latency_p10_p90_b{b}']})" for b in batch_sizes),
            ]
        )
    text = (
        "# nas-slim sweep\n\n```\n" + "\n".join(text_table(lines)) + "\n```\n\n"
        f"Latency: folded models on the CPU, {threads} thread(s), timed interleaved in one run (median, p10-p90). "
        "Parameters and MACs of the folded models as written. test acc (cut): right after the channels were "
        "removed, before fine-tuning.\n"
    )
    atomic_write_text(out / "sweep.md", text)
    plot_sweep(rows, batch_sizes, out / "sweep.png")
    log(f"Wrote {out}/sweep.md, sweep.csv, sweep.png")
    log(text.split("```")[1].strip("\n"))


def plot_sweep(rows: list[dict], batch_sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = [r["ratio"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(ratios, [r["test_accuracy"] for r in rows], "o-", label="fine-tuned")
    axes[0].plot(ratios[1:], [r["test_accuracy_pruned"] for r in rows[1:]], "x--", label="cut, not fine-tuned")
    axes[0].set(xlabel="share of ranked channels removed", ylabel="test accuracy")
    axes[0].legend(fontsize=8)
    base = rows[0]
    axes[1].plot(ratios, [r["params"] / base["params"] for r in rows], "o-", label="parameters")
    axes[1].plot(ratios, [r["macs"] / base["macs"] for r in rows], "s-", label="MACs")
    axes[1].set(xlabel="share of ranked channels removed", ylabel="of the source")
    axes[1].legend(fontsize=8)
    for b in batch_sizes:
        key = f"latency_ms_b{b}"
        axes[2].plot(ratios, [r[key] / base[key] for r in rows], "o-", label=f"batch {b}")
    axes[2].set(xlabel="share of ranked channels removed", ylabel="CPU latency, of the source")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("nas-slim: network slimming by BatchNorm scale")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
