"""Fine-tuning a pretrained checkpoint onto shifted digits: which BatchNorm treatment, at equal tuning budgets?

Run from the repository root: `.venv/bin/python experiments/finetune_checkpoint_shifted/run.py` (README.md). Every step
is a bnnas command, run as a user would run it, and skipped when its result is already here:

1. the source checkpoint: test_resnet trained on clean digits (nas-search of one fixed candidate, nas-export);
2. space.yaml: the fine-tuning space, its checkpoint the export's weights.pt, its mean / std the export's;
3. anchors: the source on the shifted test split as it is, and after AdaBN (statistics re-estimated on the unlabelled
   shifted training images, nothing trained): nas-finetune --bn-mode adabn --labels-per-class 0;
4. nas-compare --factor finetune.bn_mode at 5, 20 and 50 labels per class (each cell searches the rest of the strategy
   for the same number of trials; its best is re-evaluated under 5 fresh seeds);
5. nas-compare of bn_mode x batch size 4 / 32 at 20 labels per class (the advice to freeze BN with small batches),
   and of finetune.recalibrate there (re-estimating the statistics before training: AdaBN's step);
6. each cell's best strategy retrained on all its labelled images and scored on the 360 shifted test images
   (nas-export of the cell's study: one seed).

results.md collects the tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from nas.search import describe_strategy

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
STORAGE = "sqlite:///experiments/finetune_checkpoint_shifted/study.db"
BUDGETS = {5: 40, 20: 12, 50: 6}  # labels per class: epochs (about 160-250 optimizer steps at batch 8)
TRIALS_PER_CELL, SEEDS = 8, 5
VERDICTS = {"indistinguishable": "= best (not shown worse)"}  # nas-compare's words in compare.md
SPACE = {
    "finetune": {
        "bn_mode": {"choice": ["freeze", "adabn", "bn-only", "full", "linear-probe"]},
        "recalibrate": {"choice": [False, True]},
        "unfreeze_stages": {"choice": [2, 4]},
    },
    "training": {
        "optimizer": "adamw",
        "lr": {"float": [3.0e-4, 3.0e-2], "log": True},
        "weight_decay": 1.0e-4,
        "batch_size": {"choice": [4, 8, 32]},
    },
}


def run(*command: str) -> None:
    print("$", " ".join(command), flush=True)
    subprocess.run([str(BIN / command[0]), *command[1:]], cwd=ROOT, check=True)


def source() -> Path:
    folder = HERE / "source"
    if not (folder / "model.json").exists():
        run("nas-search", "--config", str(HERE / "source.yaml"), "--no-progress")
        run("nas-export", "--storage", STORAGE, "--study", "source", "--out", str(folder))
    return folder


def write_space(folder: Path) -> None:
    meta = json.loads((folder / "model.json").read_text())
    model = {
        "timm": "test_resnet",
        "weights": "source/weights.pt",
        "mean": meta["normalization"]["mean"],
        "std": meta["normalization"]["std"],
        "input_size": meta["input_shape"][-1],
    }
    text = "# Written by run.py: the checkpoint is source/weights.pt, its input as source/model.json says.\n"
    (HERE / "space.yaml").write_text(
        text + yaml.safe_dump({"model": model, **SPACE}, sort_keys=False, default_flow_style=None)
    )


def anchors(folder: Path) -> None:
    out = HERE / "results" / "adabn_unlabelled"
    if not (out / "metrics.json").exists():
        args = ["--model", str(folder), "--config", str(HERE / "target.yaml"), "--bn-mode", "adabn"]
        run("nas-finetune", *args, "--labels-per-class", "0", "--out", str(out), "--force")


def compare(name: str, labels: int, epochs: int, *factor: str) -> None:
    out = HERE / "results" / name
    if (out / "compare.json").exists():
        return
    settings = ["--set", f"dataset.labels_per_class={labels}", "--epochs", str(epochs), "--study", f"finetune-{name}"]
    budget = ["--trials-per-cell", str(TRIALS_PER_CELL), "--seeds", str(SEEDS), "--no-progress"]
    run("nas-compare", "--config", str(HERE / "target.yaml"), *settings, *factor, *budget, "--out", str(out))


def export_cells(name: str) -> dict[str, dict]:
    """Each cell's best trial exported (retrained on every labelled image); its model.json by cell label."""
    found = {}
    for cell in json.loads((HERE / "results" / name / "compare.json").read_text())["cells"]:
        folder = HERE / "results" / name / "exports" / cell["label"].replace(" ", "_").replace("/", "_")
        if not (folder / "model.json").exists():
            run("nas-export", "--storage", STORAGE, "--study", cell["study"], "--out", str(folder), "--force")
        found[cell["label"]] = json.loads((folder / "model.json").read_text())
    return found


def strategy_text(spec: dict) -> str:
    training = spec["training"]
    return f"{describe_strategy(spec['finetune'])}; lr {training['lr']:.2g}, batch {training['batch_size']}"


def table(name: str) -> list[str]:
    result = json.loads((HERE / "results" / name / "compare.json").read_text())
    exports = export_cells(name)
    lines = [
        "| cell | best strategy of its search | CV loss, mean ± SD over 5 seeds | verdict | CV acc "
        "| test acc (1 retrain) |",
        "|---|---|---|---|---|---|",
    ]
    for cell in sorted(result["cells"], key=lambda c: c["stats"]["loss"]["mean"]):
        loss, acc = cell["stats"]["loss"], cell["stats"]["accuracy"]
        verdict = VERDICTS.get(cell["stats"]["verdict"], cell["stats"]["verdict"])
        test = exports[cell["label"]]["test"]["accuracy"]
        lines.append(
            f"| {cell['label']} | {strategy_text(cell['spec'])} | {loss['mean']:.3f} ± {loss['sd']:.3f} "
            f"| {verdict} | {acc['mean']:.3f} ± {acc['sd']:.3f} | {test:.3f} |"
        )
    return lines


def summarize() -> None:
    adabn = json.loads((HERE / "results" / "adabn_unlabelled" / "metrics.json").read_text())
    lines = [
        "# Results (written by run.py)",
        "",
        f"Source on the shifted test split as it is: accuracy {adabn['before']['accuracy']:.3f}, loss "
        f"{adabn['before']['loss']:.3f}. After AdaBN on the 1,437 unlabelled shifted training images (nothing "
        f"trained): accuracy {adabn['after']['accuracy']:.3f}, loss "
        f"{adabn['after']['loss']:.3f}.",
    ]
    for labels in BUDGETS:
        lines += ["", f"## {labels} labelled images per class ({BUDGETS[labels]} epochs)", "", *table(f"k{labels}")]
    lines += ["", "## Batch size 4 vs 32 at 20 labels per class", "", *table("k20_batch")]
    lines += ["", "## Statistics re-estimated first or not at 20 labels per class", "", *table("k20_recalibrate")]
    (HERE / "results.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    folder = source()
    write_space(folder)
    anchors(folder)
    for labels, epochs in BUDGETS.items():
        compare(f"k{labels}", labels, epochs, "--factor", "finetune.bn_mode")
    batch = ["--factor", "finetune.bn_mode", "--levels", "finetune.bn_mode=freeze,full"]
    compare(
        "k20_batch", 20, BUDGETS[20], *batch, "--factor", "training.batch_size", "--levels", "training.batch_size=4,32"
    )
    compare("k20_recalibrate", 20, BUDGETS[20], "--factor", "finetune.recalibrate")
    summarize()


if __name__ == "__main__":
    main()
