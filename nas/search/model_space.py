"""The search space's `model` entry: a timm / torchvision / factory network whose norms are searched.

    model: bnnas                                   # the generated chain (the default)
    model:
      timm: resnet10t                              # or torchvision: NAME, or factory: "pkg.mod:callable"
      kwargs: {drop_rate: {float: [0, 0.3]}}       # constructor arguments: constants or distributions
      norm:                                        # the searched norm; left out, the model keeps its own
        type: {choice: [batch, group, evonorm_s0]}
        share: per_stage                           # global | per_stage | per_layer
        groups: {choice: [8, 16]}

Parameters are named `model.kwargs.KEY`, `model.norm.KEY` (global), and `model.norm@STAGE.KEY` or
`model.norm@LAYER.KEY` (per stage / per layer), STAGE and LAYER as the model names its modules.
The ArchSpec lists every replaced layer: its name, the class it was, its stage and the norm put there.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from nas.errors import ConfigError
from nas.models.families import FAMILIES, ModelError, known_names, load_factory, takes_norm_layer
from nas.models.norms import NORM_PARAMS
from nas.search.finetune_space import CHECKPOINT_KEYS, sample_finetune, validate_checkpoint_keys, weights_entry
from nas.search.leaves import NORM_TYPE, sample_norm, validate_leaf
from nas.search.mlp_space import MLP
from nas.validation import Param, did_you_mean, type_name, unknown_key

GENERATED = "bnnas"
OURS = (GENERATED, MLP)  # families whose layers we build ourselves (nas.models.build; mlp: nas.models.mlp)
SHARE = ("global", "per_stage", "per_layer")
MAX_PER_LAYER_PARAMS = 100  # per_layer on a deep network: beyond this many searched parameters, refused
CHAIN_KEYS = ("stages", "blocks_per_stage", "width", "downsample", "block", "head")
NORM_SCHEMA = {
    "type": NORM_TYPE,
    "share": Param(str, "global", {"choices": SHARE, "what": "share mode"}, searchable=False),
    **NORM_PARAMS,
}
VIA_REPLACEMENT, VIA_NORM_LAYER = "replacement", "norm_layer"
FOREIGN_NORM = "model.norm."  # the key paths of a foreign model's norm settings


def family_of(space: dict) -> str:
    """`bnnas`, `mlp`, `timm`, `torchvision` or `factory`."""
    model = space.get("model", GENERATED)
    return model if isinstance(model, str) else next((k for k in FAMILIES if k in model), GENERATED)


def validate_model(space: dict, file: str) -> None:
    """The `model` entry's keys, names and settings; every error names `model.KEY`."""
    model = space["model"]
    if model in OURS:
        return
    if isinstance(model, str):
        raise ConfigError(
            file,
            "model",
            f"expected {' or '.join(OURS)} or a mapping such as {{timm: resnet10t}}, got {model!r}"
            f"{did_you_mean(model, [*OURS, *FAMILIES])}",
        )
    if not isinstance(model, dict):
        raise ConfigError(file, "model", f"expected {GENERATED} or a mapping, got {type_name(model)}")
    families = [key for key in FAMILIES if key in model]
    for key in model:
        if key not in (*FAMILIES, "kwargs", "norm", *CHECKPOINT_KEYS):
            raise unknown_key(file, "model", key, (*FAMILIES, "kwargs", "norm", *CHECKPOINT_KEYS))
    if len(families) != 1:
        raise ConfigError(file, "model", f"expected exactly one of {', '.join(FAMILIES)}")
    family = families[0]
    name = model[family]
    if not isinstance(name, str) or not name:
        raise ConfigError(file, f"model.{family}", f"expected a name, got {type_name(name)}")
    chain = [key for key in CHAIN_KEYS if key in space]
    if chain:
        raise ConfigError(
            file, chain[0], f"shapes the generated chain (model: {GENERATED}), not a {family} model: leave it out"
        )
    try:
        if family == "factory":
            factory = load_factory(name)
            if "norm" in model and not takes_norm_layer(factory):
                raise ConfigError(
                    file,
                    "model.norm",
                    f"{name} takes no norm_layer argument, so its norm cannot be searched: add norm_layer=None to "
                    "its parameters (called as norm_layer(channels)) or leave model.norm out",
                )
        elif name not in set(known_names(family)):
            raise ConfigError(
                file, f"model.{family}", f"unknown {family} model '{name}'{did_you_mean(name, known_names(family))}"
            )
    except ModelError as exc:
        raise ConfigError(file, f"model.{family}", str(exc)) from None
    kwargs = model.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ConfigError(file, "model.kwargs", f"expected a mapping of constructor arguments, got {type_name(kwargs)}")
    for key, leaf in kwargs.items():
        _validate_kwarg(leaf, file, f"model.kwargs.{key}")
    validate_checkpoint_keys(model, file)
    if "norm" in model:
        validate_norm(model["norm"], file)


def _validate_kwarg(leaf: Any, file: str, path: str) -> None:
    if not (isinstance(leaf, dict) and {"choice", "int", "float"} & set(leaf)):
        return  # a constant, passed as it is
    kind = {"int": int, "float": float}.get(next((k for k in ("int", "float") if k in leaf), ""), None)
    if kind is None:
        values = leaf.get("choice")
        kind = (
            type(values[0])
            if isinstance(values, list) and values and type(values[0]) in (int, float, str, bool)
            else str
        )
    validate_leaf(leaf, Param(kind, None), file, path)


def validate_norm(norm: Any, file: str) -> None:
    """A `model.norm` mapping: the catalogue's settings and share; position refused (the layer order is the model's)."""
    if not isinstance(norm, dict):
        raise ConfigError(file, "model.norm", f"expected a mapping, got {type_name(norm)}")
    for key, leaf in norm.items():
        if key == "position":
            raise ConfigError(
                file,
                "model.norm.position",
                "a foreign model keeps its own layer order; position is searched "
                "only on the generated chain (model: bnnas)",
            )
        if key not in NORM_SCHEMA:
            raise unknown_key(file, "model.norm", key, NORM_SCHEMA)
        validate_leaf(leaf, NORM_SCHEMA[key], file, f"model.norm.{key}")


def searched_keys(norm: dict) -> int:
    """How many of a norm entry's leaves are distributions (parameters each decision asks for)."""
    return sum(isinstance(leaf, dict) for key, leaf in norm.items() if key != "share")


class ForeignModel:
    """Samples a foreign model's ArchSpec: its constructor kwargs, then a norm decision per share unit."""

    def __init__(self, model: dict, input_shape: tuple[int, ...], num_classes: int):
        self.model, self.input_shape, self.num_classes = model, input_shape, num_classes
        self.family = next(k for k in FAMILIES if k in model)
        self.norm = model.get("norm")
        self._sites: dict[str, list[dict]] = {}

    @classmethod
    def of(cls, space: dict, input_shape: tuple[int, ...], num_classes: int) -> ForeignModel | None:
        return None if family_of(space) in OURS else cls(space["model"], input_shape, num_classes)

    @property
    def share(self) -> str:
        return self.norm.get("share", "global") if self.norm else "global"

    @property
    def via(self) -> str:
        """A factory takes a global norm through its `norm_layer`; every other case is replaced module by module."""
        return VIA_NORM_LAYER if self.family == "factory" and self.share == "global" else VIA_REPLACEMENT

    def leaf(self, key_path: str) -> Any:
        """The space's leaf at `model.kwargs.KEY` or `model.norm.KEY` (the catalogue's default where it is silent)."""
        section, _, key = key_path.removeprefix("model.").partition(".")
        if section == "kwargs":
            return self.model.get("kwargs", {})[key]
        return (self.norm or {}).get(key, NORM_SCHEMA[key].default)

    def sites(self, model: dict) -> list[dict]:
        """The replaceable norms of the model `model` (an ArchSpec model entry) builds, cached per entry."""
        from nas.models.families import template
        from nas.models.norm_swap import norm_sites

        key = json.dumps(model, sort_keys=True)
        if key not in self._sites:
            self._sites[key] = norm_sites(template(model, self.input_shape, self.num_classes))
        return self._sites[key]

    def sample(self, ask: Callable[[str, str], Any], training: Callable[[], dict], with_norms: bool = True) -> dict:
        """The model entry, its norms (or a checkpoint's fine-tuning strategy), then `training()` (sampled last, as
        for the chain); `ask(name, key_path)` asks the trial for parameter `name` distributed as the space's leaf at
        `key_path`."""
        kwargs = {key: ask(f"model.kwargs.{key}", f"model.kwargs.{key}") for key in self.model.get("kwargs", {})}
        model = {"family": self.family, "name": self.model[self.family], "kwargs": kwargs}
        spec: dict = {"model": model}
        if self.norm is not None and with_norms:
            spec["norms"] = self._sample_norms(ask, model)
        if "weights" in self.model:
            model["weights"] = weights_entry(self.model)
            spec["finetune"] = sample_finetune(lambda key: ask(f"finetune.{key}", f"finetune.{key}"))
        spec["training"] = training()
        return spec

    def _sample_norms(self, ask: Callable[[str, str], Any], model: dict) -> dict:
        decide = lambda prefix: sample_norm(prefix, lambda name, key: ask(name, f"model.norm.{key}"), False)  # noqa: E731
        if self.via == VIA_NORM_LAYER:
            return {"share": "global", "via": VIA_NORM_LAYER, "norm": decide("model.norm")}
        sites = self.sites(model)
        if not sites:
            raise ValueError(f"{model['family']} {model['name']} has no norm layers to search")
        decisions: dict[str, dict] = {}
        layers = []
        for site in sites:
            unit = {"global": "", "per_stage": site["stage"], "per_layer": site["name"]}[self.share]
            if unit not in decisions:
                decisions[unit] = decide(f"model.norm@{unit}" if unit else "model.norm")
            layers.append({**{k: site[k] for k in ("name", "was", "stage", "dims")}, "norm": dict(decisions[unit])})
        return {"share": self.share, "via": VIA_REPLACEMENT, "layers": layers}
