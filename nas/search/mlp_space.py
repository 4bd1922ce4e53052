"""The fully-connected parts of a search space: the MLP family (`model: mlp`) and the chain's classifier head.

    model: mlp                                  # vectors (N, F): tabular features, embeddings
    layers: {int: [2, 8]}
    width: {choice: [64, 128, 256]}
    schedule: constant                          # constant | halving | per_layer (a width per layer)
    activation: {choice: [relu, gelu]}
    dropout: {float: [0.0, 0.3]}
    residual: {choice: [false, true]}           # pre-norm residual blocks (one width)
    norm:
      type: {choice: [batch, batch_renorm, layer, none]}
      position: {choice: [pre_linear, post_linear, post_act]}   # plain layers; residual blocks are pre-norm
      share: global                             # global | per_layer
      momentum: {float: [0.01, 0.5], log: true}

A chain's `head` takes the same keys (`layers: 0`, the default, is one Linear as before) and its
norm's `share: blocks` takes the conv blocks' norm type and settings (its position stays its own).
Parameters are named by key path (`norm.type`, `layer2.norm.type` per layer, `head.norm.position`).

The ArchSpec's `mlp` entry lists every layer as the chain's blocks are listed:

    {"mlp": {"layers": [{"type": "plain", "width": 128, "activation": "relu", "dropout": 0.1,
                         "norm": {"type": "batch", "position": "post_linear", "momentum": 0.1, ...}}]},
     "training": {...}}

a residual layer having `"type": "residual", "residual": {"order": "preact"}` (pre-norm) and no position.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nas.errors import ConfigError
from nas.models.mlp import FC_POSITIONS
from nas.models.norms import ACTIVATIONS, NORM_ALIASES, NORM_PARAMS, NORMS
from nas.search.leaves import NORM_TYPE, sample_norm
from nas.validation import Param

MLP = "mlp"
SCHEDULES = ("constant", "halving", "per_layer")
MIN_HALVED_WIDTH = 8  # `halving` never narrows a layer below this
# Norms a vector's features can take: timm's EvoNorm / FRN work on feature maps only, and instance norm would
# normalize every feature on its own single value (all zeros).
FC_NORM_TYPES = tuple(name for name, norm in NORMS.items() if not norm.images_only and name != "instance")
FC_NORM_TYPE = Param(
    str, "batch", {"choices": FC_NORM_TYPES, "what": "norm for fully-connected layers", "aliases": NORM_ALIASES}
)
FC_NORM = {
    "type": FC_NORM_TYPE,
    "position": Param(str, "post_linear", {"choices": FC_POSITIONS, "what": "norm position"}),
    **NORM_PARAMS,
}
FC_LAYER = {
    "width": Param(int, 128, {"min": 1, "max": 16384}),
    "activation": Param(str, "relu", {"choices": tuple(ACTIVATIONS), "what": "activation"}),
    "dropout": Param(float, 0.0, {"min": 0.0, "below": 1.0}),
}
HEAD_SCHEMA = {
    "layers": Param(int, 0, {"min": 0, "max": 16}),
    **FC_LAYER,
    "norm": {**FC_NORM, "share": Param(str, "own", {"choices": ("own", "blocks"), "what": "share"}, searchable=False)},
}
MLP_SCHEMA = {
    "layers": Param(int, 2, {"min": 1, "max": 64}),
    **FC_LAYER,
    "schedule": Param(str, "constant", {"choices": SCHEDULES, "what": "width schedule"}),
    "residual": Param(bool, False),
    "norm": {
        **FC_NORM,
        "share": Param(str, "global", {"choices": ("global", "per_layer"), "what": "share mode"}, searchable=False),
    },
}

Ask = Callable[[str, str], Any]  # ask(parameter name, key path of the leaf it is distributed as)
Leaf = Callable[[str], Any]  # leaf(key path): the space's value there, or the schema's default


def sample_mlp(ask: Ask, leaf: Leaf) -> dict:
    """An `mlp` ArchSpec entry: depth, widths, activation, dropout, residual, then the norms per share unit."""
    s = lambda key: ask(key, key)  # noqa: E731 - the name is the key path
    depth, residual = s("layers"), s("residual")
    schedule = "constant" if residual else s("schedule")  # a residual stack keeps one width
    width = None if schedule == "per_layer" else s("width")
    common = {"activation": s("activation"), "dropout": s("dropout")}
    share = leaf("norm.share")
    decide = lambda prefix: _decide(ask, prefix, "norm", with_position=not residual)  # noqa: E731
    norm = decide("norm") if share == "global" else None
    layers = []
    for i in range(depth):
        if schedule == "per_layer":
            layer_width = ask(f"layer{i + 1}.width", "width")
        else:
            layer_width = width if schedule == "constant" else max(MIN_HALVED_WIDTH, width >> i)
        if share == "per_layer":
            norm = decide(f"layer{i + 1}.norm")
        kind = {"type": "residual", "residual": {"order": "preact"}} if residual else {"type": "plain"}
        layers.append({**kind, "width": layer_width, **common, "norm": dict(norm)})
    return {"layers": layers}


def sample_head(ask: Ask, leaf: Leaf, block_norm: dict | None) -> dict | None:
    """A chain's `head` entry, or None for the single Linear (`head.layers: 0`); `block_norm` is the last conv
    block's norm, which `head.norm.share: blocks` takes (with a position of the head's own)."""
    depth = ask("head.layers", "head.layers")
    if not depth:
        return None
    common = {key: ask(f"head.{key}", f"head.{key}") for key in FC_LAYER}
    if leaf("head.norm.share") == "blocks" and block_norm is not None:
        norm = {key: value for key, value in block_norm.items() if key != "position"}
        if norm["type"] != "none":
            norm = {"type": norm["type"], "position": ask("head.norm.position", "head.norm.position"), **norm}
    else:
        norm = _decide(ask, "head.norm", "head.norm", with_position=True)
    return {"layers": [{"type": "plain", **common, "norm": dict(norm)} for _ in range(depth)]}


def _decide(ask: Ask, prefix: str, leaf_prefix: str, with_position: bool) -> dict:
    return sample_norm(prefix, lambda name, key: ask(name, f"{leaf_prefix}.{key}"), with_position)


def check_mlp_training(space: dict, file: str) -> None:
    """`training.l1` penalizes conv kernels (nas.training.train.conv_weights): an MLP has none, so it would do
    nothing; refused rather than searched in vain."""
    l1 = (space.get("training") or {}).get("l1", 0.0)
    if space.get("model") == MLP and l1 not in (0, 0.0):
        raise ConfigError(file, "training.l1", "penalizes conv kernels, and an MLP has none: leave it out")


def check_head_share(space: dict, file: str) -> None:
    """`head.norm.share: blocks` needs block norms a fully-connected layer can take."""
    head = space.get("head") or {}
    if (head.get("norm") or {}).get("share") != "blocks":
        return
    types = ((space.get("block") or {}).get("norm") or {}).get("type", NORM_TYPE.default)
    for name in types.get("choice", []) if isinstance(types, dict) else [types]:
        if name not in FC_NORM_TYPES:
            raise ConfigError(
                file,
                "head.norm.share",
                f"blocks: the blocks' norm can be {name}, which fully-connected layers cannot take "
                f"(they take {', '.join(FC_NORM_TYPES)}): give the head its own norm (share: own)",
            )
