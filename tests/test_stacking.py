"""nas.models.stacking: k models of one spec as one model computes each model's own forward, fold by fold;
a layer without a stacked form is refused with NotStackable."""

import copy

import pytest
import torch
from torch import nn

from nas.models.build import build
from nas.models.stacking import NotStackable, stack
from nas.search.space import default_spec

K = 3


def models_of(space: dict, input_shape: tuple, k: int = K) -> list[nn.Module]:
    """k models of one spec with their own weights (and, for norms with statistics, their own running statistics)."""
    spec = default_spec(space)
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        model = build(spec, input_shape, 4)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
        models.append(model)
    return models


def stacked_and_own(models: list[nn.Module], xb: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(k, B, classes) from one forward of the stacked model, and from each model on its own batch, all in one mode
    (the stacked model's layers are new ones, in training mode: its user sets the mode, as for any model)."""
    stacked = stack(models)
    for m in (stacked.model, *models):
        m.train(train)  # train: each fold's norms see only that fold's batch; eval: each fold's own statistics
    return stacked.model(stacked.fold_input(xb)), torch.stack([m(x) for m, x in zip(models, xb)])


BLOCKS = {
    "plain-batch": {"block": {"norm": {"type": "batch", "position": "post_conv"}}},
    "plain-pre_conv-batch_renorm": {"block": {"norm": {"type": "batch_renorm", "position": "pre_conv"}}},
    "plain-post_act-group": {"block": {"norm": {"type": "group", "groups": 2, "position": "post_act"}}},
    "plain-none": {"block": {"norm": {"type": "none"}}},
    "residual-original": {"block": {"type": "residual", "residual": {"order": "original"}}},
    "residual-preact-instance": {
        "block": {"type": "residual", "residual": {"order": "preact"}, "norm": {"type": "instance"}}
    },
}


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("blocks", BLOCKS.values(), ids=BLOCKS)
def test_the_stacked_forward_is_each_models_own_forward(blocks, mode):
    models = models_of({"stages": 2, "width": 4, **blocks}, (2, 8, 8))
    xb = torch.randn(K, 5, 2, 8, 8)
    together, alone = stacked_and_own(models, xb, train=mode == "train")
    assert together.shape == (K, 5, 4)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_one_dimensional_signals_stack_and_the_models_add_their_channel_axis_as_before():
    models = models_of({"stages": 2, "width": 4}, (12,))
    xb = torch.randn(K, 6, 12)  # (k, B, L): no channel axis, as the models take it
    together, alone = stacked_and_own(models, xb, train=False)
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)
    assert all(m.add_channel for m in models)  # the folds' own models are left as they were


def train_step(model: nn.Module, logits_of, k: int) -> None:
    """One SGD step on the summed cross-entropy of k folds' logits: each fold gets exactly its own gradient."""
    model.train()
    logits = logits_of(model)
    sum(nn.functional.cross_entropy(logits[f], torch.arange(logits.shape[1]) % 4) for f in range(k)).backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()


def test_a_training_step_of_the_stacked_model_written_back_is_each_models_own_training_step():
    models = models_of({"stages": 2, "width": 4, "block": {"norm": {"type": "batch_renorm"}}}, (2, 6, 6))
    alone = copy.deepcopy(models)
    xb = torch.randn(K, 8, 2, 6, 6)
    xb[1] += 3.0  # fold 2's batch alone is shifted: its statistics move, the others' must not follow
    stacked = stack(models)
    train_step(stacked.model, lambda m: m(stacked.fold_input(xb)), K)
    for model, x in zip(alone, xb):
        train_step(model, lambda m, x=x: m(x).unsqueeze(0), 1)
    untrained = copy.deepcopy(models)
    stacked.write_back()
    for f in range(K):
        got, expected = models[f].state_dict(), alone[f].state_dict()
        assert got.keys() == expected.keys()
        for name in got:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=f"fold {f + 1} {name}")
        assert any(not torch.equal(t, untrained[f].state_dict()[n]) for n, t in got.items())


def test_parameters_split_by_decay_as_a_single_model_splits_them():
    models = models_of({"stages": 2, "width": 4}, (2, 8, 8))
    decay, no_decay = stack(models).parameters_by_decay()
    alone = [p for p in models[0].parameters()]
    assert len(decay) == sum(p.ndim > 1 for p in alone) and len(no_decay) == sum(p.ndim <= 1 for p in alone)
    assert sum(p.numel() for p in decay + no_decay) == K * sum(p.numel() for p in alone)


def test_a_model_that_is_not_a_built_net_is_not_stackable():
    with pytest.raises(NotStackable, match="Sequential is neither a nas.models.build.Net nor a nas.models.mlp.MLP"):
        stack([nn.Sequential(nn.Conv2d(1, 2, 3)), nn.Sequential(nn.Conv2d(1, 2, 3))])


def test_a_layer_without_a_stacked_form_is_not_stackable_and_named():
    models = models_of({"stages": 1, "width": 4}, (2, 6, 6), k=2)
    for m in models:  # local response norm mixes neighbouring channels: stacked, it would mix the folds
        m.features.stage1_block1.norm = nn.LocalResponseNorm(2)
    with pytest.raises(NotStackable, match="no stacked form for LocalResponseNorm layers"):
        stack(models)
    circular = models_of({"stages": 1, "width": 4}, (2, 6, 6), k=2)
    for m in circular:
        m.features.stage1_block1.conv.padding_mode = "circular"
    with pytest.raises(NotStackable, match="no stacked form for Conv2d layers"):
        stack(circular)
