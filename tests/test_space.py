"""Define-by-run sampling: dotted parameter names, conditional parameters only where active."""

import json

import optuna
import pytest

from nas.search.space import Space, default_spec

SPACE = {
    "stages": {"int": [1, 3]},
    "width": {"choice": [8, 16]},
    "block": {
        "activation": {"choice": ["relu", "gelu"]},
        "norm": {
            "type": {"choice": ["batch", "none"]},
            "position": {"choice": ["pre_conv", "post_conv", "post_act"]},
            "momentum": {"float": [0.01, 0.5], "log": True},
            "eps": {"float": [1e-5, 1e-2], "log": True},
            "affine": {"choice": [True, False]},
        },
    },
    "training": {"lr": {"float": [1e-3, 0.3], "log": True}, "batch_size": {"choice": [16, 32]}},
}


def sample(space: dict, params: dict) -> tuple[dict, set]:
    trial = optuna.trial.FixedTrial(params)
    spec = Space(space).sample(trial)
    return spec, set(trial.params)


BASE = {"stages": 2, "width": 8, "block.activation": "relu", "training.lr": 0.01, "training.batch_size": 16}


def test_norm_settings_are_sampled_only_for_a_norm_that_takes_them():
    spec, asked = sample(SPACE, {**BASE, "block.norm.type": "none"})
    assert {"block.norm.position", "block.norm.momentum", "block.norm.eps", "block.norm.affine"}.isdisjoint(asked)
    assert spec["stages"][0]["blocks"][0]["norm"] == {"type": "none"}

    params = {
        **BASE,
        "block.norm.type": "batch",
        "block.norm.position": "post_act",
        "block.norm.momentum": 0.2,
        "block.norm.eps": 1e-3,
        "block.norm.affine": False,
    }
    spec, asked = sample(SPACE, params)
    assert asked == set(params)
    assert spec["stages"][1]["blocks"][0]["norm"] == {
        "type": "batch",
        "position": "post_act",
        "momentum": 0.2,
        "eps": 1e-3,
        "affine": False,
        "track_running_stats": True,
    }


def test_spec_is_plain_json_with_doubling_widths_and_defaults_for_silent_keys():
    spec, _ = sample(SPACE, {**BASE, "stages": 3, "block.norm.type": "none"})
    assert json.loads(json.dumps(spec)) == spec
    assert [s["width"] for s in spec["stages"]] == [8, 16, 32]
    assert [s["downsample"] for s in spec["stages"]] == ["none", "maxpool", "maxpool"]
    assert spec["training"] == {
        "optimizer": "sgd",
        "lr": 0.01,
        "weight_decay": 5e-4,
        "l1": 0.0,
        "bn_sparsity": 0.0,
        "label_smoothing": 0.0,
        "batch_size": 16,
    }
    assert spec["stages"][0]["blocks"][0]["kernel"] == 3 and spec["stages"][0]["blocks"][0]["type"] == "plain"


@pytest.mark.parametrize(
    "share, names",
    [
        ("global", {"block.norm.type"}),
        ("per_stage", {"stage1.block.norm.type", "stage2.block.norm.type"}),
        (
            "per_block",
            {
                "stage1.block1.norm.type",
                "stage1.block2.norm.type",
                "stage2.block1.norm.type",
                "stage2.block2.norm.type",
            },
        ),
    ],
)
def test_share_mode_names_each_decision_where_it_applies(share, names):
    space = {
        "stages": 2,
        "blocks_per_stage": 2,
        "block": {"norm": {"type": {"choice": ["batch", "none"]}, "share": share}},
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    trial = study.ask()
    spec = Space(space).sample(trial)
    assert {n for n in trial.params if n.endswith("norm.type")} == names
    for i, stage in enumerate(spec["stages"]):  # every block follows the decision that names it
        for j, block in enumerate(stage["blocks"]):
            name = {
                "global": "block.norm.type",
                "per_stage": f"stage{i + 1}.block.norm.type",
                "per_block": f"stage{i + 1}.block{j + 1}.norm.type",
            }[share]
            assert block["norm"]["type"] == trial.params[name]


def test_seeded_samplers_repeat_their_choices():
    def first_specs(seed):
        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True))
        return [Space(SPACE).sample(study.ask()) for _ in range(3)]

    assert first_specs(3) == first_specs(3)
    assert first_specs(3) != first_specs(4)


def test_default_spec_takes_first_choices():
    spec = default_spec(SPACE)
    assert len(spec["stages"]) == 1 and spec["stages"][0]["width"] == 8
    assert spec["stages"][0]["blocks"][0]["norm"]["position"] == "pre_conv"


CATALOGUE = {
    "block": {
        "type": {"choice": ["plain", "residual"]},
        "residual": {"order": {"choice": ["original", "preact"]}, "zero_init": {"choice": [True, False]}},
        "norm": {
            "type": {"choice": ["batch", "batch_renorm", "group", "layer", "instance", "none"]},
            "position": {"choice": ["pre_conv", "post_conv"]},
            "momentum": {"float": [0.01, 0.5]},
            "r_max": {"float": [1.0, 4.0]},
            "d_max": {"float": [0.0, 5.0]},
            "groups": {"choice": [2, 4, 8]},
            "eps": {"float": [1e-5, 1e-3], "log": True},
        },
    }
}


@pytest.mark.parametrize(
    "norm_type, own",
    [
        ("batch", {"momentum", "eps"}),
        ("batch_renorm", {"momentum", "eps", "r_max", "d_max"}),
        ("group", {"groups", "eps"}),
        ("layer", {"eps"}),
        ("instance", {"eps"}),
        ("none", set()),
    ],
)
def test_each_norm_type_samples_only_its_own_settings(norm_type, own):
    params = {
        "block.type": "plain",
        "block.norm.type": norm_type,
        "block.norm.position": "pre_conv",
        "block.norm.momentum": 0.1,
        "block.norm.r_max": 2.0,
        "block.norm.d_max": 1.0,
        "block.norm.groups": 4,
        "block.norm.eps": 1e-4,
    }
    _, asked = sample(CATALOGUE, params)
    norm_params = {name.rsplit(".", 1)[1] for name in asked if name.startswith("block.norm.")} - {"type", "position"}
    assert norm_params == own


def test_residual_blocks_take_an_ordering_instead_of_a_position():
    params = {
        "block.type": "residual",
        "block.residual.order": "preact",
        "block.residual.zero_init": True,
        "block.norm.type": "batch",
        "block.norm.momentum": 0.1,
        "block.norm.eps": 1e-4,
    }
    spec, asked = sample(CATALOGUE, params)
    assert "block.norm.position" not in asked
    block = spec["stages"][0]["blocks"][0]
    assert block["type"] == "residual" and block["residual"] == {"order": "preact", "zero_init": True}
    assert "position" not in block["norm"]
    _, asked = sample(CATALOGUE, {**params, "block.type": "plain", "block.norm.position": "pre_conv"})
    assert not {"block.residual.order", "block.residual.zero_init"} & asked
