"""optuna-dashboard under /optuna/: its installed bundle takes the rewrite, another bundle is named in one line with
the pinned releases, and the pin is pyproject's."""

import shutil
import tomllib
from pathlib import Path

from nas.dashboard.optuna_mount import PINNED, assets_folder, mount_problem, prefixed_assets

ROOT = Path(__file__).resolve().parent.parent


def test_the_installed_optuna_dashboard_takes_the_rewrite():
    index, bundle = prefixed_assets(assets_folder(), "/optuna")

    assert b'src="/optuna/static/bundle.js"' in index
    assert b'url_prefix:"/optuna/dashboard"' in bundle and b'}("/optuna"),' in bundle
    assert mount_problem("/optuna") is None


def test_a_bundle_the_rewrite_does_not_know_is_one_line_naming_the_pinned_releases(tmp_path):
    fake = tmp_path / "optuna_dashboard"
    shutil.copytree(assets_folder(), fake, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    bundle = fake / "public" / "bundle.js"
    bundle.write_text(bundle.read_text().replace('url_prefix:"/dashboard"', 'basename:"/dashboard"'))

    problem = mount_problem("/optuna", fake)

    assert problem is not None and "\n" not in problem
    assert "cannot be mounted under /optuna/" in problem and "url_prefix" in problem
    assert problem.endswith(f'(pip install "{PINNED}")')


def test_the_pin_is_the_one_pyproject_declares():
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert PINNED in dependencies
