"""A foreign model's norms as the search dimension: find them, group them by stage, replace them.

`norm_sites(model)` lists every norm on a (N, C, ...) feature map (BatchNorm, GroupNorm, InstanceNorm,
timm's BatchNormAct2d, LayerNorm2d, EvoNorm, FRN) in module order, with its class, width and stage.
A transformer's nn.LayerNorm (over the last axis) is not one: no catalogue norm can stand in for it.

Stages are what the model itself reports: timm's `feature_info` modules (a norm belongs to the first
stage that ends at or after it; norms after the last one are the `head`); for any other model, its
top-level children that hold norms (descending through a single child that holds them all, as
torchvision's MobileNets keep every block in `features`).

`swap_norms(model, layers)` replaces each listed norm by the catalogue's; a fused norm + activation
(timm's BatchNormAct2d) keeps its dropout and activation after the new norm, and `none` leaves just those.
Replacing creates norms with constant initial values, so it draws nothing from the random generator:
the same seed gives the same initial weights whichever norms were chosen.
"""

from __future__ import annotations

from torch import nn

from nas.models.norms import is_norm, make_norm

HEAD = "head"


def width(norm: nn.Module) -> int:
    """The channel count a norm normalizes."""
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(norm, attr, None), int):
            return getattr(norm, attr)
    shape = getattr(norm, "normalized_shape", None)
    if shape:
        return int(shape[0])
    return int(norm.weight.shape[0])


def dims(norm: nn.Module) -> int:
    """1 for a norm over (N, C) / (N, C, L) features, 2 for one over images."""
    return 1 if isinstance(norm, (nn.BatchNorm1d, nn.InstanceNorm1d)) else 2


def fused_tail(norm: nn.Module) -> list[nn.Module]:
    """The dropout and activation a fused norm + activation layer applies after normalizing (timm's NormAct)."""
    return [m for m in (getattr(norm, "drop", None), getattr(norm, "act", None)) if isinstance(m, nn.Module)]


def norm_sites(model: nn.Module) -> list[dict]:
    """Every replaceable norm of `model`, in module order: name, the class it was, width, dims and stage."""
    names = [name for name, module in model.named_modules() if name and is_norm(module)]
    names = [n for n in names if not any(n.startswith(outer + ".") for outer in names)]  # not a norm inside a norm
    stage = _stages(model, names)
    return [
        {
            "name": name,
            "was": type(model.get_submodule(name)).__name__,
            "width": width(model.get_submodule(name)),
            "dims": dims(model.get_submodule(name)),
            "stage": stage[name],
        }
        for name in names
    ]


def _stages(model: nn.Module, names: list[str]) -> dict[str, str]:
    info = getattr(model, "feature_info", None)
    modules = [f["module"] for f in info if isinstance(f, dict) and f.get("module")] if isinstance(info, list) else []
    if modules:
        order = [name for name, _ in model.named_modules()]
        ends = []
        for stage in modules:
            inside = [i for i, name in enumerate(order) if name == stage or name.startswith(stage + ".")]
            ends.append((max(inside) if inside else -1, stage))
        position = {name: i for i, name in enumerate(order)}
        return {name: next((s for end, s in ends if end >= position[name]), HEAD) for name in names}
    prefix, root = "", model
    while True:
        holders = [
            n
            for n, child in root.named_children()
            if any(f"{prefix}{n}" == x or x.startswith(f"{prefix}{n}.") for x in names)
        ]
        child = getattr(root, holders[0]) if len(holders) == 1 else None
        if child is None or is_norm(child):
            break
        prefix, root = f"{prefix}{holders[0]}.", child
    return {name: prefix + name[len(prefix) :].split(".")[0] for name in names}


def replacement(old: nn.Module, norm: dict, dims_: int) -> nn.Module:
    """The catalogue norm `norm` (an ArchSpec norm entry) in place of `old`, keeping a fused activation."""
    new = make_norm(norm, width(old), dims_)
    tail = fused_tail(old)
    parts = ([new] if new is not None else []) + tail
    if len(parts) == 1:
        return parts[0]
    return nn.Sequential(*parts) if parts else nn.Identity()


def swap_norms(model: nn.Module, layers: list[dict]) -> nn.Module:
    """Replace each `layers` entry's norm (name, dims, norm) in `model`, in place; returns `model`."""
    for entry in layers:
        old = model.get_submodule(entry["name"])
        if not is_norm(old):
            raise ValueError(f"{entry['name']} is a {type(old).__name__}, not a norm: the spec is for another model")
        model.set_submodule(entry["name"], replacement(old, entry["norm"], entry.get("dims", 2)))
    return model


def stage_order(stages: dict[str, str]) -> list[str]:
    """The stages of `stages_of(model)` in module order, the head left out."""
    return [stage for stage in dict.fromkeys(stages.values()) if stage != HEAD]


def stages_of(model: nn.Module) -> dict[str, str]:
    """The stage of every module holding parameters of its own: that of the first norm at or after it in module
    order (so a conv belongs with the norm that follows it), the head after the last norm."""
    sites = norm_sites(model)
    modules = list(model.named_modules())
    position = {name: i for i, (name, _) in enumerate(modules)}
    marks = sorted((position[site["name"]], site["stage"]) for site in sites)
    stages = {}
    for name, module in modules:
        if next(module.parameters(recurse=False), None) is None:
            continue
        inside = next(
            (s for n, s in ((site["name"], site["stage"]) for site in sites) if name.startswith(n + ".")), None
        )
        stages[name] = inside or next((stage for at, stage in marks if at >= position[name]), HEAD)
    return stages
