"""BatchNorm diagnostics: what running statistics cost, re-estimating them, and how small the scales trained.

`train_mode_loss` validates with the norm layers using batch statistics (the rest of the model
in eval mode, so dropout is off) and leaves the running statistics as they were; next to the
usual eval-mode loss it shows how far the running statistics are from the batch ones.
`recalibrate` re-estimates running statistics as a plain average over the training data, with
no gradients, as recommended before evaluating a network whose statistics lag its weights.

Both need the norm layers to normalize with the batch's own statistics. BatchNorm in train mode
does; batch renorm in train mode corrects them by r and d toward its running statistics, which
would make `train_mode_loss` the running-statistics loss again (gap ~0 by construction) and,
once `recalibrate` has reset them, leave the outputs roughly un-normalized for every later layer
to average in. So while either runs, batch renorm takes r = 1, d = 0 (`plain_batch_statistics`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from nas.models.batch_renorm import BatchRenorm
from nas.models.norms import running_stats_layers
from nas.training.train import autocast, evaluate, on_device_layout

SMALL_SCALE = 0.01  # a norm scale below this leaves its channel near-constant: what network slimming removes first
SMALL_SHARE = f"below_{SMALL_SCALE:g}"  # the summary's key for the share of scales below SMALL_SCALE


def scale_summary(scales: list[torch.Tensor]) -> dict | None:
    """|gamma| of norm scales (several models' pooled): how many, their 10th / 50th / 90th percentiles and the
    share below SMALL_SCALE; None without any. Stored per trial, it shows what `training.bn_sparsity` did."""
    if not scales:
        return None
    values = torch.cat([s.detach().abs().float().flatten().cpu() for s in scales])
    p10, p50, p90 = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9])).tolist()
    share = float((values < SMALL_SCALE).float().mean())
    return {"count": len(values), "p10": p10, "p50": p50, "p90": p90, SMALL_SHARE: share}


def kept_scales(summary: dict | None) -> float:
    """The share of norm scales at or above SMALL_SCALE (a `scale_summary`): the channels network slimming at that
    threshold would keep, the `kept_scales` objective. A model without norm scales keeps everything (1.0)."""
    return 1.0 if summary is None else 1.0 - summary[SMALL_SHARE]


def _norms_in_train_mode(model: nn.Module) -> list[nn.Module]:
    model.eval()
    layers = running_stats_layers(model)
    for m in layers:
        m.train()
    return layers


@contextmanager
def plain_batch_statistics(layers: list[nn.Module]):
    """Batch renorm layers normalize with the batch statistics alone (r = 1, d = 0), like BatchNorm."""
    renorms = [(m, m.r_max, m.d_max) for m in layers if isinstance(m, BatchRenorm)]
    for m, _, _ in renorms:
        m.r_max, m.d_max = 1.0, 0.0
    try:
        yield
    finally:
        for m, r_max, d_max in renorms:
            m.r_max, m.d_max = r_max, d_max


@torch.no_grad()
def train_mode_loss(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device
) -> float | None:
    """Validation loss with batch statistics in batches of the training batch size; state restored.

    None when no layer keeps running statistics: the eval-mode loss is then the same number.
    """
    layers = running_stats_layers(model)
    if not layers:
        return None
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
    try:
        with plain_batch_statistics(_norms_in_train_mode(model)):
            return evaluate(model, x, y, device, batch_size=batch_size, keep_mode=True)[0]
    finally:
        for m, state in zip(layers, saved):
            m.load_state_dict(state)
        model.eval()


@torch.no_grad()
def recalibrate(model: nn.Module, x: torch.Tensor, batch_size: int, device: torch.device) -> None:
    """Reset running statistics and re-estimate them as the average over `x`, batch by batch.

    Near-equal batches of at most `batch_size` (as `evaluate` splits: never a one-sample batch,
    which a 1-pixel map cannot normalize), each weighted by its size in the average.
    """
    layers = _norms_in_train_mode(model)
    if not layers:
        return
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in layers]
    for m in layers:
        m.running_mean.zero_()
        m.running_var.fill_(1.0)
    seen = 0
    with plain_batch_statistics(layers):
        for xb in x.tensor_split(math.ceil(len(x) / batch_size)):
            seen += len(xb)
            for m in layers:
                m.momentum = len(xb) / seen  # a size-weighted cumulative average over the batches so far
            with autocast(device):
                model(on_device_layout(xb, device))
    for m, (momentum, tracked) in zip(layers, saved):
        m.momentum = momentum
        m.num_batches_tracked.copy_(tracked)
    model.eval()
