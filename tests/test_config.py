"""Bad run configs and search spaces are refused with one line naming the file and key path."""

from pathlib import Path

import pytest
import yaml

from nas.errors import ConfigError
from nas.search.config import load_run_config, parse_override
from nas.search.space import load_space

REPO = Path(__file__).resolve().parents[1]
SPACE = {"stages": 1, "width": 8}


def write(tmp_path: Path, config: dict, space: dict | None = SPACE, name: str = "run.yaml") -> Path:
    if space is not None:
        (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
        config = {"search_space": "space.yaml", **config}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def problem(tmp_path, config=None, space=SPACE, overrides=()) -> ConfigError:
    path = write(tmp_path, config or {}, space)
    with pytest.raises(ConfigError) as info:
        load_run_config(path, list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return info.value


def test_shipped_configs_and_space_are_valid():
    for config in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_run_config(config)
        assert cfg.study.trials >= 1 and cfg.space
    load_space(REPO / "search_spaces" / "bn_placement.yaml")


def test_unknown_config_key_suggests_the_close_one(tmp_path):
    err = problem(tmp_path, {"study": {"trails": 5}})
    assert err.key_path == "study.trails"
    assert "did you mean 'trials'" in str(err)
    assert str(err).startswith(str(tmp_path / "run.yaml") + ": study.trails: ")


def test_wrong_type_names_key_and_types(tmp_path):
    err = problem(tmp_path, {"evaluation": {"folds": "three"}})
    assert err.key_path == "evaluation.folds" and "expected an integer" in str(err)
    assert problem(tmp_path, {"study": {"trials": True}}).key_path == "study.trials"
    assert problem(tmp_path, {"study": "tpe"}).key_path == "study"


def test_out_of_range_budget_is_refused(tmp_path):
    assert "must be >= 2" in str(problem(tmp_path, {"evaluation": {"folds": 1}}))
    assert "must be >= 1" in str(problem(tmp_path, {"study": {"trials": 0}}))


def test_unknown_dataset_and_sampler_list_the_known_names(tmp_path):
    err = problem(tmp_path, {"dataset": {"name": "cifar"}})
    assert err.key_path == "dataset.name" and "cifar10" in str(err) and "digits" in str(err)
    err = problem(tmp_path, {"study": {"sampler": "tpee"}})
    assert "did you mean 'tpe'" in str(err)


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("study: {name: x\nevaluation: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML: line \d+"):
        load_run_config(path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_run_config(tmp_path / "nope.yaml")
    err = problem(tmp_path, {"search_space": "missing.yaml"}, space=None)
    assert err.key_path == "search_space" and "missing.yaml" in str(err)


def test_search_space_is_relative_to_the_config_file(tmp_path, monkeypatch):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write(sub, {})
    monkeypatch.chdir(tmp_path)
    cfg = load_run_config(Path("configs") / path.name)
    assert Path(cfg.search_space) == (sub / "space.yaml").resolve()
    assert cfg.space == SPACE


def test_overrides_reach_any_key_and_are_validated(tmp_path):
    path = write(tmp_path, {})
    cfg = load_run_config(
        path, [parse_override("study.trials=7"), parse_override("dataset.download=true"), ("evaluation.epochs", 2)]
    )
    assert (cfg.study.trials, cfg.dataset.download, cfg.evaluation.epochs) == (7, True, 2)
    err = problem(tmp_path, overrides=[parse_override("study.nmae=x")])
    assert err.key_path == "study.nmae" and "did you mean 'name'" in str(err)
    with pytest.raises(ConfigError, match="expected key.path=value"):
        parse_override("no-equals-sign")


def test_a_bad_value_in_the_file_is_named_even_when_a_flag_overrides_it(tmp_path):
    err = problem(tmp_path, {"study": {"trials": "two"}}, overrides=[("study.trials", 1, "--trials")])

    assert err.file == str(tmp_path / "run.yaml") and err.key_path == "study.trials" and "'two'" in str(err)


def test_a_required_key_may_come_from_a_flag_alone(tmp_path):
    path = write(tmp_path, {}, space=None)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(SPACE))

    cfg = load_run_config(path, [("search_space", str(tmp_path / "space.yaml"), "--set")])

    assert cfg.space == SPACE


@pytest.mark.parametrize(
    "space, key_path, words",
    [
        ({"stage": 2}, "stage", "did you mean 'stages'"),
        ({"block": {"norm": {"tpye": "batch"}}}, "block.norm.tpye", "did you mean 'type'"),
        ({"width": {"choice": []}}, "width.choice", "empty"),
        ({"width": {"int": [64, 16]}}, "width.int", "low 64 > high 16"),
        ({"training": {"weight_decay": {"float": [0.0, 0.1], "log": True}}}, "training.weight_decay.log", "low > 0"),
        ({"training": {"lr": {"float": [-1.0, 0.1]}}}, "training.lr.float[0]", "must be > 0"),
        (
            {"block": {"activation": {"choice": ["relu", "swish"]}}},
            "block.activation.choice[1]",
            "unknown activation 'swish'",
        ),
        ({"block": {"norm": {"type": "btach"}}}, "block.norm.type", "did you mean 'batch'"),
        (
            {"block": {"norm": {"position": {"choice": ["post_conv", "after"]}}}},
            "block.norm.position.choice[1]",
            "pre_conv, post_conv, post_act",
        ),
        ({"width": "wide"}, "width", "expected an integer"),
        ({"width": {"float": [1.0, 2.0]}}, "width.float", "not a float range"),
        ({"width": {"int": [8, 16], "choice": [8]}}, "width", "exactly one of"),
        ({"width": {"int": [8, 16], "lgo": True}}, "width.lgo", "did you mean 'log'"),
        ({"block": {"kernel": {"int": [3, 7]}}}, "block.kernel.step", "odd"),
        ({"block": {"kernel": 4}}, "block.kernel", "must be odd"),
        ({"block": {"norm": {"share": {"choice": ["global"]}}}}, "block.norm.share", "not searchable"),
        ({"block": {"dropout": 1.0}}, "block.dropout", "must be < 1.0"),
        ({"training": {"batch_size": {"choice": [32, 32]}}}, "training.batch_size.choice", "repeat"),
        ({"training": [1, 2]}, "training", "expected a mapping"),
    ],
)
def test_bad_search_space_names_file_and_key(tmp_path, space, key_path, words):
    err = problem(tmp_path, space=space)
    assert err.key_path == key_path
    assert err.file.endswith("space.yaml")
    assert words in str(err)


def test_objectives_are_a_list_of_known_names(tmp_path):
    cfg = load_run_config(write(tmp_path, {"objectives": ["cv_loss", "latency_ms"]}))
    assert cfg.objectives == ["cv_loss", "latency_ms"]
    assert load_run_config(write(tmp_path, {})).objectives == ["cv_loss"]
    err = problem(tmp_path, {"objectives": ["cv_loss", "latency"]})
    assert err.key_path == "objectives[1]" and "did you mean 'latency_ms'" in str(err)
    assert "repeat" in str(problem(tmp_path, {"objectives": ["params", "params"]}))
    err = problem(tmp_path, {"objectives": ["cv_loss", "params"], "evaluation": {"pruner": "median"}})
    assert err.key_path == "evaluation.pruner" and "single-objective" in str(err)


@pytest.mark.parametrize(
    "evaluation, words",
    [
        ({"pruner": "wilcoxon", "folds": 5}, "wilcoxon needs fold_mode: sequential"),
        (
            {"pruner": "wilcoxon", "folds": 4, "fold_mode": "sequential"},
            "wilcoxon cannot prune with 4 folds at p_threshold 0.1: it judges after every fold but the last, "
            "and the smallest one-sided p after n folds is 1/2^n; use >= 5 folds",
        ),
        ({"pruner": "median", "recalibrate_bn": True}, "median with recalibrate_bn needs fold_mode: sequential"),
        ({"pruner": "hyperband", "recalibrate_bn": True}, "hyperband with recalibrate_bn needs fold_mode: sequential"),
    ],
)
def test_a_pruner_that_could_save_nothing_is_refused_saying_why(tmp_path, evaluation, words):
    err = problem(tmp_path, {"evaluation": evaluation})
    assert err.key_path == "evaluation.pruner" and err.file.endswith("run.yaml") and words in str(err)


@pytest.mark.parametrize(
    "evaluation",
    [
        {"pruner": "wilcoxon", "folds": 5, "fold_mode": "sequential"},
        {"pruner": "median", "recalibrate_bn": True, "fold_mode": "sequential"},
        {"pruner": "hyperband"},
        {"pruner": "none", "recalibrate_bn": True},
    ],
)
def test_pruners_that_can_save_compute_are_accepted(tmp_path, evaluation):
    assert load_run_config(write(tmp_path, {"evaluation": evaluation})).evaluation.pruner == evaluation["pruner"]
