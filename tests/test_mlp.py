"""BatchNorm in fully-connected layers: the MLP family, the chain's FC head, their folds trained together,
BN folded into Linear layers, and the spaces that describe them."""

import copy

import optuna
import pytest
import torch
from test_folds_together import assert_same_state
from torch import nn

from nas.data.datasets import Dataset, stratified_folds
from nas.errors import ConfigError
from nas.models.bn_fold import ChannelAffine, count_norms_with_running_stats, fold_norms
from nas.models.build import build
from nas.models.mlp import MLP, LinearBlock, ResidualLinearBlock
from nas.models.stacking import stack
from nas.search.archspec import describe_layout, describe_norms, norm_group
from nas.search.space import Space, default_spec, validate_space

FC_TYPES = ["batch", "batch_renorm", "layer", "group", "none"]
FC_POSITIONS = ["pre_linear", "post_linear", "post_act"]
HP = {"lr": 0.05, "weight_decay": 1e-3, "label_smoothing": 0.1, "batch_size": 32}


def mlp_spec(norm: dict, **keys) -> dict:
    space = {"model": "mlp", "layers": 3, "width": 16, "norm": {**norm, "groups": 4}, "training": HP, **keys}
    return default_spec(validate_space(space, "test space"))


def head_spec(norm: dict, layers: int = 2) -> dict:
    space = {"stages": 1, "width": 8, "head": {"layers": layers, "width": 12, "norm": norm}, "training": HP}
    return default_spec(validate_space(space, "test space"))


@pytest.fixture(scope="module")
def vectors() -> tuple[Dataset, list]:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 3
    x = torch.randn(240, 10, generator=gen) + y[:, None].float()
    return Dataset("vectors", x, y, x[:10], y[:10], ["a", "b", "c"]), stratified_folds(y, 3, 0)


def trained(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """A model whose norms hold statistics a few training batches gave (not the identity they start as)."""
    gen = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *shape, generator=gen) * 3 + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.mark.parametrize("position", FC_POSITIONS)
@pytest.mark.parametrize("norm_type", FC_TYPES)
def test_an_mlp_trains_to_the_same_state_with_its_folds_together_as_one_by_one(vectors, norm_type, position):
    data, folds = vectors
    assert_same_state(mlp_spec({"type": norm_type, "position": position}), data, folds)


@pytest.mark.parametrize("norm_type", ["batch", "layer", "none"])
def test_a_residual_mlp_trains_to_the_same_state_with_its_folds_together(vectors, norm_type):
    data, folds = vectors
    assert_same_state(mlp_spec({"type": norm_type}, residual=True, dropout=0.0), data, folds)


@pytest.mark.parametrize("position", FC_POSITIONS)
def test_a_chain_with_a_batch_norm_head_trains_to_the_same_state_with_its_folds_together(position):
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(240) % 3
    x = torch.randn(240, 1, 8, 8, generator=gen)
    data = Dataset("images", x, y, x[:10], y[:10], ["a", "b", "c"])
    assert_same_state(head_spec({"type": "batch", "position": position}), data, stratified_folds(y, 3, 0))


@pytest.mark.parametrize("position", FC_POSITIONS)
@pytest.mark.parametrize("norm_type", ["batch", "batch_renorm"])
def test_a_folded_mlp_computes_what_it_did_with_every_norm_folded_into_a_linear(norm_type, position):
    model = trained(build(mlp_spec({"type": norm_type, "position": position}), (10,), 3), (10,))
    folded = fold_norms(model)
    x = torch.randn(64, 10)
    assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert count_norms_with_running_stats(folded) == 0
    assert not any(isinstance(m, ChannelAffine) for m in folded.modules())  # every norm went into a Linear
    linears = lambda m: [layer for layer in m.modules() if isinstance(layer, nn.Linear)]  # noqa: E731
    assert len(linears(folded)) == len(linears(model))
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(linears(folded), linears(model)))


def test_a_folded_residual_mlp_and_batch_norm_head_compute_what_they_did():
    for model, shape in (
        (build(mlp_spec({"type": "batch"}, residual=True), (10,), 3), (10,)),
        (build(head_spec({"type": "batch", "position": "post_act"}), (1, 8, 8), 3), (1, 8, 8)),
    ):
        model = trained(model, shape)
        folded = fold_norms(model)
        x = torch.randn(16, *shape)
        assert torch.allclose(folded(x), model(x), atol=1e-5)
        assert count_norms_with_running_stats(folded) == 0
        torch.jit.script(folded)


def test_the_stacked_mlp_computes_each_folds_model_on_its_own_batch():
    spec = mlp_spec({"type": "batch", "position": "post_act"}, schedule="halving", width=32)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(build(spec, (10,), 4))
    stacked = stack(models)
    xs = torch.randn(3, 8, 10)
    expected = torch.stack([m(x) for m, x in zip(models, xs)])
    assert torch.allclose(stacked.model(stacked.fold_input(xs)), expected, atol=1e-5)


def test_an_mlp_space_samples_layers_widths_and_norms_by_key_path():
    space = {
        "model": "mlp",
        "layers": {"int": [2, 4]},
        "width": {"choice": [32, 64]},
        "schedule": {"choice": ["constant", "halving", "per_layer"]},
        "residual": {"choice": [False, True]},
        "norm": {
            "type": {"choice": ["batch", "layer", "none"]},
            "position": {"choice": FC_POSITIONS},
            "share": "per_layer",
        },
    }
    sampler = Space(validate_space(space, "s.yaml"))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        spec = sampler.sample(trial)
        study.tell(trial, 0.0)
        layers = spec["mlp"]["layers"]
        assert len(layers) == trial.params["layers"]
        residual = trial.params["residual"]
        for i, layer in enumerate(layers, start=1):
            assert layer["norm"]["type"] == trial.params[f"layer{i}.norm.type"]
            has_position = f"layer{i}.norm.position" in trial.params
            assert has_position == (not residual and layer["norm"]["type"] != "none")
            assert layer["type"] == ("residual" if residual else "plain")
        widths = [layer["width"] for layer in layers]
        schedule = None if residual else trial.params["schedule"]
        if residual or schedule == "constant":
            assert widths == [trial.params["width"]] * len(widths)
        elif schedule == "halving":
            assert widths == [max(8, trial.params["width"] >> i) for i in range(len(widths))]
        else:
            assert widths == [trial.params[f"layer{i}.width"] for i in range(1, len(widths) + 1)]
        seen.add(schedule)
        out = build(spec, (5,), 2)(torch.randn(4, 5))
        assert out.shape == (4, 2)
    assert seen == {None, "constant", "halving", "per_layer"}


def test_a_head_with_no_layers_leaves_the_spec_and_model_as_before():
    spec = default_spec({"stages": 1, "width": 8})
    assert "head" not in spec
    assert isinstance(build(spec, (1, 8, 8), 10).head, nn.Linear)


def test_a_head_that_shares_the_blocks_norm_takes_its_type_and_settings_with_its_own_position():
    space = {
        "stages": 1,
        "width": 8,
        "block": {"norm": {"type": "batch_renorm", "momentum": 0.3, "position": "pre_conv"}},
        "head": {"layers": 2, "norm": {"share": "blocks", "position": "post_act"}},
    }
    spec = default_spec(validate_space(space, "s.yaml"))
    block_norm = spec["stages"][0]["blocks"][0]["norm"]
    for layer in spec["head"]["layers"]:
        assert layer["norm"] == {**block_norm, "position": "post_act"}
    head = build(spec, (1, 8, 8), 10).head
    assert [type(m).__name__ for m in head] == ["LinearBlock", "LinearBlock", "Linear"]
    assert head.fc1.position == "post_act" and type(head.fc1.norm).__name__ == "BatchRenorm"


def test_a_head_norm_is_searched_independently_of_the_blocks_norm():
    space = {
        "stages": 1,
        "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
        "head": {"layers": 1, "norm": {"type": {"choice": ["batch", "layer"]}, "position": {"choice": FC_POSITIONS}}},
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    sampler = Space(validate_space(space, "s.yaml"))
    for _ in range(8):
        trial = study.ask()
        spec = sampler.sample(trial)
        study.tell(trial, 0.0)
        assert spec["head"]["layers"][0]["norm"]["type"] == trial.params["head.norm.type"]
        assert spec["head"]["layers"][0]["norm"]["position"] == trial.params["head.norm.position"]
        assert "head.layers" not in trial.params  # a constant is not a parameter


@pytest.mark.parametrize(
    "space, words",
    [
        (
            {"model": "mlp", "norm": {"type": "instance"}},
            "s.yaml: norm.type: unknown norm for fully-connected layers 'instance'",
        ),
        (
            {"model": "mlp", "norm": {"type": {"choice": ["batch", "evonorm_s0"]}}},
            "s.yaml: norm.type.choice[1]: unknown norm for fully-connected layers 'evonorm_s0'",
        ),
        ({"model": "mlp", "norm": {"position": "post_conv"}}, "s.yaml: norm.position: unknown norm position"),
        ({"model": "mlp", "stages": 2}, "s.yaml: stages: unknown key (known: layers, width"),
        ({"model": "mlp", "norm": {"share": "per_stage"}}, "s.yaml: norm.share: unknown share mode 'per_stage'"),
        ({"model": "mlpp"}, "s.yaml: model: expected bnnas or mlp or a mapping"),
        (
            {"block": {"norm": {"type": {"choice": ["batch", "instance"]}}}, "head": {"norm": {"share": "blocks"}}},
            "s.yaml: head.norm.share: blocks: the blocks' norm can be instance",
        ),
        ({"head": {"layers": -1}}, "s.yaml: head.layers: must be >= 0"),
        ({"model": "mlp", "training": {"l1": {"float": [0, 0.1]}}}, "s.yaml: training.l1: penalizes conv kernels"),
        (
            {"model": {"timm": "resnet10t"}, "head": {"layers": 1}},
            "s.yaml: head: shapes the generated chain (model: bnnas), not a timm model",
        ),
    ],
)
def test_a_bad_fully_connected_space_is_refused_naming_the_key(space, words):
    with pytest.raises(ConfigError) as caught:
        validate_space(space, "s.yaml")
    assert str(caught.value).startswith(words), str(caught.value)


def test_tables_describe_an_mlp_by_its_layers_norms_and_positions():
    plain = mlp_spec({"type": "batch", "position": "post_act"})
    assert norm_group(plain) == ("batch", "post_act")
    assert describe_norms(plain) == "batch @ post_act"
    assert describe_layout(plain).startswith("l1..l3 batch@post_act(m=0.1")
    residual = mlp_spec({"type": "layer"}, residual=True)
    assert norm_group(residual) == ("layer", "residual:preact")
    mixed = copy.deepcopy(plain)
    mixed["mlp"]["layers"][2]["norm"] = {"type": "none"}
    assert describe_norms(mixed) == "l1..l2: batch @ post_act  l3: none"
    head = head_spec({"type": "batch", "position": "pre_linear"})
    assert "head1..head2 batch@pre_linear" in describe_layout(head)


def test_mlp_blocks_keep_their_position_as_a_torchscript_constant():
    model = build(mlp_spec({"type": "batch", "position": "pre_linear"}), (10,), 3).eval()
    assert isinstance(model, MLP) and isinstance(model.features.layer1, LinearBlock)
    assert [name for name, _ in model.features.layer1.named_children()] == ["norm", "linear", "act"]
    assert model.features.layer1.linear.bias is not None  # no norm right after it to absorb its bias
    post = build(mlp_spec({"type": "batch", "position": "post_linear"}), (10,), 3)
    assert post.features.layer1.linear.bias is None
    x = torch.randn(4, 10)
    assert torch.allclose(torch.jit.script(model)(x), model(x))
    residual = build(mlp_spec({"type": "batch"}, residual=True), (10,), 3)
    assert isinstance(residual.features.layer1, ResidualLinearBlock)


def test_the_dashboard_shows_an_mlp_trials_norm_group_and_layout():
    from nas.dashboard.state import Problems, arch_view

    spec = mlp_spec({"type": "batch", "position": "pre_linear"})
    trial = optuna.trial.create_trial(value=0.1, user_attrs={"arch": spec})
    problems = Problems()
    view = arch_view(trial, problems)
    assert not problems
    assert view["group"] == ("batch", "pre_linear") and view["activation"] == "relu"
    assert view["layout"].startswith("l1..l3 batch@pre_linear")
