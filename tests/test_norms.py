"""The normalization catalogue: batch renorm against its equations, group counts, BN diagnostics."""

import math

import pytest
import torch
import yaml
from torch import nn

from nas.data.datasets import load_dataset, stratified_folds
from nas.errors import ConfigError
from nas.models.batch_renorm import BatchRenorm
from nas.models.build import build
from nas.models.norms import NORMS, make_norm, running_stats_layers
from nas.search.config import DatasetConfig, load_run_config
from nas.search.space import default_spec, load_space
from nas.training.cross_validation import cross_validate
from nas.training.diagnostics import recalibrate, train_mode_loss


@pytest.mark.parametrize("dims, shape", [(2, (8, 6, 5, 5)), (1, (8, 6, 7))])
def test_batch_renorm_with_unit_limits_is_batchnorm_in_training_mode(dims, shape):
    torch.manual_seed(0)
    renorm = BatchRenorm(6, dims, momentum=0.2, eps=1e-3, r_max=1.0, d_max=0.0, warmup=0)
    bn = (nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d)(6, momentum=0.2, eps=1e-3)
    with torch.no_grad():
        for layer in (renorm, bn):
            layer.weight.copy_(torch.linspace(0.5, 2.0, 6))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, 6))
    for step in range(3):
        x = torch.randn(*shape) * 3 + step
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_r, out_b = renorm(x1), bn(x2)
        torch.testing.assert_close(out_r, out_b, atol=1e-5, rtol=1e-5)
        (out_r * torch.arange(out_r.numel()).view_as(out_r)).sum().backward()
        (out_b * torch.arange(out_b.numel()).view_as(out_b)).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(renorm.running_mean, bn.running_mean)
        torch.testing.assert_close(renorm.running_var, bn.running_var)
    renorm.eval(), bn.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(renorm(x), bn(x), atol=1e-5, rtol=1e-5)


def test_batch_renorm_clips_r_and_d_as_the_paper_says():
    torch.manual_seed(1)
    layer = BatchRenorm(3, 2, momentum=0.1, eps=1e-5, affine=False, r_max=1.5, d_max=0.5, warmup=0, delay=0)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.0, 5.0, -0.1]))
        layer.running_var.copy_(torch.tensor([1.0, 1.0, 100.0]))
    x = torch.randn(16, 3, 4, 4) * torch.tensor([4.0, 1.0, 1.0]).view(1, 3, 1, 1)
    mu = x.mean((0, 2, 3))
    sigma_b = (x.var((0, 2, 3), unbiased=False) + 1e-5).sqrt()
    sigma = (torch.tensor([1.0, 1.0, 100.0]) + 1e-5).sqrt()
    r = (sigma_b / sigma).clamp(1 / 1.5, 1.5)
    d = ((mu - torch.tensor([0.0, 5.0, -0.1])) / sigma).clamp(-0.5, 0.5)
    expected = (x - mu.view(1, 3, 1, 1)) / sigma_b.view(1, 3, 1, 1) * r.view(1, 3, 1, 1) + d.view(1, 3, 1, 1)
    assert r[0] == 1.5 and r[2] == pytest.approx(1 / 1.5) and d[1] == -0.5  # the clips are active
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_batch_renorm_keeps_plain_batch_statistics_until_its_running_statistics_converge_then_relaxes():
    layer = BatchRenorm(2, 2, momentum=0.5, r_max=3.0, d_max=4.0, warmup=10)
    assert layer.delay == 6  # 3 / momentum steps
    seen = []
    for _ in range(17):
        seen.append([round(float(v), 6) for v in layer.limits()])
        layer(torch.randn(4, 2, 3, 3))
    assert seen[:7] == [[1.0, 0.0]] * 7  # steps 0..6: nothing to correct toward yet
    assert seen[11] == [2.0, 2.0] and seen[16] == [3.0, 4.0]


@pytest.mark.parametrize("momentum", [0.01, 0.1, 0.5])
def test_the_delay_lets_the_running_statistics_reach_95_percent(momentum):
    """An exponential average started at 0 (mean) weighs its start by (1 - m)^steps: <= 5 % after the delay."""
    delay = BatchRenorm(1, 2, momentum=momentum).delay
    assert delay == math.ceil(3 / momentum) and (1 - momentum) ** delay <= math.exp(-3) < 0.05


@pytest.mark.parametrize("asked, channels, used", [(8, 12, 4), (3, 16, 1), (16, 16, 16), (32, 8, 8), (6, 1, 1)])
def test_group_counts_that_do_not_divide_the_channels_never_reach_the_model(asked, channels, used):
    layer = make_norm({"type": "group", "groups": asked, "eps": 1e-5, "affine": True}, channels, 2)
    assert layer.num_groups == used and channels % layer.num_groups == 0


def test_built_group_norms_divide_every_layer_they_sit_in():
    spec = default_spec(
        {"stages": 3, "width": 6, "block": {"norm": {"type": "group", "groups": 4, "position": "pre_conv"}}}
    )
    model = build(spec, (3, 16, 16), 10)
    groups = [(m.num_groups, m.num_channels) for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert groups == [(1, 3), (2, 6), (4, 12)]


def trained_bn_model():
    torch.manual_seed(0)
    spec = default_spec({"width": 8, "block": {"norm": {"type": "batch", "momentum": 0.5}}})
    model = build(spec, (1, 8, 8), 4)
    model.train()
    for _ in range(3):
        model(torch.randn(16, 1, 8, 8) * 2 + 1)
    return model


def test_train_mode_loss_uses_batch_statistics_and_restores_the_running_ones():
    model = trained_bn_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(40, 1, 8, 8), torch.randint(0, 4, (40,))
    loss = train_mode_loss(model, x, y, 8, torch.device("cpu"))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
    with torch.no_grad():
        eval_loss = nn.functional.cross_entropy(model(x), y).item()
    assert loss != pytest.approx(eval_loss)  # running stats come from other data than the batch stats


def test_recalibration_sets_running_statistics_to_the_data_average():
    model = trained_bn_model()
    x = torch.randn(64, 1, 8, 8) * 3 - 2
    recalibrate(model, x, 16, torch.device("cpu"))
    first = running_stats_layers(model)[0]
    conv = model.features.stage1_block1.conv
    with torch.no_grad():
        h = conv(x)
    expected_mean = h.mean((0, 2, 3))
    batch_vars = torch.stack([h[i : i + 16].var((0, 2, 3), unbiased=True) for i in range(0, 64, 16)])
    torch.testing.assert_close(first.running_mean, expected_mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.running_var, batch_vars.mean(0), atol=1e-4, rtol=1e-4)
    assert first.momentum == 0.5 and not model.training


def renorm_and_batchnorm_twins(stages: int = 2):
    """A trained batch renorm model (r and d active) and a BatchNorm model with the same weights and statistics."""
    torch.manual_seed(0)
    norm = {"type": "batch_renorm", "momentum": 0.5, "r_max": 3.0, "d_max": 5.0, "warmup": 1}
    spec = default_spec({"stages": stages, "width": 8, "block": {"norm": norm}})
    renorm = build(spec, (1, 8, 8), 4)
    renorm.train()
    for _ in range(12):  # past the 6-step delay and the 1-step relaxation
        renorm(torch.randn(16, 1, 8, 8) * 2 + 1)
    twin_spec = default_spec({"stages": stages, "width": 8, "block": {"norm": {"type": "batch", "momentum": 0.5}}})
    twin = build(twin_spec, (1, 8, 8), 4)
    twin.load_state_dict(renorm.state_dict())
    return renorm, twin


def test_recalibrating_batch_renorm_estimates_what_batchnorm_estimates_from_the_same_weights():
    renorm, twin = renorm_and_batchnorm_twins()
    x = torch.randn(64, 1, 8, 8) * 3 - 2  # other data than it trained on: r and d would correct toward stale statistics
    for model in (renorm, twin):
        recalibrate(model, x, 16, torch.device("cpu"))
    for name, value in twin.state_dict().items():
        if "running" in name:
            torch.testing.assert_close(renorm.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert [m.r_max for m in running_stats_layers(renorm)] == [3.0, 3.0]  # the limits are back


def test_train_mode_loss_of_batch_renorm_is_the_loss_with_batch_statistics():
    renorm, twin = renorm_and_batchnorm_twins()
    x, y = torch.randn(40, 1, 8, 8) * 3 - 2, torch.randint(0, 4, (40,))
    cpu = torch.device("cpu")
    assert train_mode_loss(renorm, x, y, 8, cpu) == pytest.approx(train_mode_loss(twin, x, y, 8, cpu), rel=1e-5)
    assert train_mode_loss(renorm, x, y, 8, cpu) != pytest.approx(
        nn.functional.cross_entropy(renorm.eval()(x), y).item(), rel=1e-3
    )


def test_recalibration_splits_into_near_equal_batches_weighted_by_size():
    torch.manual_seed(0)
    spec = default_spec({"stages": 4, "width": 4, "block": {"norm": {"type": "batch"}}})  # 8x8 -> 1x1 at stage 4
    model = build(spec, (1, 8, 8), 4)
    x = torch.randn(65, 1, 8, 8)
    recalibrate(model, x, 64, torch.device("cpu"))  # 64 + 1 would leave one value per channel at 1x1
    first = running_stats_layers(model)[0]
    with torch.no_grad():
        h = model.features.stage1_block1.conv(x)
    torch.testing.assert_close(
        first.running_mean, h.mean((0, 2, 3)), rtol=1e-5, atol=1e-6
    )  # 33 and 32, weighted: the mean of all 65
    halves = h[:33].var((0, 2, 3), unbiased=True) * 33 / 65 + h[33:].var((0, 2, 3), unbiased=True) * 32 / 65
    torch.testing.assert_close(first.running_var, halves, rtol=1e-5, atol=1e-6)


def test_the_wilcoxon_pruner_is_told_the_scored_fold_loss():
    data = load_dataset(DatasetConfig())
    data.x_train, data.y_train = data.x_train[:240], data.y_train[:240]
    folds = stratified_folds(data.y_train, 3, 0)
    told = []
    spec = default_spec({"stages": 1, "width": 8, "block": {"norm": {"type": "batch", "momentum": 0.9}}})
    score = cross_validate(
        spec, data, folds, 2, torch.device("cpu"), on_fold=lambda k, loss: told.append(loss), recalibrate_bn=True
    )
    assert told == score["fold_losses"] and score["cv_loss"] == score["recalibrated_loss"]
    assert score["recalibrated_loss"] != pytest.approx(score["eval_mode_loss"], rel=1e-6)


# --------------------------------------------------------------------------- names users type


@pytest.mark.parametrize(
    "typed, key",
    [
        ("batchnorm", "batch"),
        ("bn", "batch"),
        ("batch_norm", "batch"),
        ("BatchNorm2d", "batch"),
        ("BatchNorm1d", "batch"),
        ("renorm", "batch_renorm"),
        ("brn", "batch_renorm"),
        ("BatchRenorm", "batch_renorm"),
        ("groupnorm", "group"),
        ("gn", "group"),
        ("GroupNorm", "group"),
        ("layernorm", "layer"),
        ("ln", "layer"),
        ("LayerNorm", "layer"),
        ("instancenorm", "instance"),
        ("in", "instance"),
        ("InstanceNorm2d", "instance"),
        ("identity", "none"),
    ],
)
def test_a_common_norm_name_suggests_its_registry_key(tmp_path, typed, key):
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump({"block": {"norm": {"type": {"choice": [typed, "none" if key != "none" else "batch"]}}}})
    )

    with pytest.raises(ConfigError) as info:
        load_space(space)

    assert info.value.key_path == "block.norm.type.choice[0]"
    assert str(info.value).endswith(f"did you mean '{key}'?")


def test_a_run_config_with_batchnorm_in_its_space_suggests_batch(tmp_path):
    (tmp_path / "space.yaml").write_text("block:\n  norm:\n    type: {choice: [batchnorm, none]}\n")
    (tmp_path / "run.yaml").write_text("search_space: space.yaml\n")

    with pytest.raises(ConfigError) as info:
        load_run_config(tmp_path / "run.yaml")

    assert str(info.value) == (
        f"{tmp_path / 'space.yaml'}: block.norm.type.choice[0]: unknown norm 'batchnorm' "
        f"(known: {', '.join(NORMS)}); did you mean 'batch'?"
    )
