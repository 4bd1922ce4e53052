"""Model families (issue 31): timm / torchvision / factory networks whose norms are the search dimension.

Small members only: timm's test_resnet (373k parameters) and test_efficientnet (its norms are fused
BatchNormAct2d), torchvision's resnet18 for the non-timm stage rule, and the factories in user_nets.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from torch import nn

from nas.cli import bench_main, export_main, finetune_main, predict_main, report_main
from nas.deploy.export import rebuild
from nas.errors import ConfigError
from nas.models.bn_fold import count_norms_with_running_stats, fold_norms
from nas.models.build import build
from nas.models.norm_swap import norm_sites
from nas.search.archspec import describe_norms, norm_group
from nas.search.model_check import check_model
from nas.search.space import Space, validate_space

timm = pytest.importorskip("timm")
TESTS = Path(__file__).parent
DIGITS = ((1, 8, 8), 10)


def space_with(model: dict, **extra) -> dict:
    return {"model": model, **extra}


def refusal(space: dict, shape=DIGITS) -> str:
    with pytest.raises(ConfigError) as caught:
        validate_space(space, "s.yaml")
        check_model(space, "s.yaml", *shape)
    return str(caught.value)


def sample(space: dict, seed: int = 0, shape=DIGITS) -> tuple[dict, dict]:
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    return Space(validate_space(space, "s.yaml"), *shape).sample(trial), trial.params


# --------------------------------------------------------------------------- bad input: one line each


@pytest.mark.parametrize(
    "model, expected",
    [
        ({"timm": "resnet10"}, "s.yaml: model.timm: unknown timm model 'resnet10'; did you mean 'resnet10t'?"),
        ({"torchvision": "resnet19"}, "s.yaml: model.torchvision: unknown torchvision model 'resnet19'; did you mean"),
        (
            {"factory": "no_such_pkg.nets:make"},
            "s.yaml: model.factory: no_such_pkg.nets:make: cannot import no_such_pkg",
        ),
        (
            {"factory": "user_nets:missing"},
            "s.yaml: model.factory: user_nets:missing: user_nets has no callable missing",
        ),
        ({"factory": "user_nets"}, "s.yaml: model.factory: 'user_nets': expected \"package.module:callable\""),
        ({"timm": "test_resnet", "torchvision": "resnet18"}, "s.yaml: model: expected exactly one of timm"),
        (
            {"timm": "test_resnet", "norm": {"position": "pre_conv"}},
            "s.yaml: model.norm.position: a foreign model keeps",
        ),
        ({"timm": "test_resnet", "norm": {"tpye": "batch"}}, "s.yaml: model.norm.tpye: unknown key"),
        ({"timm": "test_resnet", "norm": {"type": "batchnorm"}}, "did you mean 'batch'?"),
        ({"timm": "test_resnet", "norm": {"share": "per_block"}}, "s.yaml: model.norm.share: unknown share mode"),
        ({"timm": "test_resnet", "kwargs": {"drop_rate": {"float": [0.3, 0.1]}}}, "model.kwargs.drop_rate.float: low"),
        (
            {"factory": "user_nets:fixed_norms", "norm": {"type": "group"}},
            "s.yaml: model.norm: user_nets:fixed_norms takes no norm_layer",
        ),
        (
            {"factory": "user_nets:not_a_module"},
            "s.yaml: model.factory: factory user_nets:not_a_module returned dict, not a torch.nn.Module",
        ),
        ({"timm": "test_vit", "norm": {"type": "batch"}}, "s.yaml: model.norm: test_vit has no norm on feature maps"),
        ({"factory": "user_nets:needs_16_pixels"}, "cannot take 1x8x8 inputs (RuntimeError"),
        ("timmm", "s.yaml: model: expected bnnas or mlp or a mapping such as {timm: resnet10t}, got 'timmm'"),
    ],
)
def test_a_model_entry_that_cannot_work_is_refused_in_one_line_naming_its_key(model, expected):
    message = refusal(space_with(model))
    assert expected in message and "\n" not in message


def test_an_input_smaller_than_the_stem_takes_names_the_smallest_that_fits():
    assert refusal(space_with({"factory": "user_nets:needs_16_pixels"})).endswith(
        "; it takes images from 16x16: set dataset.image_size: 16"
    )


def test_keys_of_the_generated_chain_are_refused_for_a_foreign_model():
    assert refusal(space_with({"timm": "test_resnet"}, width=16)) == (
        "s.yaml: width: shapes the generated chain (model: bnnas), not a timm model: leave it out"
    )


def test_per_layer_beyond_the_stated_number_of_parameters_is_refused():
    norm = {"type": {"choice": ["batch", "group"]}, "eps": {"float": [1e-5, 1e-3], "log": True}, "share": "per_layer"}
    message = refusal(space_with({"timm": "resnet50", "norm": norm}), ((3, 32, 32), 10))
    assert message.startswith("s.yaml: model.norm.share: per_layer on resnet50 searches 53 norms x 2 parameters")


# --------------------------------------------------------------------------- the norm as the search dimension


def test_per_stage_names_a_parameter_per_stage_the_model_reports_and_the_spec_lists_every_layer():
    norm = {
        "type": {"choice": ["batch", "group", "layer", "evonorm_b0", "evonorm_s0", "frn", "none"]},
        "share": "per_stage",
    }
    spec, params = sample(space_with({"timm": "test_resnet", "norm": norm}))
    stages = [f["module"] for f in timm.create_model("test_resnet").feature_info]
    assert [k for k in params if k.startswith("model.norm")] == [f"model.norm@{s}.type" for s in stages]
    sites = norm_sites(timm.create_model("test_resnet", in_chans=1, num_classes=10))
    assert [(layer["name"], layer["was"], layer["stage"]) for layer in spec["norms"]["layers"]] == [
        (s["name"], s["was"], s["stage"]) for s in sites
    ]
    for layer in spec["norms"]["layers"]:
        assert layer["norm"]["type"] == params[f"model.norm@{layer['stage']}.type"]


def test_global_share_is_one_decision_and_only_the_chosen_types_settings_are_sampled():
    norm = {"type": {"choice": ["group", "batch"]}, "groups": {"choice": [2, 4]}, "momentum": {"float": [0.01, 0.5]}}
    for seed in range(6):
        spec, params = sample(space_with({"timm": "test_resnet", "norm": norm}), seed)
        kind = params["model.norm.type"]
        assert set(params) == {"model.norm.type", "model.norm.groups" if kind == "group" else "model.norm.momentum"}
        assert {layer["norm"]["type"] for layer in spec["norms"]["layers"]} == {kind}
        assert norm_group(spec) == (kind, "n/a") and describe_norms(spec) == kind


def test_constructor_kwargs_are_searched_and_reach_the_model():
    spec, params = sample(space_with({"timm": "test_resnet", "kwargs": {"drop_rate": {"float": [0.1, 0.3]}}}))
    assert spec["model"] == {
        "family": "timm",
        "name": "test_resnet",
        "kwargs": {"drop_rate": params["model.kwargs.drop_rate"]},
    }
    assert "norms" not in spec and describe_norms(spec) == "own"
    assert build(spec, *DIGITS).drop_rate == params["model.kwargs.drop_rate"]


def test_the_replaced_norms_are_what_the_spec_says_and_a_fused_activation_stays():
    spec, _ = sample(space_with({"timm": "test_efficientnet", "norm": {"type": "group", "groups": 4}}))
    model = build(spec, *DIGITS)
    original = timm.create_model("test_efficientnet", in_chans=1, num_classes=10)
    for layer in spec["norms"]["layers"]:
        assert layer["was"] == "BatchNormAct2d"
        new, old = model.get_submodule(layer["name"]), original.get_submodule(layer["name"])
        assert isinstance(new[0], nn.GroupNorm) and new[0].num_groups == 4
        assert [type(m) for m in new[1:]] == [type(old.drop), type(old.act)]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_none_replaces_a_norm_by_identity():
    spec, _ = sample(space_with({"torchvision": "resnet18", "norm": {"type": "none"}}), shape=((3, 32, 32), 10))
    model = build(spec, (3, 32, 32), 10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.bn1, nn.Identity) and model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_torchvision_stages_are_the_top_level_modules_that_hold_norms():
    sites = norm_sites(build({"model": {"family": "torchvision", "name": "resnet18"}}, (3, 32, 32), 10))
    assert list(dict.fromkeys(s["stage"] for s in sites)) == ["bn1", "layer1", "layer2", "layer3", "layer4"]


def test_a_factory_gets_a_global_norm_through_its_norm_layer_argument():
    spec, _ = sample(space_with({"factory": "user_nets:small_cnn", "norm": {"type": "group", "groups": 2}}))
    assert spec["norms"] == {
        "share": "global",
        "via": "norm_layer",
        "norm": {"type": "group", "groups": 2, "eps": 1e-5, "affine": True},
    }
    model = build(spec, *DIGITS)
    assert [m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)] == [2, 2]


def test_a_foreign_trial_rebuilds_from_its_spec_with_the_same_initial_weights_for_the_same_seed():
    spec, _ = sample(
        space_with({"timm": "test_resnet", "norm": {"type": {"choice": ["batch", "frn"]}, "share": "per_stage"}})
    )
    built = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        built.append(build(spec, *DIGITS).state_dict())
    assert all(torch.equal(a, built[1][k]) for k, a in built[0].items())
    assert not all(torch.equal(a, built[2][k]) for k, a in built[0].items())


# --------------------------------------------------------------------------- BN folded into any graph


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: timm.create_model("test_resnet", in_chans=1, num_classes=10), (1, 16, 16)),
        (lambda: timm.create_model("test_efficientnet", num_classes=10), (3, 32, 32)),
        (lambda: __import__("torchvision").models.resnet18(num_classes=10), (3, 32, 32)),
    ],
    ids=["timm-resnet", "timm-efficientnet-fused", "torchvision-resnet"],
)
def test_every_batchnorm_folds_into_its_conv_and_the_output_is_unchanged(make, shape):
    model = make()
    x = torch.randn(6, *shape)
    with torch.no_grad():
        for _ in range(3):
            model.train()(x * 2 + 1)  # running statistics away from their initial values
        expected = model.eval()(x)
    folded = fold_norms(model)
    assert count_norms_with_running_stats(folded) == 0 and count_norms_with_running_stats(model) > 0
    assert not any("ChannelAffine" in type(m).__name__ for m in folded.modules())  # each folded into a conv
    with torch.no_grad():
        torch.testing.assert_close(folded(x), expected, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- end to end


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "nas.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def write_run(folder: Path, model: dict, trials: int = 2) -> Path:
    (folder / "space.yaml").write_text(
        yaml.safe_dump({"model": model, "training": {"lr": {"float": [0.02, 0.1], "log": True}}})
    )
    config = {
        "dataset": {"name": "digits"},
        "search_space": "space.yaml",
        "study": {
            "name": "f",
            "storage": f"sqlite:///{folder}/nas.db",
            "sampler": "random",
            "trials": trials,
            "seed": 0,
        },
        "evaluation": {"folds": 2, "epochs": 1},
        "device": "cpu",
    }
    (folder / "run.yaml").write_text(yaml.safe_dump(config))
    return folder / "run.yaml"


@pytest.mark.slow
def test_a_timm_search_scores_its_trials_and_exports_the_best_with_bn_folded(tmp_path):
    config = write_run(
        tmp_path, {"timm": "test_resnet", "norm": {"type": {"choice": ["batch", "group"]}, "share": "per_stage"}}
    )
    searched = run(["--config", str(config), "--no-progress"], tmp_path)
    assert searched.returncode == 0, searched.stderr
    trials = optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path}/nas.db").get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for t in trials:
        assert t.user_attrs["arch"]["model"]["name"] == "test_resnet" and t.user_attrs["fold_mode"] == "sequential"
        assert t.user_attrs["fold_mode_fallback"] == "a timm model has no stacked form: its folds train one by one"
    assert "act1" in searched.stdout  # the table names the stages
    assert searched.stderr.count("no stacked form") == 1  # said once, not per trial
    out = tmp_path / "exported"
    assert (
        export_main(["--storage", f"sqlite:///{tmp_path}/nas.db", "--study", "f", "--out", str(out), "--epochs", "1"])
        == 0
    )
    meta = json.loads((out / "model.json").read_text())
    assert meta["arch"]["model"]["name"] == "test_resnet"
    scripted = torch.jit.load(str(out / "model.ts"))
    assert not [m for m in scripted.modules() if m.original_name.startswith("BatchNorm")]  # folded away
    rebuilt = rebuild(out, meta)
    assert count_norms_with_running_stats(rebuilt) > 0  # weights.pt: the unfolded model, rebuilt from arch

    # everything after the search takes it like a generated trial
    from sklearn.datasets import load_digits

    np.save(tmp_path / "raw.npy", load_digits().images[:5].astype("float32"))
    assert predict_main(["--model", str(out), str(tmp_path / "raw.npy")]) == 0
    assert bench_main(["--model", str(out), "--batch-sizes", "1", "--repeats", "2", "--warmup", "0"]) == 0
    assert report_main(["--storage", f"sqlite:///{tmp_path}/nas.db", "--study", "f", "--out", str(tmp_path / "r")]) == 0
    assert "timm test_resnet" in (tmp_path / "r" / "report.md").read_text()
    tuned = tmp_path / "tuned"
    assert finetune_main(["--model", str(out), "--config", str(config), "--bn-mode", "adabn", "--out", str(tuned)]) == 0
    assert json.loads((tuned / "model.json").read_text())["arch"] == meta["arch"]


def test_a_model_that_cannot_take_the_data_exits_2_with_one_line_before_any_trial(tmp_path):
    config = write_run(tmp_path, {"factory": "user_nets:needs_16_pixels"})
    result = run(["--config", str(config), "--no-progress"], tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(
        f"{tmp_path / 'space.yaml'}: model.factory: user_nets:needs_16_pixels cannot take 1x8x8"
    )
    assert (
        not (tmp_path / "nas.db").exists()
        or not optuna.load_study(study_name="f", storage=f"sqlite:///{tmp_path}/nas.db").get_trials()
    )


@pytest.mark.slow
def test_the_image_size_the_refusal_names_trains_and_the_export_takes_raw_8x8_digits(tmp_path, capsys):
    config = write_run(tmp_path, {"factory": "user_nets:needs_16_pixels"}, trials=1)
    refused = run(["--config", str(config), "--no-progress"], tmp_path)
    advice = refused.stderr.strip().rsplit("set ", 1)[-1]
    assert refused.returncode == 2 and advice == "dataset.image_size: 16"

    key, value = advice.split(": ")
    searched = run(["--config", str(config), "--no-progress", "--set", f"{key}={value}"], tmp_path)
    assert searched.returncode == 0, searched.stderr
    out = tmp_path / "exported"
    assert export_main(["--storage", f"sqlite:///{tmp_path}/nas.db", "--study", "f", "--out", str(out)]) == 0
    pre = json.loads((out / "model.json").read_text())["preprocessing"]
    assert pre["raw_shape"] == [8, 8] and pre["resize"] == [16, 16] and pre["input_shape"] == [1, 16, 16]

    from sklearn.datasets import load_digits

    np.save(tmp_path / "raw.npy", load_digits().images[:3])
    assert predict_main(["--model", str(out), str(tmp_path / "raw.npy")]) == 0
    tune = ["--model", str(out), "--config", str(config), "--bn-mode", "full"]  # its model has no norm for adabn
    assert finetune_main([*tune, "--out", str(tmp_path / "t")]) == 0  # the target resized as the export was trained
    assert json.loads((tmp_path / "t" / "model.json").read_text())["preprocessing"]["resize"] == [16, 16]
    capsys.readouterr()
    assert finetune_main([*tune, "--out", str(tmp_path / "t12"), "--set", f"{key}=12"]) == 2  # a size it cannot take
    assert capsys.readouterr().err.strip().endswith("takes [1, 16, 16]: set dataset.image_size: 16")


def test_the_dashboard_and_the_tables_show_a_foreign_trials_norms_by_stage():
    from nas.dashboard.state import Problems, arch_view
    from nas.study.tables import summary_table

    norm = {"type": {"choice": ["batch", "group"]}, "share": "per_stage"}
    spec, _ = sample(space_with({"timm": "test_resnet", "norm": norm}), seed=3)
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"arch": spec})
    problems = Problems()
    view = arch_view(trial, problems)
    assert not problems and view["norms"] == describe_norms(spec) and view["activation"] == "own"
    stages = list(dict.fromkeys(layer["stage"] for layer in spec["norms"]["layers"]))
    assert view["layout"].startswith(stages[0]) and stages[-1] in view["layout"] and view["group"][1] == "n/a"
    study = optuna.create_study()
    study.add_trial(trial)
    assert describe_norms(spec) in summary_table(study)
