"""nas.validation, the checks every YAML loader shares: each error is a ConfigError naming the file and the key path."""

import math

import pytest

from nas.errors import ConfigError
from nas.validation import check_bounds, check_scalar, did_you_mean, read_yaml, spelling, type_name, unknown_key


def refused(call, *args) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        call(*args)
    return caught.value


@pytest.mark.parametrize(
    "value, kind, expected",
    [(3, int, 3), (3, float, 3.0), (2.5, float, 2.5), (True, bool, True), ("relu", str, "relu")],
)
def test_check_scalar_returns_the_value_and_takes_an_int_as_a_float(value, kind, expected):
    got = check_scalar(value, kind, "run.yaml", "study.trials")
    assert got == expected and type(got) is kind


@pytest.mark.parametrize(
    "value, kind, message",
    [
        (True, int, "expected an integer, got a boolean True"),  # a bool is no number, though Python says it is an int
        (1.5, int, "expected an integer, got a number 1.5"),
        (False, float, "expected a number, got a boolean False"),
        ("0.1", float, "expected a number, got a string '0.1'"),
        (1, bool, "expected a boolean, got an integer 1"),
        (None, str, "expected a string, got nothing None"),
        ([1], int, "expected an integer, got a list [1]"),
        (math.nan, float, "expected a finite number, got nan"),
        (math.inf, float, "expected a finite number, got inf"),
    ],
)
def test_check_scalar_refuses_another_type_naming_file_key_and_both_types(value, kind, message):
    error = refused(check_scalar, value, kind, "run.yaml", "evaluation.folds")
    assert (error.file, error.key_path, error.problem) == ("run.yaml", "evaluation.folds", message)
    assert str(error) == f"run.yaml: evaluation.folds: {message}"


def test_check_bounds_passes_values_inside_every_bound():
    meta = {"min": 1, "max": 9, "odd": True}
    for value in (1, 3, 9):
        check_bounds(value, meta, "space.yaml", "block.kernel")
    check_bounds(0.5, {"above": 0.0, "below": 1.0}, "space.yaml", "training.dropout")
    check_bounds("tpe", {"choices": lambda: ("random", "tpe")}, "run.yaml", "study.sampler")


@pytest.mark.parametrize(
    "value, meta, message",
    [
        (0, {"min": 1}, "must be >= 1, got 0"),
        (10, {"max": 9}, "must be <= 9, got 10"),
        (0.0, {"above": 0.0}, "must be > 0.0, got 0.0"),
        (1.0, {"below": 1.0}, "must be < 1.0, got 1.0"),
        (4, {"odd": True}, "must be odd (so 'same' padding keeps the size), got 4"),
        ("tpx", {"choices": ("random", "tpe")}, "unknown value 'tpx' (known: random, tpe); did you mean 'tpe'?"),
        (
            "zzz",
            {"choices": lambda: ("random", "tpe"), "what": "sampler"},
            "unknown sampler 'zzz' (known: random, tpe)",
        ),
        (
            "BatchNorm2d",
            {"choices": ("batch", "group"), "what": "norm type", "aliases": {"batchnorm": "batch"}},
            "unknown norm type 'BatchNorm2d' (known: batch, group); did you mean 'batch'?",
        ),
    ],
)
def test_check_bounds_refuses_naming_file_key_and_the_bound(value, meta, message):
    error = refused(check_bounds, value, meta, "space.yaml", "block.kernel")
    assert (error.file, error.key_path, error.problem) == ("space.yaml", "block.kernel", message)


def test_did_you_mean_suggests_an_alias_first_then_the_closest_name_else_nothing():
    known = ["batch", "batch_renorm", "group", "layer"]
    assert did_you_mean("grop", known) == "; did you mean 'group'?"
    assert did_you_mean("Batch-Norm", known, {"batchnorm": "batch"}) == "; did you mean 'batch'?"
    assert did_you_mean("bn", known, {"bn": "batch"}) == "; did you mean 'batch'?"
    assert did_you_mean("transformer", known) == ""
    assert did_you_mean(7, [8, 16]) == ""  # non-string keys are compared as text


def test_spelling_ignores_case_separators_and_a_dimension_suffix():
    assert {spelling(w) for w in ("BatchNorm2d", "batch_norm", "batchnorm", "Batch-Norm", "batch norm1d")} == {
        "batchnorm"
    }
    assert spelling("conv3d") == "conv" and spelling("2d_batch") == "2dbatch"  # only a suffix is dropped


def test_unknown_key_names_the_file_the_full_key_path_the_known_keys_and_a_suggestion():
    error = unknown_key("run.yaml", "evaluation", "fodls", ["folds", "epochs"])
    assert (error.file, error.key_path) == ("run.yaml", "evaluation.fodls")
    assert str(error) == "run.yaml: evaluation.fodls: unknown key (known: folds, epochs); did you mean 'folds'?"
    top = unknown_key("run.yaml", "", "studdy", ["dataset", "study"])
    assert str(top) == "run.yaml: studdy: unknown key (known: dataset, study); did you mean 'study'?"


def test_read_yaml_reads_a_mapping_and_an_empty_file_as_no_keys(tmp_path):
    (tmp_path / "run.yaml").write_text("study:\n  trials: 3\n")
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml(tmp_path / "run.yaml") == {"study": {"trials": 3}}
    assert read_yaml(str(tmp_path / "empty.yaml")) == {}


@pytest.mark.parametrize(
    "text, problem",
    [
        (None, "file not found"),
        ("study: [1, 2\n", "malformed YAML: line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        ("- a\n- b\n", "expected a mapping of keys, got a list"),
        ("just words\n", "expected a mapping of keys, got a string"),
    ],
)
def test_read_yaml_refuses_in_one_error_naming_the_file(tmp_path, text, problem):
    path = tmp_path / "run.yaml"
    if text is not None:
        path.write_text(text)
    error = refused(read_yaml, path)
    assert (error.file, error.key_path, error.problem) == (str(path), "", problem)
    assert str(error) == f"{path}: {problem}"


def test_read_yaml_of_a_folder_says_it_cannot_read_it(tmp_path):
    assert str(refused(read_yaml, tmp_path)) == f"{tmp_path}: cannot read: Is a directory"


def test_type_names_read_as_words():
    assert [type_name(v) for v in (True, 1, 1.0, "x", [], {}, None, (1,))] == [
        "a boolean",
        "an integer",
        "a number",
        "a string",
        "a list",
        "a mapping",
        "nothing",
        "tuple",
    ]
