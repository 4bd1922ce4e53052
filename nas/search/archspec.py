"""Reading an ArchSpec (the plain-JSON candidate `nas.search.space` samples and `nas.models.build` builds).

The one place that knows the spec's layout for readers: where each block normalizes, one-line
descriptions for tables, and the catalogue order rows are sorted in. `nas-search`'s table,
`nas-report` and the dashboard all read specs through it. No torch here, so reading is cheap.

A foreign model's spec (`model` and `norms`, see nas.search.model_space) has no blocks: its norms are
read per stage (or per layer), and its position is the model's own (`n/a`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from nas.search.finetune_space import describe_strategy

# Catalogue order for rows and columns; names not listed (a newer catalogue) sort after them.
NORM_ORDER = ("batch", "batch_renorm", "group", "layer", "instance", "evonorm_b0", "evonorm_s0", "frn", "none")
POSITION_ORDER = (
    "pre_conv",
    "post_conv",
    "pre_linear",
    "post_linear",
    "post_act",
    "residual:original",
    "residual:preact",
)
NO_POSITION = "n/a"  # a plain block without a norm has no position
MIXED = "mixed"
UNKNOWN = "?"

# Short names for the norm settings in the layout column (legend printed under the table).
SETTING_ABBREV = {
    "momentum": "m",
    "eps": "eps",
    "affine": "aff",
    "track_running_stats": "trs",
    "r_max": "rmax",
    "d_max": "dmax",
    "warmup": "wu",
    "groups": "g",
}


def order_key(order: tuple[str, ...]) -> Callable[[str], tuple]:
    """Sort key: names in `order` first, in that order; `mixed` and unknown names after them."""
    return lambda name: (order.index(name) if name in order else len(order), name == MIXED, name)


OWN = "own"  # a foreign model that keeps the norms it was built with
RE_ESTIMATED, AS_LOADED = "statistics re-estimated", "statistics as loaded"  # a fine-tuned checkpoint's
FINETUNE_AXES = ("BN mode", "statistics")  # what a fine-tuning study's groups are by


def model_family(spec: dict) -> str | None:
    """`timm` / `torchvision` / `factory` for a foreign model's spec; None for the generated chain."""
    model = spec.get("model")
    return model.get("family") if isinstance(model, dict) else None


def foreign_norms(spec: dict) -> list[tuple[str, dict]]:
    """(stage or layer, norm entry) for every replaced norm of a foreign model's spec, in module order;
    one ("", norm) entry for a factory given the norm through norm_layer; [] when it keeps its own."""
    norms = spec.get("norms")
    if not norms:
        return []
    if "norm" in norms:
        return [("", norms["norm"])]
    unit = "name" if norms.get("share") == "per_layer" else "stage"
    return [(layer.get(unit, ""), layer["norm"]) for layer in norms.get("layers", [])]


def blocks(spec: dict) -> list[dict]:
    """Every block of every stage, in order; an MLP's layers (its blocks: norm, activation, type)."""
    return [block for _, block in labelled_blocks(spec)]


def labelled_blocks(spec: dict) -> list[tuple[str, dict]]:
    """(label, block) for every block: `s2b1` (stage 2, block 1) in a chain, `l3` (layer 3) in an MLP."""
    if "mlp" in spec:
        return [(f"l{i + 1}", layer) for i, layer in enumerate(spec["mlp"].get("layers", []))]
    return [
        (f"s{i + 1}b{j + 1}", block)
        for i, stage in enumerate(spec.get("stages", []))
        for j, block in enumerate(stage.get("blocks", []))
    ]


def norm_position(block: dict) -> str:
    """Where a block's norms sit: the plain position, or `residual:original` / `residual:preact`."""
    if block.get("type") == "residual":
        return f"residual:{block['residual']['order']}"
    return block["norm"].get("position", "post_conv")


def block_position(block: dict) -> str:
    """Like `norm_position`, but `n/a` for a plain block without a norm."""
    if block.get("type") != "residual" and block.get("norm", {}).get("type") == "none":
        return NO_POSITION
    return norm_position(block)


def norm_group(spec: dict) -> tuple[str, str]:
    """The (norm type, position) all blocks share; `mixed` on the axis where they differ. A fine-tuned checkpoint's
    norms are its own: its group is (BN mode, whether its statistics were re-estimated first)."""
    if "finetune" in spec:
        strategy = spec["finetune"]
        return strategy["bn_mode"], RE_ESTIMATED if strategy.get("recalibrate") else AS_LOADED
    if model_family(spec):
        types = {norm["type"] for _, norm in foreign_norms(spec)} or {OWN}
        return (next(iter(types)) if len(types) == 1 else MIXED), NO_POSITION
    all_blocks = blocks(spec)
    if not all_blocks:
        return UNKNOWN, UNKNOWN
    types = {block.get("norm", {}).get("type", UNKNOWN) for block in all_blocks}
    positions = {block_position(block) for block in all_blocks}
    one = lambda values: next(iter(values)) if len(values) == 1 else MIXED  # noqa: E731
    return one(types), one(positions)


def describe_norms(spec: dict) -> str:
    """One line for an ArchSpec's normalization layout: `batch @ post_conv`, or per stage when mixed."""

    if "finetune" in spec:
        return f"fine-tuned: {describe_strategy(spec['finetune'])}"
    if model_family(spec):
        runs = _runs((unit, norm["type"]) for unit, norm in foreign_norms(spec))
        if len({text for *_, text in runs}) <= 1:
            return next((text for *_, text in runs), OWN)
        return "  ".join(f"{a}: {text}" if a == b else f"{a}..{b}: {text}" for a, b, text in runs)

    def one(block: dict) -> str:
        norm = block["norm"]
        return "none" if norm["type"] == "none" else f"{norm['type']} @ {norm_position(block)}"

    if "mlp" in spec:
        runs = _runs((label, one(layer)) for label, layer in labelled_blocks(spec))
        if len(runs) <= 1:
            return next((text for *_, text in runs), UNKNOWN)
        return "  ".join(f"{a}: {text}" if a == b else f"{a}..{b}: {text}" for a, b, text in runs)
    stages = [[one(block) for block in stage["blocks"]] for stage in spec.get("stages", [])]
    kinds = {k for stage in stages for k in stage}
    if len(kinds) <= 1:
        return next(iter(kinds), UNKNOWN)
    return "  ".join(f"s{i + 1}: {' | '.join(stage)}" for i, stage in enumerate(stages))


def _fmt_setting(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def describe_block_norm(block: dict) -> str:
    """`batch@post_conv(m=0.1,eps=1e-05,aff=1,trs=1)`: type, position and the norm's own settings."""
    return describe_norm(block.get("norm", {}), block_position(block))


def describe_norm(norm: dict, where: str = NO_POSITION) -> str:
    """`group(g=8,eps=1e-05,aff=1)`, with `@where` unless the norm has no position of ours."""
    kind = norm.get("type", UNKNOWN)
    head = kind if where == NO_POSITION else f"{kind}@{where}"
    settings = ",".join(
        f"{SETTING_ABBREV.get(k, k)}={_fmt_setting(v)}" for k, v in norm.items() if k not in ("type", "position")
    )
    return f"{head}({settings})" if settings else head


def describe_layout(spec: dict) -> str:
    """Every block's norm, runs of identical consecutive blocks merged: `s1b1..s2b1 batch@post_conv(...)`;
    for a foreign model, every stage's (or layer's): `act1..layer2 group(g=8,eps=1e-05,aff=1)`."""
    if "finetune" in spec:
        return describe_norms(spec)
    if model_family(spec):
        labelled = [(unit or "all", describe_norm(norm)) for unit, norm in foreign_norms(spec)]
        text = "; ".join(f"{a} {t}" if a == b else f"{a}..{b} {t}" for a, b, t in _runs(labelled))
        return text or f"{OWN} norms"
    labelled = [(label, describe_block_norm(block)) for label, block in labelled_blocks(spec)]
    labelled += [(f"head{i + 1}", describe_block_norm(layer)) for i, layer in enumerate(head_layers(spec))]
    return "; ".join(f"{a} {text}" if a == b else f"{a}..{b} {text}" for a, b, text in _runs(labelled)) or UNKNOWN


def head_layers(spec: dict) -> list[dict]:
    """A chain's fully-connected head layers before its classifier ([] for the single Linear)."""
    return (spec.get("head") or {}).get("layers", [])


def _runs(labelled: Iterable[tuple[str, str]]) -> list[list]:
    """[first label, last label, text] for each run of consecutive equal texts."""
    runs: list[list] = []
    for label, text in labelled:
        if runs and runs[-1][2] == text and runs[-1][1] != label:
            runs[-1][1] = label
        elif not (runs and runs[-1][2] == text):
            runs.append([label, label, text])
    return runs


def distinct(values: Iterable[str]) -> str:
    """The distinct values in order of appearance, joined by `/`."""
    return "/".join(dict.fromkeys(values)) or UNKNOWN


def describe_activations(spec: dict) -> str:
    if model_family(spec):
        return OWN
    return distinct(block.get("activation", UNKNOWN) for block in blocks(spec))


def describe_block_types(spec: dict) -> str:
    if model_family(spec):
        return f"{spec['model']['family']} {spec['model'].get('name', UNKNOWN)}"
    if "mlp" in spec:
        layers = spec["mlp"].get("layers", [])
        kind = "residual " if layers and layers[0].get("type") == "residual" else ""
        return f"{kind}mlp {'/'.join(str(layer.get('width', UNKNOWN)) for layer in layers)}"

    def one(block: dict) -> str:
        if block.get("type") != "residual":
            return block.get("type", "plain")
        settings = ",".join(f"{k}={_fmt_setting(v)}" for k, v in block.get("residual", {}).items())
        return f"residual({settings})"

    return distinct(one(block) for block in blocks(spec))


def describe_training(spec: dict) -> str:
    training = spec.get("training", {})
    lr = training.get("lr")
    parts = [
        training.get("optimizer", UNKNOWN),
        f"lr={_fmt_setting(lr) if lr is not None else UNKNOWN}",
        f"bs={training.get('batch_size', UNKNOWN)}",
    ]
    return " ".join(parts)
