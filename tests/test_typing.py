"""bnnas ships py.typed: a type checker sees the public API's signatures (`.ci/run` runs mypy over
tests/typing/public_api.py), and a misuse of them is an error a user's checker reports."""

import subprocess
import sys
from pathlib import Path

import pytest

import nas

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_says_it_is_typed_and_types_every_public_name():
    assert (Path(nas.__file__).parent / "py.typed").is_file()
    source = (Path(nas.__file__)).read_text()
    typed = source.split("if TYPE_CHECKING:", 1)[1].split("\n\n", 1)[0]
    assert all(f" {name}" in typed for name in nas.__all__ if name != "__version__"), "a public name mypy cannot see"


@pytest.mark.slow
def test_mypy_reports_a_call_that_does_not_match_a_public_signature(tmp_path):
    misuse = tmp_path / "misuse.py"
    misuse.write_text(
        "import nas\nfrom nas.build import build\n\n"
        "build('not a spec', (1, 8, 8), 10)\n"
        "nas.request_stop('sqlite:///x.db', study_name=3)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), str(misuse)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )

    assert proc.returncode == 1, proc.stdout
    assert 'Argument 1 to "build" has incompatible type "str"; expected "dict[Any, Any]"' in proc.stdout
    assert 'Argument "study_name" to "request_stop" has incompatible type "int"; expected "str"' in proc.stdout
