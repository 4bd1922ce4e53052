"""Network slimming: channels ranked by BatchNorm scale and cut out for real (every norm position, residual
blocks, MLPs, batch renorm, a timm model), the cut replayed when an export is rebuilt, what cannot be ranked said,
nas-slim end to end with its refusals, and the kept_scales objective."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys

import optuna
import pytest
import torch
import yaml
from conftest import spec_with, write_digits_run
from test_mlp import head_spec, mlp_spec
from torch import nn

from nas.cli import export_main, finetune_main, search_main, slim_main
from nas.deploy.export import load_exported, write_export
from nas.errors import NasError
from nas.models import slimming
from nas.models.bn_fold import fold_norms
from nas.models.build import build
from nas.models.costs import count_macs, count_params
from nas.models.slimming import RANKED
from nas.training.diagnostics import kept_scales

IMAGE = (1, 8, 8)
PLAIN_POSITIONS = ["pre_conv", "post_conv", "post_act"]


def ranked_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, RANKED) and m.weight is not None]


def scatter_scales(model: nn.Module, seed: int = 0) -> nn.Module:
    """Scales in [0.5, 1.5) and shifts and running statistics away from their defaults, as after training."""
    gen = torch.Generator().manual_seed(seed)
    for norm in ranked_norms(model):
        n = norm.weight.numel()
        norm.weight.data = 0.5 + torch.rand(n, generator=gen)
        norm.bias.data = torch.randn(n, generator=gen) * 0.1
        norm.running_mean.data = torch.randn(n, generator=gen) * 0.1
        norm.running_var.data = 0.5 + torch.rand(n, generator=gen)
    return model.eval()


def cut_and_rebuild(spec: dict, shape: tuple, ratio: float) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The source, its cut copy, and a model built fresh from `spec`, cut by the same plan and loaded."""
    source = scatter_scales(build(spec, shape, 10))
    found = slimming.survey(source, shape)
    removed = slimming.plan(found, ratio)
    cut = slimming.remove_channels(copy.deepcopy(source), shape, removed)
    fresh = slimming.remove_channels(build(spec, shape, 10), shape, removed)
    fresh.load_state_dict(cut.state_dict())  # strict: every shape the plan made is the same
    return source, cut, fresh.eval()


SPECS = {
    **{f"plain {p}": (spec_with("batch", p), IMAGE) for p in PLAIN_POSITIONS},
    "residual original": (spec_with("batch", "original", block_type="residual"), IMAGE),
    "residual preact": (spec_with("batch", "preact", block_type="residual"), IMAGE),
    "batch renorm": (spec_with("batch_renorm", "post_conv"), IMAGE),
    **{
        f"mlp {p}": (mlp_spec({"type": "batch", "position": p}), (10,))
        for p in ["pre_linear", "post_linear", "post_act"]
    },
    "mlp residual": (mlp_spec({"type": "batch"}, residual=True), (10,)),
    "chain with a BN head": (head_spec({"type": "batch", "position": "post_linear"}), IMAGE),
}


@pytest.mark.parametrize("name", SPECS)
def test_a_cut_model_is_smaller_and_a_fresh_build_cut_by_the_same_plan_takes_its_weights(name):
    spec, shape = SPECS[name]
    source, cut, fresh = cut_and_rebuild(spec, shape, 0.5)
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.equal(fresh(x), cut(x))
        assert fold_norms(cut)(x).shape == (4, 10)
    assert count_params(fold_norms(cut)) < 0.8 * count_params(fold_norms(source))
    assert count_macs(cut, shape) < 0.8 * count_macs(source, shape)


def zero_weakest(model: nn.Module, share: float) -> int:
    """Zero the scale and shift of the `share` of every ranked norm's channels with the smallest scales: those
    channels then carry nothing, so cutting them must leave the output as it was."""
    zeroed = 0
    for norm in ranked_norms(model):
        k = round(share * norm.weight.numel())
        weakest = norm.weight.detach().argsort()[:k]
        norm.weight.data[weakest] = 0.0
        norm.bias.data[weakest] = 0.0
        zeroed += k
    return zeroed


@pytest.mark.parametrize(
    "name", [f"plain {p}" for p in PLAIN_POSITIONS] + [f"mlp {p}" for p in ["post_linear", "post_act"]]
)
def test_channels_whose_norm_outputs_zero_are_the_ones_cut_and_the_output_does_not_change(name):
    spec, shape = SPECS[name]
    source = scatter_scales(build(spec, shape, 10))
    zeroed = zero_weakest(source, 0.25)
    found = slimming.survey(source, shape)
    removed = slimming.plan(found, zeroed / found.channels)
    assert sum(map(len, removed.values())) == zeroed
    cut = slimming.remove_channels(copy.deepcopy(source), shape, removed)
    x = torch.randn(16, *shape)
    with torch.no_grad():
        torch.testing.assert_close(cut(x), source(x), atol=1e-5, rtol=1e-5)
    assert count_params(cut) < count_params(source)


def test_global_ranking_takes_the_smallest_scales_anywhere_and_layer_scope_the_same_share_of_each():
    source = scatter_scales(build(spec_with("batch", "post_conv"), IMAGE, 10))
    norms = ranked_norms(source)
    norms[0].weight.data *= 0.01  # the first layer's channels are all the weakest
    found = slimming.survey(source, IMAGE)
    first = found.groups[[g.norms for g in found.groups].index([n for n, m in source.named_modules() if m is norms[0]])]
    whole = slimming.plan(found, (first.channels - 1) / found.channels)
    assert whole == {first.root: whole[first.root]} and len(whole[first.root]) == first.channels - 1
    per_layer = slimming.plan(found, 0.5, "layer")
    assert {root: len(c) for root, c in per_layer.items()} == {g.root: round(0.5 * g.channels) for g in found.groups}


def test_a_ratio_that_would_empty_a_layer_is_refused_naming_it_and_the_largest_ratio_that_does_not():
    source = scatter_scales(build(spec_with("batch", "post_conv"), IMAGE, 10))
    ranked_norms(source)[0].weight.data *= 0.01
    found = slimming.survey(source, IMAGE)
    edge = slimming.largest_ratio(found)
    slimming.plan(found, edge)  # keeps one channel there
    with pytest.raises(NasError) as err:
        slimming.plan(found, edge + 1.0 / found.channels)
    assert "would remove every channel of features.stage1_block1.conv" in str(err.value)
    assert f"the largest ratio that keeps a channel in every layer is {edge:.3f}" in str(err.value)
    assert slimming.largest_ratio(found, "layer") == min((g.channels - 1) / g.channels for g in found.groups)


@pytest.mark.parametrize(
    "norm, reason",
    [
        ({"type": "group", "groups": 2}, "is a GroupNorm of 2 groups: it ties its channels together in groups"),
        ({"type": "layer"}, "is a layer norm: it normalizes over all its channels"),
        ({"type": "batch", "affine": False}, "is a BatchNorm without a scale (affine: false)"),
        ({"type": "none"}, "no BatchNorm scales its channels"),
    ],
)
def test_a_model_with_nothing_to_rank_is_refused_saying_why_for_each_layer(norm, reason):
    spec = spec_with("batch", "post_conv")
    for stage in spec["stages"]:
        for block in stage["blocks"]:
            block["norm"] = {**block["norm"], **norm}
    found = slimming.survey(build(spec, IMAGE, 10), IMAGE)
    with pytest.raises(NasError) as err:
        slimming.check_prunable(found)
    message = str(err.value)
    assert message.startswith("the model has no channels to rank by BatchNorm scale") and reason in message
    assert "\n" not in message


def test_in_a_mixed_model_batchnorm_layers_are_ranked_and_the_group_norm_layers_left_whole_with_the_reason():
    spec = spec_with("batch", "post_conv")
    spec["stages"][1]["blocks"][0]["norm"] = {"type": "group", "groups": 2, "eps": 1e-5, "affine": True}
    source = scatter_scales(build(spec, IMAGE, 10))
    found = slimming.survey(source, IMAGE)
    assert found.left == {
        "features.stage2_block1.conv": "features.stage2_block1.norm is a GroupNorm of 2 groups: it ties its "
        "channels together in groups"
    }
    cut = slimming.remove_channels(copy.deepcopy(source), IMAGE, slimming.plan(found, 0.5))
    assert cut.features.stage2_block1.conv.out_channels == source.features.stage2_block1.conv.out_channels
    assert cut.features.stage1_block1.conv.out_channels < source.features.stage1_block1.conv.out_channels


def test_a_timm_resnet_is_cut_through_its_residual_additions_and_rebuilt_from_its_spec():
    pytest.importorskip("timm")
    spec = {"model": {"family": "timm", "name": "resnet10t", "kwargs": {}}, "training": {}}
    shape = (3, 32, 32)
    source, cut, fresh = cut_and_rebuild(spec, shape, 0.4)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(fresh(x), cut(x))
    assert count_params(cut) < 0.8 * count_params(source)


# --- nas-slim end to end ---------------------------------------------------------------------------------------


BN_SPACE = {
    "stages": 2,
    "width": 16,
    "block": {"norm": {"type": "batch", "position": "post_conv"}},
    "training": {"batch_size": 32, "lr": 0.05},
}


@pytest.fixture(scope="module")
def slim_source(tmp_path_factory):
    """A digits export trained with the sparsity penalty: a real search of one trial, then nas-export with
    --bn-sparsity."""
    root = tmp_path_factory.mktemp("slim")
    write_digits_run(
        root,
        BN_SPACE,
        f"sqlite:///{root}/nas.db",
        {"name": "d", "sampler": "random", "trials": 1},
        {"folds": 2, "epochs": 1},
    )
    assert search_main(["--config", str(root / "run.yaml"), "--no-progress"]) == 0
    out = root / "exported"
    export = ["--storage", f"sqlite:///{root}/nas.db", "--study", "d", "--out", str(out), "--epochs", "4"]
    assert export_main([*export, "--bn-sparsity", "0.1", "--seed", "3"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"]["training"]["bn_sparsity"] == 0.1 and meta["seed"] == 3
    return out


def slim(source, out, *args: str) -> int:
    return slim_main(["--model", str(source), "--out", str(out), *args])


def written_params_and_macs(folder) -> tuple[int, int]:
    """Parameters and MACs of the files written: model.ts loaded in a fresh process (no bnnas), and the model
    bnnas rebuilds from model.json and weights.pt."""
    script = (
        "import sys, torch; sys.modules['nas'] = None; from torch.utils.flop_counter import FlopCounterMode\n"
        f"m = torch.jit.load('{folder}/model.ts'); c = FlopCounterMode(display=False)\n"
        "with c, torch.no_grad(): m(torch.zeros(1, 1, 8, 8))\n"
        "print(sum(p.numel() for p in m.parameters()), c.get_total_flops() // 2)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    rebuilt = load_exported(folder).model
    assert int(out[0]) == count_params(fold_norms(rebuilt))
    return int(out[0]), int(out[1])


def test_nas_slim_writes_a_smaller_verified_export_that_records_the_cut(slim_source, tmp_path, capsys):
    out = tmp_path / "slim"
    assert slim(slim_source, out, "--ratio", "0.5", "--finetune-epochs", "1", "--batch-sizes", "1,8") == 0
    log = capsys.readouterr().err
    assert "verified in a fresh process" in log
    meta = json.loads((out / "model.json").read_text())
    record = meta["slim"]
    source_params, source_macs = written_params_and_macs(slim_source)
    params, macs = written_params_and_macs(out)
    assert (record["before"]["params"], record["before"]["macs"]) == (source_params, source_macs)
    assert (record["after"]["params"], record["after"]["macs"]) == (params, macs)
    assert params < 0.6 * source_params and macs < 0.6 * source_macs
    removed = sum(g["removed"] for g in record["removed"].values())
    assert (
        removed
        == round(0.5 * sum(g["of"] for g in record["removed"].values()))
        == sum(map(len, meta["removed_channels"][0].values()))
    )
    assert set(record["after"]["latency"]) == {"1", "8"} and record["after"]["latency"]["8"]["median_ms"] > 0
    assert (
        meta["test"]["accuracy"] == pytest.approx(record_accuracy(log), abs=5e-5)
        and 0.0 <= record["pruned_test"]["accuracy"] <= 1.0
    )
    # an export of an export: nas-finetune rebuilds the cut model from data and keeps the cut for the next rebuild
    again = tmp_path / "again"
    assert (
        finetune_main(
            [
                "--model",
                str(out),
                "--config",
                str(slim_source.parent / "run.yaml"),
                "--bn-mode",
                "adabn",
                "--out",
                str(again),
            ]
        )
        == 0
    )
    assert json.loads((again / "model.json").read_text())["removed_channels"] == meta["removed_channels"]
    assert written_params_and_macs(again) == (params, macs)


def record_accuracy(log: str) -> float:
    return float(log.strip().splitlines()[-1].rsplit(" ", 1)[1])


def test_a_sweep_writes_one_export_per_ratio_and_the_trade_off_table_and_plot(slim_source, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert slim(slim_source, out, "--sweep", "0.3,0.6", "--finetune-epochs", "0", "--batch-sizes", "1") == 0
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [float(r["ratio"]) for r in rows] == [0.0, 0.3, 0.6]
    params = [int(r["params"]) for r in rows]
    assert params[0] > params[1] > params[2]
    assert [written_params_and_macs(out / f"ratio-{r:.2f}")[0] for r in (0.3, 0.6)] == params[1:]
    table = (out / "sweep.md").read_text().split("```")[1].strip().splitlines()
    assert [line.split()[0] for line in table[2:]] == ["source", "0.30", "0.60"]
    assert (out / "sweep.png").stat().st_size > 10_000
    assert "ms @ batch 1" in capsys.readouterr().err


def test_a_params_target_takes_the_smallest_ratio_that_meets_it(slim_source, tmp_path):
    before = written_params_and_macs(slim_source)[0]
    out = tmp_path / "target"
    target = str(before // 2)
    assert slim(slim_source, out, "--target-params", target, "--finetune-epochs", "0", "--batch-sizes", "1") == 0
    record = json.loads((out / "model.json").read_text())["slim"]
    assert record["after"]["params"] <= before // 2 and record["target"] == {"kind": "params", "value": before // 2}
    source = load_exported(slim_source).model
    found = slimming.survey(source, IMAGE)
    one_less = record["ratio"] - 1 / found.channels
    smaller = slimming.remove_channels(copy.deepcopy(source), IMAGE, slimming.plan(found, one_less))
    assert count_params(fold_norms(smaller)) > before // 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ratio", "0.99"], "--ratio 0.99: would remove every channel of"),
        (["--target-params", "10"], "--target-params 10: cannot be met: removing the most channels"),
        (["--target-params", "100000000"], "--target-params 1e+08: the model already has"),
        (["--ratio", "1.5"], "--ratio: 1.5 is not a share of channels in (0, 1)"),
        (
            ["--ratio", "0.5", "--set", "dataset.transforms=[{contrast: 0.5}]"],
            '--set: dataset.transforms: [{"contrast":0.5}] here, [] in the data',
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(slim_source, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert slim(slim_source, out, *args, "-q") == 2  # -q: the refusal alone
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1
    assert not out.exists()


def test_an_export_without_batchnorm_scales_is_refused_saying_what_is_and_is_not_prunable(
    slim_source, tmp_path, capsys
):
    meta = json.loads((slim_source / "model.json").read_text())
    meta["arch"] = copy.deepcopy(meta["arch"])
    for stage in meta["arch"]["stages"]:
        for block in stage["blocks"]:
            block["norm"] = {"type": "group", "groups": 4, "eps": 1e-5, "affine": True, "position": "post_conv"}
    model = build(meta["arch"], meta["input_shape"], meta["num_classes"]).eval()
    keep = {k: v for k, v in meta.items() if k not in ("files", "versions", "onnx", "fold_max_abs_diff")}
    write_export(model, torch.randn(8, *meta["input_shape"]), keep, tmp_path / "gn", log=lambda _: None)
    assert slim(tmp_path / "gn", tmp_path / "out", "--ratio", "0.5") == 2
    err = capsys.readouterr().err
    assert err.startswith("the model has no channels to rank by BatchNorm scale") and "GroupNorm of 4 groups" in err
    assert not (tmp_path / "out").exists()


def test_kept_scales_is_an_objective_a_multi_objective_search_minimizes(tmp_path):
    space = {
        "stages": 1,
        "width": 8,
        "block": {"norm": {"type": {"choice": ["batch", "none"]}}},
        "training": {"bn_sparsity": {"float": [0.0, 0.5]}},
    }
    config = write_digits_run(
        tmp_path,
        space,
        f"sqlite:///{tmp_path}/nas.db",
        {"name": "mo", "sampler": "random", "trials": 4, "seed": 1},
        {"folds": 2, "epochs": 1},
    )
    data = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**data, "objectives": ["cv_loss", "kept_scales"]}))
    assert search_main(["--config", str(config), "--no-progress"]) == 0
    trials = optuna.load_study(study_name="mo", storage=f"sqlite:///{tmp_path}/nas.db").get_trials()
    assert len(trials) == 4
    for trial in trials:
        summary = trial.user_attrs.get("norm_scales")
        assert trial.values[1] == kept_scales(summary)
        assert (summary is None) == (trial.params["block.norm.type"] == "none")


def test_export_says_what_the_sparsity_penalty_did_to_the_scales_and_when_it_collapsed_the_model():
    from nas.deploy.export import scales_line

    model = build(spec_with("batch", "post_conv"), IMAGE, 10)
    assert scales_line(model).endswith("p90 1; 0.0% below 0.01")
    for norm in ranked_norms(model):
        norm.weight.data.zero_()
    assert "100.0% below 0.01 (every one: the penalty collapsed the model" in scales_line(model)


def test_a_latency_target_is_met_by_the_smallest_ratio_that_the_measure_says_meets_it():
    from nas.deploy.slim import target_ratio

    source = scatter_scales(build(spec_with("batch", "post_conv"), IMAGE, 10))
    found = slimming.survey(source, IMAGE)
    measured = []

    def measure(model):  # a stand-in for the clock that falls as channels go, as latency does
        measured.append(count_params(model))
        return measured[-1] / 1000

    goal = count_params(source) / 2000
    ratio = target_ratio(source, found, IMAGE, "global", "latency_ms", goal, measure)
    cut = lambda r: slimming.remove_channels(copy.deepcopy(source), IMAGE, slimming.plan(found, r))  # noqa: E731
    assert count_params(cut(ratio)) / 1000 <= goal < count_params(cut(ratio - 1 / found.channels)) / 1000
    assert len(measured) <= 2 + found.channels.bit_length()  # a bisection, not a scan
