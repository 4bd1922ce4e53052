"""Network slimming of the digits default's best model and of a shifted-digits model: 30 / 50 / 70 % of the
BatchNorm-ranked channels removed, from models trained with and without the sparsity penalty, over 5 seeds.

Run from this folder after the two searches the README names (they fill study.db):
    python run.py            # exports and sweeps under ../../runs/slim_digits/, then results.md / .csv / .png here
    python run.py digits     # one model's exports and sweeps only
    python run.py --time     # then, with nothing else running: latency.csv, and the results
Every step is a bnnas command run as a user would (nas-export --seed --bn-sparsity, nas-slim --sweep); a step whose
output already exists is skipped, so an interrupted run continues.
"""

from __future__ import annotations

import csv
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = HERE.parents[1] / "runs" / "slim_digits"
STORAGE = f"sqlite:///{HERE / 'study.db'}"
SOURCES = {"digits": "digits-bn", "shifted": "digits-shifted"}  # model -> study
SPARSITY = (0.0, 0.03)  # training.bn_sparsity of the export trained before slimming (README: why 0.03)
SEEDS = range(5)
RATIOS = "0.3,0.5,0.7"
FINETUNE_EPOCHS = 6
BIN = Path(sys.executable).parent


def run(*args: str, refusable: bool = False) -> str | None:
    """Run a bnnas command; with `refusable`, its one-line refusal (exit 2) is returned instead of raised."""
    print("$", " ".join(args), flush=True)
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode == 2 and refusable:
        print(proc.stderr.strip(), flush=True)
        return proc.stderr.strip()
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return None


def sweep_folder(source: str, sparsity: float, seed: int) -> Path:
    return RUNS / source / f"sparsity{sparsity:g}-seed{seed}"


def produce(sources: list[str]) -> None:
    for source in sources:
        study = SOURCES[source]
        for seed in SEEDS:  # seeds outermost: a run cut short still has every sparsity level for its seeds
            for sparsity in SPARSITY:
                folder = sweep_folder(source, sparsity, seed)
                export = folder / "export"
                if not (export / "model.json").exists():
                    run(
                        "nas-export",
                        "--storage",
                        STORAGE,
                        "--study",
                        study,
                        "--out",
                        str(export),
                        "--seed",
                        str(seed),
                        "--bn-sparsity",
                        str(sparsity),
                        "--device",
                        "cpu",
                        "--force",
                    )
                if not (folder / "sweep" / "sweep.csv").exists():
                    sweep(folder, seed)


BATCH_SIZES = (1, 64)


def sweep(folder: Path, seed: int) -> None:
    """nas-slim --sweep over RATIOS; a ratio nas-slim refuses (it would empty a layer) is recorded in
    refused.txt and the sweep runs over the ratios below it."""
    ratios = RATIOS.split(",")
    while ratios:
        refusal = run(
            "nas-slim",
            "--model",
            str(folder / "export"),
            "--sweep",
            ",".join(ratios),
            "--finetune-epochs",
            str(FINETUNE_EPOCHS),
            "--seed",
            str(seed),
            "--out",
            str(folder / "sweep"),
            "--device",
            "cpu",
            "--force",
            refusable=True,
        )
        if refusal is None:
            return
        with open(folder / "refused.txt", "a") as f:
            f.write(f"{ratios[-1]}\t{refusal}\n")
        ratios = ratios[:-1]


def measure() -> None:
    """CPU latency of every source and its slimmed models, timed again in one quiet pass after all training (the
    sweeps ran beside each other, so their own timings are not used): per seed folder, the source and the three
    slimmed exports rebuilt from data, folded, interleaved (nas-bench's protocol), one pinned thread."""
    from nas.deploy import load_exported, time_side_by_side

    path = HERE / "latency.csv"
    rows = []
    for source in SOURCES:
        for sparsity in SPARSITY:
            for seed in SEEDS:
                folder = sweep_folder(source, sparsity, seed)
                models = {"0.0": load_exported(folder / "export").model}
                for ratio in RATIOS.split(","):
                    if (folder / "sweep" / f"ratio-{float(ratio):.2f}").exists():  # not where nas-slim refused it
                        models[ratio] = load_exported(folder / "sweep" / f"ratio-{float(ratio):.2f}").model
                shape = tuple(load_exported(folder / "export").meta["input_shape"])
                for r in time_side_by_side(models, shape, list(BATCH_SIZES), threads=1):
                    rows.append(
                        {
                            "model": source,
                            "bn_sparsity": sparsity,
                            "seed": seed,
                            "ratio": r["variant"],
                            "batch_size": r["batch_size"],
                            "median_ms": r["median_ms"],
                            "p10_ms": r["p10_ms"],
                            "p90_ms": r["p90_ms"],
                        }
                    )
                print(f"timed {folder.name} of {source}", flush=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


COLUMNS = ("test_accuracy_pruned", "test_accuracy", "params", "macs")


def collect() -> list[dict]:
    """Per (model, sparsity, ratio): mean and std over seeds of every column, and the cost ratios to the source."""
    timed = {}
    for row in csv.DictReader((HERE / "latency.csv").open()):
        key = (row["model"], float(row["bn_sparsity"]), int(row["seed"]), float(row["ratio"]))
        timed.setdefault(key, {})[f"latency_ms_b{row['batch_size']}"] = float(row["median_ms"])
    rows = []
    for source in SOURCES:
        for sparsity in SPARSITY:
            per_ratio: dict[float, list[dict]] = {}
            for seed in SEEDS:
                table = list(csv.DictReader((sweep_folder(source, sparsity, seed) / "sweep" / "sweep.csv").open()))
                base = {**table[0], **timed[(source, sparsity, seed, 0.0)]}
                for row in table:
                    row = {**row, **timed[(source, sparsity, seed, float(row["ratio"]))]}
                    entry = {k: float(row[k]) for k in COLUMNS if row[k] not in ("", "None")}
                    for k in ("params", "macs", *(f"latency_ms_b{b}" for b in BATCH_SIZES)):
                        entry[k] = float(row[k])
                        entry[f"{k}_ratio"] = float(row[k]) / float(base[k])
                    per_ratio.setdefault(float(row["ratio"]), []).append(entry)
            for ratio in [0.0, *map(float, RATIOS.split(","))]:
                entries = per_ratio.get(ratio, [])
                out = {"model": source, "bn_sparsity": sparsity, "ratio": ratio, "seeds": len(entries)}
                out["refused"] = sum(refused(sweep_folder(source, sparsity, seed), ratio) for seed in SEEDS)
                for key in entries[0] if entries else []:
                    values = [e[key] for e in entries if key in e]
                    out[key] = statistics.fmean(values)
                    out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
                rows.append(out)
    return rows


def refused(folder: Path, ratio: float) -> bool:
    path = folder / "refused.txt"
    return path.exists() and any(float(line.split("\t")[0]) == ratio for line in path.read_text().splitlines())


def pm(row: dict, key: str, digits: int = 3) -> str:
    if key not in row:
        return ""
    return f"{row[key]:.{digits}f} ± {row[key + '_std']:.{digits}f}"


def write(rows: list[dict]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(HERE / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| model | bn_sparsity | removed | seeds (refused) | test acc, cut | test acc, fine-tuned | params | MACs | "
        "latency b1 | latency b64 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        removed = "source" if r["ratio"] == 0 else f"{r['ratio']:.0%}"
        if not r["seeds"]:
            lines.append(
                f"| {r['model']} | {r['bn_sparsity']:g} | {removed} | 0 ({r['refused']}) | refused: it "
                "would remove every channel of a layer | | | | | |"
            )
            continue
        lines.append(
            f"| {r['model']} | {r['bn_sparsity']:g} | {removed} | {r['seeds']} ({r['refused']}) | "
            f"{'' if r['ratio'] == 0 else pm(r, 'test_accuracy_pruned')} | {pm(r, 'test_accuracy')} | "
            f"{r['params']:,.0f} ({pm(r, 'params_ratio', 2)}) | {r['macs']:,.0f} ({pm(r, 'macs_ratio', 2)}) | "
            f"{pm(r, 'latency_ms_b1_ratio', 2)} | {pm(r, 'latency_ms_b64_ratio', 2)} |"
        )
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(rows)


def plot(rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for source in SOURCES:
        for sparsity in SPARSITY:
            sel = [r for r in rows if r["model"] == source and r["bn_sparsity"] == sparsity and r["seeds"]]
            label = f"{source}, bn_sparsity {sparsity:g}"
            x = [r["ratio"] for r in sel]
            axes[0].errorbar(
                x,
                [r["test_accuracy"] for r in sel],
                [r["test_accuracy_std"] for r in sel],
                fmt="o-",
                capsize=3,
                label=label,
            )
            axes[1].plot(x, [r["macs_ratio"] for r in sel], "o-", label=label)
            axes[2].errorbar(
                x,
                [r["latency_ms_b64_ratio"] for r in sel],
                [r["latency_ms_b64_ratio_std"] for r in sel],
                fmt="o-",
                capsize=3,
                label=label,
            )
    axes[0].set(xlabel="share of ranked channels removed", ylabel="test accuracy (fine-tuned), mean ± std")
    axes[1].set(xlabel="share of ranked channels removed", ylabel="MACs, of the source")
    axes[2].set(xlabel="share of ranked channels removed", ylabel="CPU latency at batch 64, of the source")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "results.png", dpi=110)


if __name__ == "__main__":
    produce([a for a in sys.argv[1:] if a in SOURCES] or list(SOURCES))  # python run.py digits: that model only
    if "--time" in sys.argv:  # after every sweep, with nothing else running
        measure()
    if (HERE / "latency.csv").exists() and all(
        (sweep_folder(s, w, seed) / "sweep" / "sweep.csv").exists() for s in SOURCES for w in SPARSITY for seed in SEEDS
    ):
        write(collect())
