"""Per-layer gradient norms of the MLPs nas-compare compared, at initialization and after training.

For every cell of `DATASET/compare.json` (norm type x depth x residual) and 5 seeds: the cell's best spec
(its searched optimizer and learning rate) is built with bnnas, and the gradient of the cross-entropy on
one batch of 256 training samples (train mode, as a training step sees it) is taken with respect to every
hidden Linear's weight. Then the model is trained on the whole training split as the search trained each
fold (`nas.training.train.fit`, the config's epochs) and the gradient taken again on the same batch.
Writes DATASET/gradients.json (every norm) and DATASET/gradients.md (the first / last hidden layer ratio,
mean ± SD over seeds).

    .venv/bin/python experiments/mlp_bn_gradients/gradients.py breast_cancer
    .venv/bin/python experiments/mlp_bn_gradients/gradients.py digits_vectors
    .venv/bin/python experiments/mlp_bn_gradients/gradients.py digits_vectors --redraw   # table and plot only
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from nas.build import build
from nas.data import load_dataset
from nas.search import load_run_config
from nas.training import fit

HERE = Path(__file__).parent
SEEDS = range(5)
BATCH = 256
CPU = torch.device("cpu")


def hidden_linears(model: nn.Module) -> list[nn.Linear]:
    """Every Linear but the classifier, input side first (a residual MLP's stem, then each block's two)."""
    return [m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "head"]


def gradient_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """||dL/dW|| for every hidden Linear, in train mode (batch statistics), on one batch."""
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    norms = [layer.weight.grad.norm().item() for layer in hidden_linears(model)]
    model.zero_grad(set_to_none=True)
    return norms


def ratio(norms: list[float]) -> float:
    return norms[0] / norms[-1] if norms[-1] > 0 else float("inf")


def main(dataset: str) -> None:
    cfg = load_run_config(HERE / f"{dataset}.yaml")
    data = load_dataset(cfg.dataset)
    cells = json.loads((HERE / dataset / "compare.json").read_text())["cells"]
    gen = torch.Generator().manual_seed(0)
    picks = torch.randperm(len(data.y_train), generator=gen)[:BATCH]
    x, y = data.x_train[picks], data.y_train[picks]
    everything = []
    for cell in cells:
        spec = cell["spec"]
        rows = []
        for seed in SEEDS:
            torch.manual_seed(seed)
            model = build(spec, data.input_shape, data.num_classes)
            before = gradient_norms(model, x, y)
            everyone = torch.arange(len(data.y_train))
            fit(model, data, everyone, None, spec["training"], cfg.evaluation.epochs, CPU, seed=seed)
            after = gradient_norms(model, x, y)
            rows.append({"seed": seed, "init": before, "trained": after})
        everything.append({"label": cell["label"], "levels": cell["levels"], "spec": spec, "seeds": rows})
        print(cell["label"], f"{statistics.fmean(ratio(r['init']) for r in rows):.3g}", flush=True)
    (HERE / dataset / "gradients.json").write_text(json.dumps(everything, indent=1) + "\n")
    redraw(dataset)


def redraw(dataset: str) -> None:
    """DATASET/gradients.md and gradients.png from DATASET/gradients.json."""
    cells = json.loads((HERE / dataset / "gradients.json").read_text())
    (HERE / dataset / "gradients.md").write_text(table(cells, dataset))
    plot(dataset)


def plot(dataset: str) -> None:
    """DATASET/gradients.png: per-layer gradient norm (median over seeds; a gap where it is 0) of the deepest MLPs,
    plain and residual, for each norm type, at initialization (solid) and after training (dashed)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = json.loads((HERE / dataset / "gradients.json").read_text())
    deepest = max(int(cell["levels"]["layers"]) for cell in cells)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    colors = {"batch": "tab:blue", "layer": "tab:orange", "none": "tab:gray"}
    for ax, residual in zip(axes, ("false", "true")):
        for cell in cells:
            levels = cell["levels"]
            if int(levels["layers"]) != deepest or str(levels["residual"]).lower() != residual:
                continue
            for when, style in (("init", "-"), ("trained", "--")):
                profiles = [row[when] for row in cell["seeds"]]
                median = [
                    statistics.median(p[i] for p in profiles) or math.nan  # 0 (dead in most seeds): a gap
                    for i in range(len(profiles[0]))
                ]
                label = f"{levels['norm.type']}, {'initialization' if when == 'init' else 'trained'}"
                ax.plot(range(1, len(median) + 1), median, style, color=colors[levels["norm.type"]], label=label)
        ax.set_yscale("log")
        ax.set_xlabel("hidden Linear layer (input side first)")
        ax.set_title(f"{dataset}: depth {deepest}, {'residual (pre-norm)' if residual == 'true' else 'plain'}")
    axes[0].set_ylabel("||dL/dW|| (median over seeds)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(HERE / dataset / "gradients.png", dpi=110)


def table(cells: list[dict], dataset: str) -> str:
    """First / last hidden-layer gradient norm, mean ± SD over seeds (log10, as the ratios span decades)."""
    import math

    def cell_text(values: list[float]) -> str:
        usable = [math.log10(v) for v in values if 0 < v < math.inf]
        text = "-"
        if len(usable) >= 2:
            mean, sd = statistics.fmean(usable), statistics.stdev(usable)
            text = f"{10**mean:.3g} (log10 {mean:+.2f} ± {sd:.2f})"
        dead = len(values) - len(usable)
        return text + (f"; {dead} of {len(values)} seeds: no gradient at one end (dead ReLUs)" if dead else "")

    lines = [
        f"# Gradient norms, {dataset}: first / last hidden layer over {len(SEEDS)} seeds",
        "",
        "||dL/dW|| of the first hidden Linear over the last's, one batch of 256 training samples in train mode: "
        "the geometric mean of the ratio over seeds (and the mean ± SD of its log10). Above 1: the gradient grows "
        "toward the input (exploding); below 1: it shrinks (vanishing).",
        "",
        "| norm | residual | depth | at initialization | after training |",
        "|---|---|---|---|---|",
    ]
    for cell in cells:
        levels = cell["levels"]
        rows = cell["seeds"]
        lines.append(
            f"| {levels['norm.type']} | {levels['residual']} | {levels['layers']} | "
            f"{cell_text([ratio(r['init']) for r in rows])} | {cell_text([ratio(r['trained']) for r in rows])} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[2:] == ["--redraw"]:  # the table and plot from gradients.json, no training
        redraw(sys.argv[1])
    else:
        main(sys.argv[1])
