"""Transfer with a BatchNorm strategy: digits -> shifted digits, every bn-mode x labels per class.

Run from the repository root (CPU, a few minutes):

    .venv/bin/python experiments/transfer_bn_digits/run.py

Sources: the best plain-BatchNorm trial (35) and the best batch-renorm trial (59) of the committed
study experiments/bn_placement_digits/study.db, exported with nas-export into source_*/ (reused
when present). Target: configs/digits_shifted.yaml. Every run gets exactly the same number of
optimizer steps (STEPS: the epochs that reach it, cut at STEPS), so a small labelled set is not
also a shorter training. Writes results.csv (one
row per run), table.md (mean +- std over SEEDS) and table.png next to this file;
`run.py --table-only` rewrites table.md and table.png from results.csv.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STUDY = f"sqlite:///{REPO / 'experiments/bn_placement_digits/study.db'}"
SOURCES = {
    "batch @ pre_conv (trial 35)": ("source_batch", 35),
    "batch_renorm @ post_act (trial 59)": ("source_renorm", 59),
}
TARGET = REPO / "configs/digits_shifted.yaml"
CELLS = [("adabn", 0), *[(mode, k) for mode in ("freeze", "adabn", "bn-only", "full") for k in (5, 20, None)]]
SEEDS = (0, 1, 2)
STEPS = 150  # optimizer steps per run, whatever the labelled set's size


def epochs_for(samples: int, batch_size: int) -> int:
    return math.ceil(STEPS / max(1, samples // batch_size))


def run() -> list[dict]:
    from nas.cli import export_main
    from nas.data import load_dataset
    from nas.deploy import adapt, load_exported
    from nas.search import load_run_config

    torch.set_num_threads(1)  # tiny models: one thread is as fast, and does not stall on a busy machine
    cfg = load_run_config(TARGET)
    device = torch.device("cpu")
    rows = []
    for label, (folder, trial) in SOURCES.items():
        source = HERE / folder
        if not (source / "model.json").is_file():
            code = export_main(
                [
                    "--storage",
                    STUDY,
                    "--study",
                    "bn-placement-digits",
                    "--trial",
                    str(trial),
                    "--out",
                    str(source),
                    "--device",
                    "cpu",
                ]
            )
            if code:
                sys.exit(code)
        meta = load_exported(source).meta
        data = load_dataset(cfg.dataset, device, normalization=meta["normalization"])
        hp = meta["arch"]["training"]
        for mode, k in CELLS:
            for seed in SEEDS:
                samples = len(data.y_train) if k is None else k * data.num_classes
                epochs = epochs_for(samples, hp["batch_size"])
                result = adapt(load_exported(source).model, data, mode, k, epochs, seed, device, hp, max_steps=STEPS)
                rows.append(
                    {
                        "source": label,
                        "mode": mode,
                        "labels_per_class": "all" if k is None else k,
                        "seed": seed,
                        "train_samples": result.train_samples,
                        "epochs": result.epochs,
                        "before_accuracy": result.before["accuracy"],
                        "before_loss": result.before["loss"],
                        "accuracy": result.after["accuracy"],
                        "loss": result.after["loss"],
                    }
                )
                print(
                    f"{label:38s} {mode:8s} K={rows[-1]['labels_per_class']!s:4s} seed {seed}: accuracy "
                    f"{result.after['accuracy']:.4f} (before {result.before['accuracy']:.4f}), "
                    f"{result.seconds:.1f} s",
                    flush=True,
                )
    return rows


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def write_csv(rows: list[dict]) -> None:
    with open(HERE / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read_csv() -> list[dict]:
    with open(HERE / "results.csv", newline="") as f:
        return [
            {k: float(v) if k.endswith(("accuracy", "loss")) else v for k, v in row.items()}
            for row in csv.DictReader(f)
        ]


def write_tables(rows: list[dict]) -> None:
    ks = ["0", "5", "20", "all"]
    lines = [
        f"Target test split of shifted digits (360 images), mean ± std over seeds {', '.join(map(str, SEEDS))}; "
        f"{STEPS} optimizer steps per run; K = labelled target training samples per class (0: adabn alone, no labels).",
        "",
    ]
    for source in SOURCES:
        mine = [r for r in rows if r["source"] == source]
        lines += [
            f"### Source: {source}; no adaptation: accuracy {mine[0]['before_accuracy']:.3f}, loss "
            f"{mine[0]['before_loss']:.3f}",
            "",
        ]
        for metric in ("accuracy", "loss"):
            lines += [f"| {metric} | " + " | ".join(f"K = {k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
            for mode in ("freeze", "adabn", "bn-only", "full"):
                cells = []
                for k in ks:
                    values = [r[metric] for r in mine if r["mode"] == mode and str(r["labels_per_class"]) == k]
                    cells.append(mean_std(values) if values else "—")
                lines.append(f"| {mode} | " + " | ".join(cells) + " |")
            lines.append("")
    (HERE / "table.md").write_text("\n".join(lines))
    plot(rows, ks)


def plot(rows: list[dict], ks: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SOURCES), figsize=(5.5 * len(SOURCES), 4), sharey=True)
    for ax, source in zip(axes, SOURCES):
        mine = [r for r in rows if r["source"] == source]
        for mode in ("freeze", "adabn", "bn-only", "full"):
            xs, means, stds = [], [], []
            for i, k in enumerate(ks):
                acc = [r["accuracy"] for r in mine if r["mode"] == mode and str(r["labels_per_class"]) == k]
                if acc:
                    xs.append(i)
                    means.append(statistics.mean(acc))
                    stds.append(statistics.stdev(acc))
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=mode)
        ax.axhline(mine[0]["before_accuracy"], color="grey", linestyle="--", label="no adaptation")
        ax.set_xticks(range(len(ks)), ks)
        ax.set_xlabel("labelled target samples per class")
        ax.set_title(source, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("target test accuracy")
    axes[0].legend()
    fig.suptitle("digits -> shifted digits (contrast 0.5, brightness +0.3, noise 0.1, rotate 15°)")
    fig.tight_layout()
    fig.savefig(HERE / "table.png", dpi=110)


if __name__ == "__main__":
    if "--table-only" not in sys.argv[1:]:
        write_csv(run())
    write_tables(read_csv())
    print((HERE / "table.md").read_text())
