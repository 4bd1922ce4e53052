"""Optuna's gRPC storage proxy, authenticated: the `grpc://` / `grpcs://` storage URLs (the server:
`nas.cluster.proxy_server`).

Whoever reaches the proxy's port reads, rewrites and deletes every study behind it, so beyond loopback it
serves only clients that prove themselves: a shared token (gRPC metadata, checked by a server interceptor)
and/or TLS with client certificates; `--insecure` is the only way around that. Clients take the token from
`BNNAS_PROXY_TOKEN` and, for `grpcs://HOST:PORT`, their TLS files from `BNNAS_PROXY_TLS_CA` (the proxy's CA),
`BNNAS_PROXY_TLS_CERT` and `BNNAS_PROXY_TLS_KEY` (their own certificate), never from a command line.
grpcio is imported only here and only when a proxy is used (`pip install 'bnnas[grpc]'`).
"""

from __future__ import annotations

import collections
import ipaddress
import os
import warnings
from pathlib import Path

import optuna

from nas.errors import StudyError

GRPC_SCHEME = "grpc://"  # Optuna's gRPC storage proxy (nas-storage-proxy), which alone holds the database URL
GRPCS_SCHEME = "grpcs://"  # the same over TLS
PROXY_SCHEMES = (GRPC_SCHEME, GRPCS_SCHEME)
TOKEN_ENV = "BNNAS_PROXY_TOKEN"
TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV = "BNNAS_PROXY_TLS_CA", "BNNAS_PROXY_TLS_CERT", "BNNAS_PROXY_TLS_KEY"
MIN_TOKEN = 16  # characters; `python -c "import secrets; print(secrets.token_urlsafe(32))"` makes one


def require_grpc(what: str) -> None:
    """Optuna imports grpcio lazily, deep in a call; fail first, in one line, with the install command."""
    try:
        import grpc  # noqa: F401
    except ImportError:
        raise StudyError(f"{what} needs grpcio; install it with pip install 'bnnas[grpc]'") from None


def is_loopback(host: str) -> bool:
    """Only this machine reaches the address (a name other than localhost may resolve to anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def check_token(token: str, where: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN:
        raise StudyError(
            f"{where}: the proxy token has {len(token)} characters, fewer than {MIN_TOKEN}; make one with "
            'python -c "import secrets; print(secrets.token_urlsafe(32))"'
        )
    return token


def read_file(path: str | os.PathLike, where: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise StudyError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None


def env_token() -> str | None:
    token = os.environ.get(TOKEN_ENV)
    return check_token(token, TOKEN_ENV) if token else None


def _bearer(token: str) -> str:
    return f"Bearer {token}"


# ---- the client: every command's --storage grpc(s)://HOST:PORT ----


def channel_credentials():
    """TLS credentials of a grpcs:// client: the proxy's CA (else the system's) and this client's certificate."""
    import grpc

    files = {env: os.environ.get(env) for env in (TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV)}
    if bool(files[TLS_CERT_ENV]) != bool(files[TLS_KEY_ENV]):
        raise StudyError(
            f"{TLS_CERT_ENV} and {TLS_KEY_ENV}: set both (this client's certificate and its key) or neither"
        )
    ca, cert, key = (read_file(path, env) if path else None for env, path in files.items())
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def token_interceptor(token: str):
    """A client interceptor that adds `authorization: Bearer TOKEN` to every call (all of Optuna's are unary)."""
    import grpc

    class Details(
        collections.namedtuple("Details", "method timeout metadata credentials wait_for_ready compression"),
        grpc.ClientCallDetails,
    ):
        pass

    class AddToken(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            metadata = [*(details.metadata or ()), ("authorization", _bearer(token))]
            return continuation(
                Details(
                    details.method,
                    details.timeout,
                    metadata,
                    details.credentials,
                    details.wait_for_ready,
                    details.compression,
                ),
                request,
            )

    return AddToken()


class ProxyClient(optuna.storages.GrpcStorageProxy):
    """Optuna's client over a channel that carries the token and, for grpcs://, TLS.

    GrpcStorageProxy takes only a host and a port and opens an insecure channel in `_setup`; this builds the
    channel instead (tests/test_storage_proxy_auth.py pins the attributes Optuna's methods use). The token is
    read from the environment at every `_setup`, so a pickled client (a Ray worker) carries none.
    """

    def __init__(self, *, host: str, port: int, tls: bool) -> None:
        self._tls = tls
        super().__init__(host=host, port=port)

    def _setup(self) -> None:
        import grpc
        from optuna.storages._grpc.auto_generated import api_pb2_grpc
        from optuna.storages._grpc.client import GrpcClientCache

        target, options = address(self._host, self._port), [("grpc.max_receive_message_length", -1)]
        self._transport = (
            grpc.secure_channel(target, channel_credentials(), options=options)
            if self._tls
            else grpc.insecure_channel(target, options=options)
        )
        token = env_token()
        self._channel = grpc.intercept_channel(self._transport, token_interceptor(token)) if token else self._transport
        self._stub = api_pb2_grpc.StorageServiceStub(self._channel)
        self._cache = GrpcClientCache(self._stub)

    def wait_server_ready(self, timeout: float | None = None) -> None:
        import grpc

        try:
            grpc.channel_ready_future(self._transport).result(timeout=timeout)
        except grpc.FutureTimeoutError as exc:
            raise ConnectionError("GRPC connection timeout") from exc

    def close(self) -> None:
        self._transport.close()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        del state["_transport"]
        return state


def grpc_proxy(url: str, what: str = "study.storage") -> optuna.storages.BaseStorage:
    """A client of the storage proxy at `grpc://HOST:PORT` (`grpcs://` for TLS), refused in one line when it is
    not reachable or refuses this client.

    The proxy carries no Optuna heartbeat: a dead worker's trial on another host is found by its
    stale worker record instead (`nas.study.workers.reclaim_dead_trials`).
    """
    scheme = GRPCS_SCHEME if url.startswith(GRPCS_SCHEME) else GRPC_SCHEME
    host, _, port = url[len(scheme) :].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise StudyError(f"{what}: {url}: give the proxy as {scheme}HOST:PORT")
    require_grpc(f"{what}: {url}")
    import grpc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        proxy = ProxyClient(host=host.strip("[]"), port=int(port), tls=scheme == GRPCS_SCHEME)
    try:
        proxy.wait_server_ready(timeout=10)
    except ConnectionError:
        tls = (
            (
                f" or the TLS handshake failed ({TLS_CA_ENV}: the proxy's CA; {TLS_CERT_ENV}, {TLS_KEY_ENV}: a client "
                "certificate it accepts)"
            )
            if scheme == GRPCS_SCHEME
            else ""
        )
        raise StudyError(f"{what}: no storage proxy answers at {url} (start one with nas-storage-proxy){tls}") from None
    try:
        proxy.get_study_id_from_name("nas:probe")  # one cheap call: is this client let in?
    except KeyError:
        pass
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        raise StudyError(
            f"{what}: the storage proxy at {url} refused this client: set {TOKEN_ENV} to the proxy's token"
        ) from None
    return proxy
