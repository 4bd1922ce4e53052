"""fold_norms: every norm type x layout x rank gives the eval model's outputs; running-statistics
norms fold into the conv before them or become a ChannelAffine; data-dependent norms stay; the
folded model scripts and exports with a dynamic batch axis."""

import pytest
import torch
from torch import nn

from nas.models.batch_renorm import BatchRenorm
from nas.models.bn_fold import ChannelAffine, count_norms_with_running_stats, fold_norms
from nas.models.build import build
from nas.models.norms import NORMS, POSITIONS
from nas.search.space import RESIDUAL_ORDERS, default_spec

SHAPES = {"2d": (3, 12, 12), "1d_channels": (2, 20), "1d_signal": (20,)}
LAYOUTS = [("plain", p) for p in POSITIONS] + [("residual", o) for o in RESIDUAL_ORDERS]
BLOCKS = 4  # 2 stages x 2 blocks
# torch 2.14 warns that torch.jit.script is deprecated (a FutureWarning); it still works.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread only waits, and on a busy CPU for long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def norm_variants() -> dict[str, dict]:
    """Every norm type with each of its affine / track_running_stats settings, by test id."""
    variants = {}
    for name, norm in NORMS.items():
        for affine in (True, False) if "affine" in norm.params else (None,):
            for track in (True, False) if "track_running_stats" in norm.params else (None,):
                settings = {"type": name}
                if affine is not None:
                    settings["affine"] = affine
                if track is not None:
                    settings["track_running_stats"] = track
                key = (
                    name
                    + {True: "-affine", False: "-no_affine", None: ""}[affine]
                    + ("-batch_stats" if track is False else "")
                )
                variants[key] = settings
    return variants


VARIANTS = norm_variants()


def running_stats(settings: dict) -> bool:
    return settings["type"] == "batch_renorm" or (settings["type"] == "batch" and settings["track_running_stats"])


def small_spec(settings: dict, block_type: str, position: str) -> dict:
    """2 stages x 2 blocks of width 4 (strided downsampling: 1x1-conv shortcuts in residual blocks)."""
    # High momentum and a 1-step warm-up: the running statistics move and batch renorm's r, d act.
    norm = {
        "momentum": 0.9,
        "warmup": 1,
        "groups": 2,
        "position": position if block_type == "plain" else "post_conv",
        **settings,
    }
    block = {"type": block_type, "activation": "relu", "norm": norm}
    if block_type == "residual":
        block["residual"] = {"order": position, "zero_init": False}
    return default_spec({"stages": 2, "blocks_per_stage": 2, "width": 4, "downsample": "stride", "block": block})


def trained_model(spec: dict, shape: tuple) -> nn.Module:
    """The model after a few SGD steps, its norms' statistics and affine parameters then
    randomized (running_var in [0.1, 10]) so that folding has something to get wrong; eval mode."""
    torch.manual_seed(0)
    model = build(spec, shape, num_classes=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, *shape)), torch.randint(0, 3, (8,))).backward()
        optimizer.step()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.uniform_(-1.0, 1.0)
                m.running_var.copy_(10.0 ** torch.empty_like(m.running_var).uniform_(-1.0, 1.0))
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, BatchRenorm, nn.GroupNorm)) and m.weight is not None:
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-1.0, 1.0)
    return model.eval()


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("block_type, position", LAYOUTS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_folded_model_gives_the_eval_outputs_and_keeps_only_data_dependent_norms(
    variant, block_type, position, shape_name
):
    settings, shape = VARIANTS[variant], SHAPES[shape_name]
    if NORMS[settings["type"]].images_only and len(shape) != 3:
        pytest.skip("an image-only norm (test_build checks that 1-D data refuses it)")
    model = trained_model(small_spec(settings, block_type, position), shape)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = list(model.modules())

    folded = fold_norms(model)

    x = torch.randn(5, *shape)
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() <= 1e-4
    assert not folded.training and not any(m.training for m in folded.modules())
    # The input model is untouched: same modules, same values.
    assert list(model.modules()) == modules_before and count(model, ChannelAffine) == 0
    assert model.state_dict().keys() == before.keys() and all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items()
    )

    if not running_stats(settings):  # group / layer / instance / batch statistics / none: as they were
        assert [type(m) for m in folded.modules()] == [type(m) for m in model.modules()]
        return
    assert count_norms_with_running_stats(model) == (2 * BLOCKS if block_type == "residual" else BLOCKS)
    assert count_norms_with_running_stats(folded) == 0
    assert count(folded, (nn.modules.batchnorm._BatchNorm, BatchRenorm)) == 0
    # Folded into the conv before it (post_conv, residual original; preact's norm2) vs a ChannelAffine.
    affines = {"pre_conv": BLOCKS, "post_conv": 0, "post_act": BLOCKS, "original": 0, "preact": BLOCKS}[position]
    assert count(folded, ChannelAffine) == affines
    first = folded.features.stage1_block1
    if position == "post_conv":
        assert list(first._modules) == ["conv", "act"] and first.conv.bias is not None
    if block_type == "residual":
        assert isinstance(first.norm2, nn.Identity) and first.conv1.bias is not None
        assert isinstance(first.norm1, ChannelAffine if position == "preact" else nn.Identity)


@pytest.mark.parametrize("block_type, position", LAYOUTS)
@pytest.mark.parametrize("variant", [v for v, s in VARIANTS.items() if running_stats(s)])
def test_folding_adds_no_parameters_and_drops_the_statistics(variant, block_type, position):
    model = trained_model(small_spec(VARIANTS[variant], block_type, position), SHAPES["2d"])
    folded = fold_norms(model)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    state = lambda m: sum(v.numel() for v in m.state_dict().values())  # noqa: E731
    if VARIANTS[variant].get("affine"):  # the norm's scale and shift become the conv's bias, or buffers
        assert params(folded) <= params(model)
    else:  # at most a conv bias per folded norm, for the norm's 2C running statistics
        assert params(folded) <= params(model) + sum(
            n.num_features for n in model.modules() if hasattr(n, "running_var")
        )
    assert state(folded) < state(model)


# torch 2.14: a named Dim with min=1 is accepted; the exported program then runs on batch sizes
# other than the example's, 1 included.
BATCH = torch.export.Dim("batch", min=1, max=4096)


@pytest.mark.parametrize("shape_name", ["2d", "1d_signal"])
@pytest.mark.parametrize(
    "variant, block_type, position",
    [("batch-affine", *layout) for layout in LAYOUTS]
    + [("layer-affine", "residual", "preact"), ("batch-affine-batch_stats", "plain", "post_conv")],
)
def test_folded_model_scripts_and_exports_with_a_dynamic_batch(variant, block_type, position, shape_name):
    shape = SHAPES[shape_name]
    folded = fold_norms(trained_model(small_spec(VARIANTS[variant], block_type, position), shape))
    scripted = torch.jit.script(folded)
    exported = torch.export.export(folded, (torch.randn(5, *shape),), dynamic_shapes={"x": {0: BATCH}}).module()
    with torch.no_grad():
        for batch in (1, 7):
            x = torch.randn(batch, *shape)
            expected = folded(x)
            assert (scripted(x) - expected).abs().max().item() <= 1e-5
            assert (exported(x) - expected).abs().max().item() <= 1e-5


def test_a_model_mixing_norm_positions_folds_and_scripts_block_by_block():
    spec = small_spec(VARIANTS["batch_renorm-affine"], "plain", "post_conv")
    positions = ["pre_conv", "post_act", "post_conv", "pre_conv"]  # as `share: per_block` can sample
    for block, position in zip((b for stage in spec["stages"] for b in stage["blocks"]), positions):
        block["norm"]["position"] = position
    model = trained_model(spec, SHAPES["2d"])
    folded = fold_norms(model)
    assert [list(b._modules) for b in folded.features if isinstance(b, nn.Sequential)] == [
        ["norm", "conv", "act"],
        ["conv", "act", "norm"],
        ["conv", "act"],
        ["norm", "conv", "act"],
    ]
    # TorchScript must not mistake blocks with the same children in another order for one type.
    scripted, x = torch.jit.script(folded), torch.randn(4, *SHAPES["2d"])
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max().item() <= 1e-4
        assert (scripted(x) - folded(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 9), (6, 4, 5, 5)])
def test_channel_affine_is_a_batchnorms_eval_map_on_every_rank(shape):
    bn = (nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d)(4).eval()
    with torch.no_grad():
        (
            bn.running_mean.uniform_(-1, 1),
            bn.running_var.uniform_(0.1, 10),
            bn.weight.uniform_(0.5, 2),
            bn.bias.uniform_(-1, 1),
        )
    folded = fold_norms(nn.Sequential(nn.ReLU(), bn))
    assert isinstance(folded[1], ChannelAffine) and count_norms_with_running_stats(folded) == 0
    x = torch.randn(*shape)
    torch.testing.assert_close(folded(x), bn(torch.relu(x)))


@pytest.mark.parametrize("dims", [1, 2])
def test_a_conv_with_a_bias_folds_the_following_norm_into_weight_and_bias(dims):
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 6, 3, padding=1, groups=2, bias=True)
    bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(6).eval()
    with torch.no_grad():
        conv.bias.uniform_(-1, 1)
        (
            bn.running_mean.uniform_(-1, 1),
            bn.running_var.uniform_(0.1, 10),
            bn.weight.uniform_(0.5, 2),
            bn.bias.uniform_(-1, 1),
        )
    model = nn.Sequential(conv, bn, nn.ReLU()).eval()
    folded = fold_norms(model)
    assert [type(m) for m in folded] == [type(conv), nn.ReLU]
    x = torch.randn(3, 4, *([7] * dims))
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_model_in_training_mode_stays_in_training_mode():
    model = trained_model(small_spec(VARIANTS["batch-affine"], "plain", "post_conv"), SHAPES["2d"]).train()
    folded = fold_norms(model)
    assert model.training and all(m.training for m in model.modules())
    assert count_norms_with_running_stats(model) == BLOCKS
    assert not folded.training and folded is not model
