"""The trainer: the L1 penalty on conv weights is applied and shrinks them."""

import torch
from torch import nn

from nas.build import build
from nas.config import DatasetConfig
from nas.data import load_dataset, stratified_folds
from nas.space import default_spec
from nas.train import fit


def conv_l1_after_training(l1: float) -> float:
    data = load_dataset(DatasetConfig())
    train_idx, val_idx = stratified_folds(data.y_train, 3, 0)[0]
    spec = default_spec({"stages": 1, "width": 8, "training": {"l1": l1, "weight_decay": 0.0, "lr": 0.05}})
    torch.manual_seed(0)
    model = build(spec, data.input_shape, data.num_classes)
    fit(model, data, train_idx, val_idx, spec["training"], 2, torch.device("cpu"), seed=0)
    return sum(m.weight.abs().sum().item() for m in model.modules() if isinstance(m, nn.Conv2d))


def test_l1_penalty_shrinks_conv_weights():
    assert conv_l1_after_training(1e-2) < 0.85 * conv_l1_after_training(0.0)
