"""Every norm type x position x activation builds and trains in 1-D and 2-D; the data's rank picks the dims."""

import pytest
import torch
from conftest import spec_with
from torch import nn

from nas.models.batch_renorm import BatchRenorm
from nas.models.build import build
from nas.models.norms import ACTIVATIONS, NORMS, POSITIONS, is_norm, make_norm
from nas.search.space import RESIDUAL_ORDERS, SHARE_MODES, default_spec

SHAPES = {"2d": (3, 12, 12), "1d_channels": (2, 20), "1d_signal": (20,)}


NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, BatchRenorm)
LAYOUTS = [("plain", p) for p in POSITIONS] + [("residual", o) for o in RESIDUAL_ORDERS]


def train_one_step(model: nn.Module, shape: tuple) -> torch.Tensor:
    x = torch.randn(4, *shape)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    return loss


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("share", SHARE_MODES)
@pytest.mark.parametrize("block_type, position", LAYOUTS)
@pytest.mark.parametrize("norm_type", NORMS)
def test_every_norm_layout_builds_and_trains_a_step(shape_name, share, block_type, position, norm_type):
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    spec = spec_with(norm_type, position, block_type=block_type, share=share)
    if NORMS[norm_type].images_only and len(shape) != 3:
        with pytest.raises(ValueError, match=f"norm {norm_type} works on images"):
            build(spec, shape, num_classes=5)
        return
    model = build(spec, shape, num_classes=5)
    loss = train_one_step(model, shape)
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    dims = 2 if len(shape) == 3 else 1
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert convs and all(isinstance(c, nn.Conv2d if dims == 2 else nn.Conv1d) for c in convs)
    norms = [m for m in model.modules() if is_norm(m)]
    per_block = 1 if block_type == "plain" else 2
    assert len(norms) == (0 if norm_type == "none" else per_block * 4)
    assert all(
        isinstance(n, (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d, nn.GroupNorm, BatchRenorm))
        for n in norms
        if not NORMS[norm_type].images_only
    )
    model.eval()
    assert torch.isfinite(model(torch.randn(2, *shape))).all()


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_runs_forward_and_backward(shape_name, activation):
    shape = SHAPES[shape_name]
    model = build(spec_with("batch", "post_conv", activation), shape, num_classes=5)
    assert torch.isfinite(train_one_step(model, shape))
    assert isinstance(model.features.stage1_block1.act, ACTIVATIONS[activation])


def test_norm_settings_reach_the_layer():
    spec = default_spec({"block": {"norm": {"type": "batch", "momentum": 0.3, "eps": 1e-3, "affine": False}}})
    bn = build(spec, (1, 8, 8), 3).features.stage1_block1.norm
    assert (bn.momentum, bn.eps, bn.affine) == (0.3, 1e-3, False)


@pytest.mark.parametrize("method", ["maxpool", "avgpool", "stride"])
def test_downsampling_stops_at_a_one_pixel_map(method):
    model = build(default_spec({"stages": 6, "width": 2, "downsample": method}), (1, 8, 8), 3)
    sizes, x = [], torch.randn(2, 1, 8, 8)
    for layer in model.features:
        x = layer(x)
        sizes.append(x.shape[-1])
    assert min(sizes) == 1 and model(torch.randn(2, 1, 8, 8)).shape == (2, 3)
    assert sizes[-1] == 1


def test_rebuilding_a_spec_gives_the_same_architecture():
    spec = spec_with("batch", "pre_conv", "gelu", blocks_per_stage=2)
    a, b = build(spec, (3, 16, 16), 10), build(spec, (3, 16, 16), 10)
    assert str(a) == str(b)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


def test_input_of_an_unsupported_rank_is_refused():
    with pytest.raises(ValueError, match="expected"):
        build(default_spec(), (1, 2, 3, 4), 3)


@pytest.mark.parametrize(
    "norm_type, absorbed", [("batch", True), ("instance", True), ("group", False), ("layer", False)]
)
def test_a_per_channel_bias_is_absorbed_only_by_a_norm_that_centers_each_channel(norm_type, absorbed):
    torch.manual_seed(0)
    norm = make_norm(
        {"type": norm_type, "momentum": 0.1, "eps": 1e-5, "affine": True, "track_running_stats": True, "groups": 2},
        4,
        2,
    )
    x, b = torch.randn(6, 4, 5, 5), torch.randn(1, 4, 1, 1)
    change = norm(x + b) - norm(x)
    assert (change.abs().max().item() < 1e-5) == absorbed
