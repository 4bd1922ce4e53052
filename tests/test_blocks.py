"""nas.models.blocks: the plain block's order for each norm position, the conv bias the norm factory decides,
the residual block's shortcut and its zero-init start; directly and through `build(spec)`."""

import pytest
import torch
from conftest import spec_with
from torch import nn

from nas.models.blocks import ConvBlock, ResidualBlock
from nas.models.build import build
from nas.models.norms import POSITIONS, NormLayer, norm_layer

BATCH = {"type": "batch", "momentum": 0.1, "eps": 1e-5, "affine": True, "track_running_stats": True}


def block_order(model: nn.Module) -> list[str]:
    return list(model.features.stage1_block1._modules)


def test_position_sets_the_order_and_bias_follows_the_norm():
    orders = {p: block_order(build(spec_with("batch", p), (1, 8, 8), 3)) for p in POSITIONS}
    assert orders == {
        "pre_conv": ["norm", "conv", "act"],
        "post_conv": ["conv", "norm", "act"],
        "post_act": ["conv", "act", "norm"],
    }
    bias = lambda p, t="batch": build(spec_with(t, p), (1, 8, 8), 3).features.stage1_block1.conv.bias is not None  # noqa: E731
    assert not bias("post_conv")  # BatchNorm right after the conv makes its bias redundant
    assert bias("post_act") and bias("pre_conv") and bias("post_conv", "none")
    assert not bias("post_conv", "batch_renorm") and not bias("post_conv", "instance")  # they center every channel
    assert bias("post_conv", "group") and bias(
        "post_conv", "layer"
    )  # they center groups of channels: a bias is not absorbed
    assert block_order(build(spec_with("none", "post_conv"), (1, 8, 8), 3)) == ["conv", "act"]


def test_zero_init_residual_block_starts_as_the_identity_path():
    spec = spec_with("batch", "original", block_type="residual")
    model = build(spec, (4, 6, 6), 3)  # width 4 = input channels: identity shortcut in stage 1
    block = model.features.stage1_block1
    x = torch.randn(5, 4, 6, 6)
    block.train()
    torch.testing.assert_close(block(x), torch.relu(x))
    spec["stages"][0]["blocks"][0]["residual"]["zero_init"] = False
    block = build(spec, (4, 6, 6), 3).features.stage1_block1
    assert not torch.allclose(block(x), torch.relu(x))


@pytest.mark.parametrize("position", POSITIONS)
def test_a_conv_block_computes_its_layers_in_the_order_its_position_names(position):
    torch.manual_seed(0)
    block = ConvBlock(3, 5, norm_layer=nn.BatchNorm2d, act_layer=nn.GELU, position=position).eval()
    conv, norm, act = block.conv, block.norm, block.act
    with torch.no_grad():  # statistics and a scale far from the identity, so a norm in the wrong place shows
        norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 7, 7)
    expected = {
        "pre_conv": lambda: act(conv(norm(x))),
        "post_conv": lambda: act(norm(conv(x))),
        "post_act": lambda: norm(act(conv(x))),
    }[position]()
    torch.testing.assert_close(block(x), expected)
    # the norm sees the channels where it sits: the input's before the conv, the conv's after it
    assert norm.num_features == (3 if position == "pre_conv" else 5)
    assert block(x).shape == (2, 5, 7, 7)


def test_the_conv_bias_is_dropped_only_right_before_a_norm_whose_factory_says_it_absorbs_it():
    absorbing = NormLayer(nn.BatchNorm2d, absorbs_conv_bias=True)
    keeping = NormLayer(lambda c: nn.GroupNorm(1, c), absorbs_conv_bias=False)

    def has_bias(norm, position="post_conv"):
        return ConvBlock(3, 4, norm_layer=norm, position=position).conv.bias is not None

    assert not has_bias(absorbing)
    assert has_bias(absorbing, "post_act") and has_bias(absorbing, "pre_conv")  # the act or nothing follows the conv
    assert has_bias(keeping) and has_bias(None)
    assert has_bias(
        nn.BatchNorm2d
    )  # a factory that does not say keeps the bias: never a wrong model, one parameter more
    assert not has_bias(norm_layer(BATCH, 2)) and has_bias(
        norm_layer({"type": "layer", "eps": 1e-5, "affine": True}, 2)
    )


def test_without_a_norm_the_block_is_conv_and_activation_and_dropout_comes_last_when_asked():
    assert list(ConvBlock(3, 4, position="pre_conv")._modules) == ["conv", "act"]
    assert list(ConvBlock(3, 4, norm_layer=nn.BatchNorm2d, dropout=0.5)._modules) == ["conv", "norm", "act", "drop"]
    assert ConvBlock(3, 4, dropout=0.5).drop.p == 0.5


def test_dims_1_makes_a_one_dimensional_block_and_the_stride_shrinks_the_signal():
    block = ConvBlock(2, 6, kernel=5, stride=2, dims=1, norm_layer=nn.BatchNorm1d)
    assert isinstance(block.conv, nn.Conv1d) and block.conv.padding == (2,)
    assert block(torch.randn(3, 2, 20)).shape == (3, 6, 10)


@pytest.mark.parametrize("preact", [False, True])
@pytest.mark.parametrize(
    "in_channels, out_channels, stride, projected",
    [(4, 4, 1, False), (4, 8, 1, True), (4, 4, 2, True), (4, 8, 2, True)],
)
def test_the_residual_shortcut_is_a_1x1_conv_only_where_the_shape_changes(
    preact, in_channels, out_channels, stride, projected
):
    block = ResidualBlock(in_channels, out_channels, stride=stride, norm_layer=nn.BatchNorm2d, preact=preact)
    assert isinstance(block.shortcut, nn.Conv2d) == projected
    assert isinstance(block.shortcut, nn.Identity) == (not projected)
    if projected:
        assert block.shortcut.kernel_size == (1, 1) and block.shortcut.stride == (stride, stride)
    assert block(torch.randn(2, in_channels, 8, 8)).shape == (2, out_channels, 8 // stride, 8 // stride)


def test_the_residual_blocks_compute_the_original_and_the_preactivation_orderings():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    original = ResidualBlock(4, 4, norm_layer=nn.BatchNorm2d).eval()
    b = original
    torch.testing.assert_close(original(x), torch.relu(b.norm2(b.conv2(torch.relu(b.norm1(b.conv1(x))))) + x))
    preact = ResidualBlock(4, 4, norm_layer=nn.BatchNorm2d, preact=True).eval()
    b = preact
    torch.testing.assert_close(preact(x), b.conv2(torch.relu(b.norm2(b.conv1(torch.relu(b.norm1(x)))))) + x)


def test_zero_init_makes_the_original_block_start_as_its_shortcut_through_the_activation():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6)
    same = ResidualBlock(4, 4, norm_layer=norm_layer(BATCH, 2), zero_init=True)
    torch.testing.assert_close(same(x), torch.relu(x))  # identity shortcut: the block is the activation of x
    wider = ResidualBlock(4, 8, stride=2, norm_layer=norm_layer(BATCH, 2), zero_init=True)
    torch.testing.assert_close(wider(x), torch.relu(wider.shortcut(x)))
    assert torch.equal(same.norm2.weight, torch.zeros(4)) and torch.equal(same.norm1.weight, torch.ones(4))
    # without a norm (or one without a scale) there is nothing to zero: the branch stays
    for norm in (None, lambda c: nn.BatchNorm2d(c, affine=False)):
        plain = ResidualBlock(4, 4, norm_layer=norm, zero_init=True)
        assert not torch.allclose(plain(x), torch.relu(x))
