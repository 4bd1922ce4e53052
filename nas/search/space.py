"""The search space: validate the YAML tree and sample it, define-by-run, into an ArchSpec.

Every leaf is a constant or a distribution (`{choice: [...]}`, `{int: [lo, hi]}`,
`{float: [lo, hi]}`, with optional `log` and `step`). A missing leaf takes its default
from SCHEMA. Sampling walks the tree and asks the trial only for what is active (no
momentum when the norm is `none`), naming each Optuna parameter by its dotted key path.

The ArchSpec is plain JSON data; `nas.models.build.build(spec, ...)` alone makes the model:

    {"stages": [{"width": 32, "downsample": "none",
                 "blocks": [{"kernel": 3, "activation": "relu", "dropout": 0.0,
                             "norm": {"type": "batch", "position": "post_conv",
                                      "momentum": 0.1, "eps": 1e-05, "affine": true}}]}],
     "training": {"optimizer": "sgd", "lr": 0.05, ...}}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nas.errors import ConfigError
from nas.models.norms import ACTIVATIONS, NORM_PARAMS, POSITIONS
from nas.search.finetune_space import FINETUNE_SCHEMA, pin_checkpoint, resolve_weights, validate_finetune
from nas.search.leaves import NORM_TYPE, sample_norm, suggest_leaf, validate_leaf
from nas.search.mlp_space import (
    HEAD_SCHEMA,
    MLP,
    MLP_SCHEMA,
    check_head_share,
    check_mlp_training,
    sample_head,
    sample_mlp,
)
from nas.search.model_space import ForeignModel, family_of, validate_model
from nas.search.stand_in_trials import FirstChoiceTrial
from nas.validation import Param, read_yaml, type_name, unknown_key

SHARE_MODES = ("global", "per_stage", "per_block")
DOWNSAMPLE = ("maxpool", "avgpool", "stride")
OPTIMIZERS = ("sgd", "adamw")
BLOCK_TYPES = ("plain", "residual")
RESIDUAL_ORDERS = ("original", "preact")  # post-activation (He 2015) or identity-mapping (He 2016)


SCHEMA: dict = {
    "stages": Param(int, 2, {"min": 1, "max": 8}),
    "blocks_per_stage": Param(int, 1, {"min": 1, "max": 16}),
    "width": Param(int, 32, {"min": 1, "max": 1024}),
    "downsample": Param(str, "maxpool", {"choices": DOWNSAMPLE, "what": "downsampling"}),
    "block": {
        "type": Param(str, "plain", {"choices": BLOCK_TYPES, "what": "block type"}),
        "residual": {  # only sampled for residual blocks
            "order": Param(str, "original", {"choices": RESIDUAL_ORDERS, "what": "residual ordering"}),
            "zero_init": Param(bool, False),
        },
        "kernel": Param(int, 3, {"min": 1, "max": 15, "odd": True}),
        "activation": Param(str, "relu", {"choices": tuple(ACTIVATIONS), "what": "activation"}),
        "dropout": Param(float, 0.0, {"min": 0.0, "below": 1.0}),
        "norm": {
            "type": NORM_TYPE,
            "position": Param(str, "post_conv", {"choices": POSITIONS, "what": "norm position"}),
            "share": Param(str, "global", {"choices": SHARE_MODES, "what": "share mode"}, searchable=False),
            **NORM_PARAMS,
        },
    },
    "training": {
        "optimizer": Param(str, "sgd", {"choices": OPTIMIZERS, "what": "optimizer"}),
        "lr": Param(float, 0.05, {"above": 0.0}),
        "weight_decay": Param(float, 5e-4, {"min": 0.0}),
        "l1": Param(float, 0.0, {"min": 0.0}),  # L1 penalty on conv weights
        "bn_sparsity": Param(float, 0.0, {"min": 0.0}),  # L1 penalty on norm scales (network slimming)
        "label_smoothing": Param(float, 0.0, {"min": 0.0, "below": 1.0}),
        "batch_size": Param(int, 64, {"min": 2}),
    },
    "head": HEAD_SCHEMA,  # FC layers before the classifier (nas.search.mlp_space); none by default
    "finetune": FINETUNE_SCHEMA,  # a checkpoint's fine-tuning strategy (nas.search.finetune_space)
}


# The MLP family's space (`model: mlp`): its layers' keys in place of the chain's, the same training.
MLP_SPACE_SCHEMA: dict = {**MLP_SCHEMA, "training": SCHEMA["training"]}


def schema_of(space: dict) -> dict:
    """The schema a space's keys are read against: the MLP family's, or the chain's (foreign models use its
    training and finetune sections)."""
    return MLP_SPACE_SCHEMA if family_of(space) == MLP else SCHEMA


def training_defaults() -> dict:
    """The training section of a spec that searched nothing (a checkpoint fine-tuned without a search)."""
    return {key: param.default for key, param in SCHEMA["training"].items()}


def load_space(path: str | Path) -> dict:
    """Read and validate a search-space YAML file; a checkpoint it fine-tunes is found and pinned by its sha256."""
    space = read_yaml(path)
    if isinstance(space, dict):
        resolve_weights(space, path)
    return pin_checkpoint(validate_space(space, str(path)), str(path))


def validate_space(space: dict, file: str) -> dict:
    """Check every key and leaf against SCHEMA (and `model` against the model families); returns the space
    unchanged when valid."""
    if not isinstance(space, dict):
        raise ConfigError(file, "", f"expected a mapping, got {type_name(space)}")
    rest = {key: value for key, value in space.items() if key != "model"}
    _validate_node(rest, schema_of(space), file, "")
    if "model" in space:
        validate_model(space, file)
    validate_finetune(space, file)
    check_head_share(space, file)
    check_mlp_training(space, file)
    return space


def _validate_node(node: Any, schema: dict, file: str, path: str) -> None:
    if not isinstance(node, dict):
        raise ConfigError(file, path, f"expected a mapping, got {type_name(node)}")
    for key, value in node.items():
        key_path = f"{path}.{key}" if path else str(key)
        if key not in schema:
            raise unknown_key(file, path, key, schema)
        if isinstance(schema[key], dict):
            _validate_node(value, schema[key], file, key_path)
        else:
            validate_leaf(value, schema[key], file, key_path)


class Space:
    """A validated search space that samples ArchSpecs from an Optuna trial (or FixedTrial).

    A foreign model's norms are listed from its structure, which a factory may shape by the data:
    give the data's `input_shape` and `num_classes` where they are known.
    """

    def __init__(self, space: dict, input_shape: tuple[int, ...] = (3, 32, 32), num_classes: int = 10):
        self.space = space
        self.schema = schema_of(space)
        self.foreign = ForeignModel.of(space, tuple(input_shape), num_classes)

    def leaf(self, key_path: str) -> Any:
        """The space's value at `key_path`, or the schema's default where the space is silent."""
        if key_path.startswith("model.") and self.foreign is not None:
            return self.foreign.leaf(key_path)
        node, schema, given = self.space, self.schema, True
        for part in key_path.split("."):
            schema = schema[part]
            given = given and isinstance(node, dict) and part in node
            node = node[part] if given else None
        return node if given else schema.default

    def suggest(self, trial, name: str, key_path: str) -> Any:
        """Ask the trial for parameter `name`, distributed as the leaf at `key_path`."""
        return suggest_leaf(trial, name, self.leaf(key_path))

    def sample(self, trial) -> dict:
        """Walk the tree, define-by-run, into an ArchSpec."""
        ask = lambda name, key_path: self.suggest(trial, name, key_path)  # noqa: E731
        if self.foreign is not None:
            return self.foreign.sample(ask, lambda: self._training(trial))
        if self.schema is MLP_SPACE_SCHEMA:
            return {"mlp": sample_mlp(ask, self.leaf), "training": self._training(trial)}
        s = lambda key: self.suggest(trial, key, key)  # noqa: E731 - the name is the key path
        n_stages, n_blocks, width = s("stages"), s("blocks_per_stage"), s("width")
        downsample = s("downsample")
        block_type = s("block.type")
        template = {
            "type": block_type,
            "kernel": s("block.kernel"),
            "activation": s("block.activation"),
            "dropout": s("block.dropout"),
        }
        if block_type == "residual":
            template["residual"] = {"order": s("block.residual.order"), "zero_init": s("block.residual.zero_init")}
        share = self.leaf("block.norm.share")
        sample_norm = lambda prefix: self._sample_norm(trial, prefix, block_type)  # noqa: E731
        norm = sample_norm("block.norm") if share == "global" else None
        stages = []
        for i in range(n_stages):
            if share == "per_stage":
                norm = sample_norm(f"stage{i + 1}.block.norm")
            blocks = []
            for j in range(n_blocks):
                if share == "per_block":
                    norm = sample_norm(f"stage{i + 1}.block{j + 1}.norm")
                blocks.append({**template, "norm": dict(norm)})
            stages.append({"width": width * 2**i, "downsample": "none" if i == 0 else downsample, "blocks": blocks})
        spec = {"stages": stages}
        head = sample_head(ask, self.leaf, stages[-1]["blocks"][-1]["norm"])
        if head is not None:  # no entry for the single Linear: the specs of spaces without a head are unchanged
            spec["head"] = head
        return {**spec, "training": self._training(trial)}

    def _training(self, trial) -> dict:
        return {key: self.suggest(trial, f"training.{key}", f"training.{key}") for key in SCHEMA["training"]}

    def _sample_norm(self, trial, prefix: str, block_type: str) -> dict:
        """One normalization decision; only the chosen type's own settings are sampled.

        Residual blocks place their norms by `block.residual.order`, so they take no position.
        """
        return sample_norm(
            prefix, lambda name, key: self.suggest(trial, name, f"block.norm.{key}"), block_type == "plain"
        )


def default_spec(space: dict | None = None) -> dict:
    """The ArchSpec of a space's defaults and first choices: a candidate without a study."""
    return Space(space or {}).sample(FirstChoiceTrial())
