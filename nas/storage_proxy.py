"""Optuna's gRPC storage proxy, authenticated: `nas-storage-proxy` and the `grpc://` / `grpcs://` storage URLs.

Whoever reaches the proxy's port reads, rewrites and deletes every study behind it, so beyond loopback it
serves only clients that prove themselves: a shared token (gRPC metadata, checked by a server interceptor)
and/or TLS with client certificates; `--insecure` is the only way around that. Clients take the token from
`BNNAS_PROXY_TOKEN` and, for `grpcs://HOST:PORT`, their TLS files from `BNNAS_PROXY_TLS_CA` (the proxy's CA),
`BNNAS_PROXY_TLS_CERT` and `BNNAS_PROXY_TLS_KEY` (their own certificate), never from a command line.
grpcio is imported only here and only when a proxy is used (`pip install 'bnnas[grpc]'`).
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import os
import sys
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
        raise StudyError(f"{where}: the proxy token has {len(token)} characters, fewer than {MIN_TOKEN}; make one with "
                         "python -c \"import secrets; print(secrets.token_urlsafe(32))\"")
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
        raise StudyError(f"{TLS_CERT_ENV} and {TLS_KEY_ENV}: set both (this client's certificate and its key) "
                         "or neither")
    ca, cert, key = (read_file(path, env) if path else None for env, path in files.items())
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def token_interceptor(token: str):
    """A client interceptor that adds `authorization: Bearer TOKEN` to every call (all of Optuna's are unary)."""
    import grpc

    class Details(collections.namedtuple("Details", "method timeout metadata credentials wait_for_ready compression"),
                  grpc.ClientCallDetails):
        pass

    class AddToken(grpc.UnaryUnaryClientInterceptor):
        def intercept_unary_unary(self, continuation, details, request):
            metadata = [*(details.metadata or ()), ("authorization", _bearer(token))]
            return continuation(Details(details.method, details.timeout, metadata, details.credentials,
                                        details.wait_for_ready, details.compression), request)

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
        self._transport = (grpc.secure_channel(target, channel_credentials(), options=options) if self._tls
                           else grpc.insecure_channel(target, options=options))
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
    stale worker record instead (`nas.liveness.reclaim_dead_trials`).
    """
    scheme = GRPCS_SCHEME if url.startswith(GRPCS_SCHEME) else GRPC_SCHEME
    host, _, port = url[len(scheme):].rstrip("/").rpartition(":")
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
        tls = (f" or the TLS handshake failed ({TLS_CA_ENV}: the proxy's CA; {TLS_CERT_ENV}, {TLS_KEY_ENV}: a client "
               "certificate it accepts)") if scheme == GRPCS_SCHEME else ""
        raise StudyError(f"{what}: no storage proxy answers at {url} (start one with nas-storage-proxy){tls}") from None
    try:
        proxy.get_study_id_from_name("nas:probe")  # one cheap call: is this client let in?
    except KeyError:
        pass
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        raise StudyError(f"{what}: the storage proxy at {url} refused this client: set {TOKEN_ENV} to the proxy's "
                         "token") from None
    return proxy


# ---- the server: nas-storage-proxy ----

def token_check(token: str):
    """A server interceptor that refuses, with UNAUTHENTICATED, every call without `authorization: Bearer TOKEN`."""
    import grpc

    expected = _bearer(token).encode()

    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "nas-storage-proxy: missing or wrong token")

    refusal = grpc.unary_unary_rpc_method_handler(refuse)

    class TokenCheck(grpc.ServerInterceptor):
        def intercept_service(self, continuation, details):
            given = dict(details.invocation_metadata or ()).get("authorization", "")
            return continuation(details) if hmac.compare_digest(str(given).encode(), expected) else refusal

    return TokenCheck()


def server_credentials(tls_cert: str | None, tls_key: str | None, tls_client_ca: str | None):
    """TLS of the proxy; with a client CA, a client without a certificate it signed cannot connect."""
    import grpc

    if bool(tls_cert) != bool(tls_key):
        raise StudyError("--tls-cert and --tls-key: give both (the proxy's certificate and its key)")
    if not tls_cert:
        if tls_client_ca:
            raise StudyError("--tls-client-ca: client certificates need TLS; give --tls-cert and --tls-key too")
        return None
    pair = (read_file(tls_key, "--tls-key"), read_file(tls_cert, "--tls-cert"))
    ca = read_file(tls_client_ca, "--tls-client-ca") if tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def serve_storage_proxy(url: str, host: str, port: int, *, token_file: str | None = None, tls_cert: str | None = None,
                        tls_key: str | None = None, tls_client_ca: str | None = None, insecure: bool = False) -> None:
    """Serve `url` at grpc(s)://host:port until interrupted (nas-storage-proxy); the tables are made first.

    The token comes from `--token-file` or `BNNAS_PROXY_TOKEN`; a non-loopback host is refused unless a token
    or client certificates authenticate every caller, or `insecure` says the network is trusted instead.
    """
    import sqlalchemy

    from nas.storage import RDB_SCHEMES, make_storage, one_line

    if not url.startswith(RDB_SCHEMES):
        raise StudyError(f"--storage: {url}: the proxy serves an RDB storage (sqlite, postgresql, mysql URL)")
    token = check_token(read_file(token_file, "--token-file").decode(errors="replace"), "--token-file") if token_file \
        else env_token()
    if not (token or tls_client_ca or insecure or is_loopback(host)):
        raise StudyError(f"--host {host}: anyone who reaches the port could read, rewrite and delete every study; "
                         f"authenticate the callers ({TOKEN_ENV} or --token-file, or --tls-cert/--tls-key/"
                         "--tls-client-ca), "
                         "or pass --insecure on a network you trust")
    require_grpc("nas-storage-proxy")
    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService  # what run_grpc_proxy_server serves

    credentials = server_credentials(tls_cert, tls_key, tls_client_ca)
    try:
        storage = optuna.storages.get_storage(make_storage(url, heartbeat_seconds=30, retries=1))  # with Optuna's cache
    except (ValueError, sqlalchemy.exc.SQLAlchemyError) as exc:
        raise StudyError(f"--storage: cannot open {url}: {one_line(exc)}") from None
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=10), interceptors=[token_check(token)] if token else [])
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)
    target = address(host, port)
    try:
        bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
    except RuntimeError:  # grpcio >= 1.60 raises where older ones returned 0
        bound = 0
    if not bound:
        raise StudyError(f"--host/--port: cannot listen on {target} (in use, or not an address of this machine)")
    server.start()
    shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    guards = [name for name, on in (("token", token), ("TLS", credentials), ("client certificates", tls_client_ca))
              if on]
    if not guards:
        print(f"nas-storage-proxy: no authentication: whoever reaches {target} can read, rewrite and delete every "
              "study", file=sys.stderr, flush=True)
    scheme = GRPCS_SCHEME if credentials else GRPC_SCHEME
    print(f"nas-storage-proxy: serving {shown} ({', '.join(guards) or 'unauthenticated'}) at {scheme}{target}",
          flush=True)
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=5)
