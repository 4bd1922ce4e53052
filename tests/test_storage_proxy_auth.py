"""The storage proxy refuses callers it cannot authenticate (issue 29 §2): a second, unrelated gRPC client that
reaches the port can neither list, rewrite nor delete a study; a non-loopback --host needs a token or client
certificates (or --insecure); every bnnas command reaches an authenticated proxy through the same URL.
Everything here listens on 127.0.0.1 only."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import warnings

import grpc
import optuna
import pytest
from conftest import write_digits_run
from optuna.trial import TrialState

from nas.cli import storage_proxy_main, storage_proxy_parser
from nas.errors import StudyError
from tests.test_grpc_proxy import SPACE, start_proxy

pytestmark = pytest.mark.system  # starts gRPC proxy servers

TOKEN = "t0ken-for-tests-only-0123456789"
RUN_CONFIG = {"dataset": {"name": "digits", "root": "/data"}}


@pytest.fixture
def guarded(tmp_path):
    """A proxy with a token in front of a SQLite file holding study 'victim'; yields (grpc URL, the file's URL)."""
    sqlite = f"sqlite:///{tmp_path}/behind.db"
    study = optuna.create_study(study_name="victim", storage=sqlite)
    study.set_user_attr("bnnas", "digits, 0 trials")
    study._storage.set_study_system_attr(study._study_id, "nas:run_config", RUN_CONFIG)
    process, url = start_proxy(sqlite, env={**os.environ, "BNNAS_PROXY_TOKEN": TOKEN})
    yield url, sqlite
    process.terminate()
    process.wait(timeout=30)


def plain_client(url: str) -> optuna.storages.GrpcStorageProxy:
    """Optuna's own client, as any other program on the network would open it: no token."""
    host, port = url.removeprefix("grpc://").rsplit(":", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        client = optuna.storages.GrpcStorageProxy(host=host, port=int(port))
    client.wait_server_ready(timeout=10)
    return client


def test_a_client_without_the_token_can_neither_list_rewrite_nor_delete_a_study(guarded):
    url, sqlite = guarded
    client = plain_client(url)
    study_id = optuna.load_study(study_name="victim", storage=sqlite)._study_id
    attacks = [
        lambda: client.get_all_studies(),
        lambda: client.set_study_system_attr(study_id, "nas:run_config", {"dataset": {"root": "/etc"}}),
        lambda: client.set_study_user_attr(study_id, "bnnas", "owned"),
        lambda: client.delete_study(study_id),
    ]
    for attack in attacks:
        with pytest.raises(grpc.RpcError) as refused:
            attack()
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    after = optuna.load_study(study_name="victim", storage=sqlite)  # read behind the proxy: nothing changed
    assert after._storage.get_study_system_attrs(after._study_id)["nas:run_config"] == RUN_CONFIG
    assert after.user_attrs == {"bnnas": "digits, 0 trials"}


def test_a_wrong_token_is_refused_in_one_line(guarded, tmp_path, monkeypatch, capsys):
    from nas.cli import search_main

    monkeypatch.setenv("BNNAS_PROXY_TOKEN", "not-the-token-0123456789")
    config = write_digits_run(tmp_path, SPACE, guarded[0], {"name": "victim", "trials": 1}, {"folds": 2, "epochs": 1})
    assert search_main(["--config", str(config), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"study.storage: the storage proxy at {guarded[0]} refused this client: "
        "set BNNAS_PROXY_TOKEN to the proxy's token\n"
    )


def test_with_the_token_commands_work_through_the_proxy(guarded, tmp_path, monkeypatch):
    url, sqlite = guarded
    study = {"name": "g", "sampler": "random", "trials": 2}
    config = write_digits_run(tmp_path, SPACE, url, study, {"folds": 2, "epochs": 1})
    done = subprocess.run(
        [sys.executable, "-m", "nas.cli", "--config", str(config), "--workers", "2", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "BNNAS_PROXY_TOKEN": TOKEN},
    )
    assert done.returncode == 0, done.stderr
    assert sum(t.state == TrialState.COMPLETE for t in optuna.load_study(study_name="g", storage=sqlite).trials) == 2

    monkeypatch.setenv("BNNAS_PROXY_TOKEN", TOKEN)
    from nas.study.storage import storage_of

    store = pickle.loads(pickle.dumps(storage_of(url)))  # as a Ray worker receives it: it reads the token itself
    assert sorted(s.study_name for s in store.get_all_studies()) == ["g", "victim"]


class Bound(Exception):
    """Raised instead of making a gRPC server: nothing here listens beyond loopback."""


@pytest.fixture
def no_server(monkeypatch):
    def server(*args, **kwargs):
        raise Bound

    monkeypatch.setattr(grpc, "server", server)
    monkeypatch.delenv("BNNAS_PROXY_TOKEN", raising=False)


def test_a_non_loopback_host_without_authentication_is_refused_before_anything_is_opened(no_server, tmp_path, capsys):
    sqlite = f"sqlite:///{tmp_path}/behind.db"
    assert storage_proxy_main(["--storage", sqlite, "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("--host 0.0.0.0: anyone who reaches the port could read, rewrite and delete every study; ")
    assert err.count("\n") == 1 and "--insecure" in err
    assert not (tmp_path / "behind.db").exists()  # refused before the storage was opened


@pytest.mark.parametrize("how", ["--insecure", "token", "--token-file"])
def test_insecure_or_a_token_lets_a_non_loopback_host_through(no_server, tmp_path, monkeypatch, how):
    (tmp_path / "token").write_text(TOKEN + "\n")
    flags = {"--insecure": ["--insecure"], "token": [], "--token-file": ["--token-file", str(tmp_path / "token")]}[how]
    if how == "token":
        monkeypatch.setenv("BNNAS_PROXY_TOKEN", TOKEN)
    with pytest.raises(Bound):  # it got as far as making the server
        storage_proxy_main(["--storage", f"sqlite:///{tmp_path}/behind.db", "--host", "0.0.0.0", *flags])


def test_a_short_token_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BNNAS_PROXY_TOKEN", "short")
    assert storage_proxy_main(["--storage", f"sqlite:///{tmp_path}/behind.db"]) == 2
    assert capsys.readouterr().err.startswith("BNNAS_PROXY_TOKEN: the proxy token has 5 characters, fewer than 16;")


def test_the_help_names_insecure_as_such_and_its_example_binds_no_wildcard():
    text = storage_proxy_parser().format_help()
    assert "0.0.0.0" not in text
    assert "--insecure           INSECURE:" in text


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def certificates(tmp_path):
    """A CA, a certificate for 127.0.0.1 signed by it and a client certificate signed by it (PEM files)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=tmp_path,
    )
    for name, extension in (("proxy", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=tmp_path,
        )
        (tmp_path / f"{name}.ext").write_text(extension + "\n")
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=tmp_path,
        )
    return tmp_path


def test_tls_with_client_certificates_lets_in_only_a_client_the_ca_signed(certificates, monkeypatch, capsys):
    from nas.study.storage import storage_of

    sqlite = f"sqlite:///{certificates}/behind.db"
    optuna.create_study(study_name="victim", storage=sqlite)
    env = {k: v for k, v in os.environ.items() if k != "BNNAS_PROXY_TOKEN"}
    process, url = start_proxy(
        sqlite,
        "--tls-cert",
        str(certificates / "proxy.pem"),
        "--tls-key",
        str(certificates / "proxy.key"),
        "--tls-client-ca",
        str(certificates / "ca.pem"),
        env=env,
        scheme="grpcs",
    )
    try:
        monkeypatch.delenv("BNNAS_PROXY_TOKEN", raising=False)
        monkeypatch.setenv("BNNAS_PROXY_TLS_CA", str(certificates / "ca.pem"))
        with pytest.raises(StudyError, match="no storage proxy answers"):  # no client certificate: no handshake
            storage_of(url)
        monkeypatch.setenv("BNNAS_PROXY_TLS_CERT", str(certificates / "client.pem"))
        monkeypatch.setenv("BNNAS_PROXY_TLS_KEY", str(certificates / "client.key"))
        assert [s.study_name for s in storage_of(url).get_all_studies()] == ["victim"]
    finally:
        process.terminate()
        process.wait(timeout=30)
