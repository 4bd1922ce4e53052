"""How the norm layers of a pretrained model adapt while it is fine-tuned (the modes of nas-finetune and of a
fine-tuning search, `nas.search.finetune_space`).

  freeze        norm layers kept in eval mode while training (running statistics do not move), their affine
                parameters frozen; every other parameter, the head included, is trained.
  adabn         running statistics re-estimated on the training inputs (no labels), then the head alone trained,
                the rest of the model in eval mode so the re-estimated statistics stay.
  bn-only       only the norm layers' affine parameters and the head are trained; norm layers train as usual, so
                their running statistics follow the target batches.
  full          every parameter trained, running statistics follow the target batches.
  linear-probe  the head alone trained, the rest of the model in eval mode (statistics as they came).

`unfreeze_stages` K narrows freeze, bn-only and full to the last K stages (as `nas.models.norm_swap` finds them:
timm's feature_info, or the top-level modules) and the head: earlier stages keep their parameters and, in eval mode,
their running statistics. `recalibrate` re-estimates the running statistics before any mode trains (adabn always
does): the AdaBN step (Li et al. 2016) ahead of whatever training follows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nas.errors import NasError
from nas.models.families import head_name
from nas.models.norms import norm_layers
from nas.search.finetune_space import HEAD_ONLY, RECALIBRATES

TrainMode = Callable[[nn.Module], None]


def set_trainable(model: nn.Module, mode: str, unfreeze_stages: int | None = None) -> TrainMode | None:
    """requires_grad per mode; returns the hook `fit` runs after model.train() each epoch."""
    norm_params = {id(p) for m in norm_layers(model) for p in m.parameters(recurse=False)}
    head_params = {id(p) for p in model.get_submodule(head_name(model)).parameters()}
    frozen_modules = frozen_stages(model, unfreeze_stages)
    frozen = {id(p) for m in frozen_modules for p in m.parameters()}
    for p in model.parameters():
        if id(p) in frozen and id(p) not in head_params:
            p.requires_grad_(False)
        elif mode == "full":
            p.requires_grad_(True)
        elif mode == "freeze":
            p.requires_grad_(id(p) not in norm_params)
        elif mode == "bn-only":
            p.requires_grad_(id(p) in norm_params or id(p) in head_params)
        else:  # adabn, linear-probe: the head alone
            p.requires_grad_(id(p) in head_params)
    if mode in HEAD_ONLY:
        return nn.Module.eval  # a fixed feature extractor: statistics and dropout as at inference
    if mode == "freeze" or frozen_modules:
        keep = norm_layers(model) if mode == "freeze" else frozen_modules

        def hook(m: nn.Module) -> None:
            for layer in keep:
                layer.eval()

        return hook
    return None


def frozen_stages(model: nn.Module, unfreeze: int | None) -> list[nn.Module]:
    """The modules of every stage but the last `unfreeze` (None: none frozen); the head is never one of them."""
    from nas.models.norm_swap import HEAD, stage_order, stages_of

    if unfreeze is None:
        return []
    stages = stages_of(model)
    order = stage_order(stages)
    if not 0 <= unfreeze <= len(order):
        raise NasError(
            f"--unfreeze-stages: {unfreeze}; {type(model).__name__} has {len(order)} stages ({', '.join(order)})"
        )
    kept = set(order[len(order) - unfreeze :])
    return [model.get_submodule(name) for name, stage in stages.items() if stage != HEAD and stage not in kept]


def start_strategy(
    model: nn.Module, strategy: dict, x_train: torch.Tensor, batch_size: int, device: torch.device
) -> TrainMode | None:
    """Ready `model` (its checkpoint loaded) for training with an ArchSpec's `finetune` strategy: statistics
    re-estimated on `x_train` where it asks, parameters frozen per mode; returns `fit`'s train-mode hook."""
    from nas.training.diagnostics import recalibrate

    if strategy["recalibrate"] or strategy["bn_mode"] in RECALIBRATES:
        recalibrate(model, x_train, batch_size, device)
    return set_trainable(model, strategy["bn_mode"], strategy.get("unfreeze_stages"))


def all_trainable(model: nn.Module) -> None:
    """Undo `set_trainable` (an export or a later caller gets the model as built)."""
    for p in model.parameters():
        p.requires_grad_(True)
