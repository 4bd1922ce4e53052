"""Network slimming (Liu et al. 2017): channels ranked by their BatchNorm scale |gamma| and removed structurally.

Which layers share a channel (a conv's outputs, the norm after it, the next conv's inputs, every
block tied to it through a residual addition) is Torch-Pruning's dependency graph (MIT, tested with
1.6.x); this module decides what it may remove and in what order, and records the removal so an
unpruned model built from the same ArchSpec can be cut the same way (`remove_channels`).

A channel's score is the mean |gamma| of the BatchNorm layers (BatchNorm, batch renorm) that scale
it. Channels are not ranked, and their layers left whole, where a norm ties them to each other:
group and layer norm normalize over several channels (removing one changes the rest), timm's
EvoNorm / FRN are not BatchNorm; a BatchNorm without affine scale has nothing to rank.
This module knows nothing about exports or training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nas.errors import NasError
from nas.models.batch_renorm import BatchRenorm
from nas.models.families import head_name
from nas.models.norms import is_norm
from nas.options import SLIM_SCOPES

RANKED = (nn.modules.batchnorm._BatchNorm, BatchRenorm)  # the norms whose scale ranks channels


@dataclass
class ChannelGroup:
    """Channels that are removed together: named by the layer whose outputs they are."""

    root: str
    scores: torch.Tensor  # per channel: mean |gamma| of `norms`
    norms: list[str]
    layers: list[str]  # every named layer the channels run through

    @property
    def channels(self) -> int:
        return len(self.scores)


@dataclass
class Survey:
    """What a model offers to slim: the ranked groups, and the layers left whole with the reason."""

    groups: list[ChannelGroup]
    left: dict[str, str]  # root layer -> why its channels are not ranked

    @property
    def channels(self) -> int:
        return sum(g.channels for g in self.groups)


def _pruners() -> dict:
    """Batch renorm is pruned like BatchNorm (weight, bias, running statistics), which it is to Torch-Pruning."""
    from torch_pruning.pruner.function import BatchnormPruner

    class RenormPruner(BatchnormPruner):
        def prune_out_channels(self, layer: BatchRenorm, idxs: Sequence[int]) -> nn.Module:
            keep = sorted(set(range(layer.num_features)) - set(idxs))
            layer.num_features = len(keep)
            layer.running_mean = layer.running_mean.data[keep]
            layer.running_var = layer.running_var.data[keep]
            if layer.affine:
                layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
                layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            return layer

        prune_in_channels = prune_out_channels

    return {BatchRenorm: RenormPruner()}


def dependency_graph(model: nn.Module, input_shape: Sequence[int]):
    """Torch-Pruning's graph of `model` (traced in eval mode on zeros: nothing about the model changes)."""
    import torch_pruning as tp

    param = next(model.parameters())
    example = torch.zeros(2, *input_shape, device=param.device, dtype=param.dtype)
    training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example, customized_pruners=_pruners(), verbose=False)
    finally:
        model.train(training)


def _why_not_ranked(norms: list[tuple[str, nn.Module]]) -> str | None:
    """Why the channels these norms act on cannot be ranked and removed; None when they can."""
    for name, norm in norms:
        if isinstance(norm, nn.GroupNorm):
            if norm.num_groups == 1:
                return f"{name} is a layer norm: it normalizes over all its channels, so removing one changes the rest"
            if norm.num_groups < norm.num_channels:
                return f"{name} is a GroupNorm of {norm.num_groups} groups: it ties its channels together in groups"
            return f"{name} is an instance norm: it has no BatchNorm scale to rank by"
        if not isinstance(norm, RANKED):
            return f"{name} is a {type(norm).__name__}, not a BatchNorm: nothing ranks its channels"
        if getattr(norm, "weight", None) is None:
            return f"{name} is a BatchNorm without a scale (affine: false): nothing to rank its channels by"
    if not norms:
        return "no BatchNorm scales its channels"
    return None


def survey(model: nn.Module, input_shape: Sequence[int], graph=None) -> Survey:
    """Every group of coupled channels of `model` (its classifier's outputs excepted): scored, or why not."""
    graph = graph or dependency_graph(model, input_shape)
    names = {module: name for name, module in model.named_modules()}
    classifier = model.get_submodule(head_name(model))
    groups, left = [], {}
    for group in graph.get_all_groups(ignored_layers=[classifier]):
        root = names[group[0].dep.target.module]
        members = [(names.get(dep.target.module), dep.target.module) for dep, _ in group]
        norms = [(name, module) for name, module in members if name is not None and is_norm(module)]
        unique = list({name: module for name, module in norms}.items())
        reason = _why_not_ranked(unique)
        if reason is not None:
            left[root] = reason
            continue
        channels = len(group[0].idxs)
        total, count = torch.zeros(channels), torch.zeros(channels)
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if isinstance(layer, RANKED) and None not in group[i].root_idxs:
                root_idxs = torch.as_tensor(group[i].root_idxs)
                total.index_add_(0, root_idxs, layer.weight.detach().abs().float().cpu()[list(idxs)])
                count.index_add_(0, root_idxs, torch.ones(len(root_idxs)))
        layers = list(dict.fromkeys(name for name, _ in members if name is not None))
        groups.append(ChannelGroup(root, total / count.clamp(min=1), [n for n, _ in unique], layers))
    return Survey(groups, left)


def explain(found: Survey) -> str:
    """What is and is not prunable, in one line."""
    ranked = f"{len(found.groups)} channel groups ({found.channels} channels) ranked by BatchNorm scale"
    if not found.left:
        return ranked
    reasons = "; ".join(f"{root}: {why}" for root, why in list(found.left.items())[:3])
    more = f" (and {len(found.left) - 3} more)" if len(found.left) > 3 else ""
    return f"{ranked}; left whole: {reasons}{more}"


def check_prunable(found: Survey) -> None:
    if not found.groups:
        raise NasError(
            "the model has no channels to rank by BatchNorm scale (nas-slim removes the channels a BatchNorm or batch "
            f"renorm with a scale (affine) sits on): {explain(found)}"
        )


def removal_order(found: Survey) -> list[tuple[int, int]]:
    """(group index, channel) from the smallest score up; ties broken by position, so the order is reproducible."""
    keyed = [(float(s), g, c) for g, group in enumerate(found.groups) for c, s in enumerate(group.scores.tolist())]
    return [(g, c) for _, g, c in sorted(keyed)]


def plan(found: Survey, ratio: float, scope: str = "global") -> dict[str, list[int]]:
    """The channels to remove, by root layer: the `ratio` of ranked channels with the smallest scores, over the
    whole network (`global`) or in every group alike (`layer`). A plan that empties a layer is refused."""
    if scope not in SLIM_SCOPES:
        raise NasError(f"--scope: unknown scope '{scope}' (known: {', '.join(SLIM_SCOPES)})")
    picked: dict[int, list[int]] = {}
    if scope == "global":
        for g, c in removal_order(found)[: round(ratio * found.channels)]:
            picked.setdefault(g, []).append(c)
    else:
        for g, group in enumerate(found.groups):
            order = sorted(range(group.channels), key=lambda c: (float(group.scores[c]), c))
            if round(ratio * group.channels):
                picked[g] = order[: round(ratio * group.channels)]
    emptied = [found.groups[g] for g, chosen in picked.items() if len(chosen) == found.groups[g].channels]
    if emptied:
        group = emptied[0]
        raise NasError(
            f"--ratio {ratio:g}: would remove every channel of {group.root} (its {group.channels} channels score at "
            f"most {float(group.scores.max()):.3g}); the largest ratio that keeps a channel in every layer is "
            f"{largest_ratio(found, scope):.3f}"
        )
    return {found.groups[g].root: sorted(chosen) for g, chosen in sorted(picked.items())}


def largest_ratio(found: Survey, scope: str = "global") -> float:
    """The largest ratio whose plan keeps at least one channel in every group."""
    if scope == "layer":  # n - 1 of a group of n channels
        return min((group.channels - 1) / group.channels for group in found.groups)
    left = {g: group.channels for g, group in enumerate(found.groups)}
    for k, (g, _) in enumerate(removal_order(found)):  # the k channels before the one that empties a group
        left[g] -= 1
        if left[g] == 0:
            return k / found.channels
    return 1.0


def describe(found: Survey, removed: dict[str, list[int]]) -> dict[str, dict]:
    """Per channel group: how many of its channels went, and every layer they were cut from (for model.json)."""
    return {
        group.root: {"removed": len(removed.get(group.root, [])), "of": group.channels, "layers": group.layers}
        for group in found.groups
    }


def remove_channels(model: nn.Module, input_shape: Sequence[int], removed: dict[str, list[int]]) -> nn.Module:
    """Cut `removed` (root layer -> channels, a `plan`) out of `model` in place, with every layer coupled to them;
    the same plan cuts a model freshly built from the same ArchSpec to the same shapes."""
    if not removed:
        return model
    graph = dependency_graph(model, input_shape)
    for root, channels in removed.items():
        layer = model.get_submodule(root)
        pruner = graph.get_pruner_of_module(layer)
        graph.get_pruning_group(layer, pruner.prune_out_channels, list(channels)).prune()
    return model
