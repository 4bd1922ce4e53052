"""No config or search-space text makes the loader raise anything but a one-line ConfigError."""

import string

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nas.errors import ConfigError
from nas.search.config import load_run_config

KEYS = [
    "dataset",
    "name",
    "study",
    "trials",
    "evaluation",
    "folds",
    "epochs",
    "search_space",
    "device",
    "stages",
    "width",
    "block",
    "norm",
    "type",
    "position",
    "choice",
    "int",
    "float",
    "log",
    "step",
    "training",
    "lr",
    "objectives",
    "x",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(string.ascii_letters + "_.-/:", max_size=12),
    st.sampled_from(["digits", "batch", "tpe", "relu", "cpu"]),
)
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
    max_leaves=20,
)


def check(tmp_path, config_text: str, space_text: str) -> None:
    (tmp_path / "space.yaml").write_text(space_text)
    (tmp_path / "run.yaml").write_text(config_text)
    try:
        load_run_config(tmp_path / "run.yaml")
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(str(tmp_path))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=trees, space=trees)
def test_structured_garbage_gives_a_config_error_or_a_config(tmp_path, config, space):
    if isinstance(config, dict) and "search_space" not in config:
        config["search_space"] = "space.yaml"
    check(tmp_path, yaml.safe_dump(config), yaml.safe_dump(space))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(string.printable, max_size=80))
def test_arbitrary_text_gives_a_config_error_or_a_config(tmp_path, text):
    check(tmp_path, "search_space: space.yaml\n" + text, text)
    check(tmp_path, text, "stages: 1\n")
