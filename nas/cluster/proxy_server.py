"""`nas-storage-proxy`: Optuna's gRPC storage proxy in front of an RDB storage, refusing unauthenticated callers.

Beyond loopback it serves only clients with the shared token (checked by a server interceptor) or a
certificate its client CA signed, unless `--insecure` says the network is trusted (`nas.study.storage_proxy`
holds the token and TLS handling clients share with it).
"""

from __future__ import annotations

import hmac
import sys

import optuna

from nas.errors import StudyError, one_line
from nas.study.storage import RDB_SCHEMES, make_storage
from nas.study.storage_proxy import (
    GRPC_SCHEME,
    GRPCS_SCHEME,
    TOKEN_ENV,
    _bearer,
    address,
    check_token,
    env_token,
    is_loopback,
    read_file,
    require_grpc,
)


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


def serve_storage_proxy(
    url: str,
    host: str,
    port: int,
    *,
    token_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_client_ca: str | None = None,
    insecure: bool = False,
) -> None:
    """Serve `url` at grpc(s)://host:port until interrupted (nas-storage-proxy); the tables are made first.

    The token comes from `--token-file` or `BNNAS_PROXY_TOKEN`; a non-loopback host is refused unless a token
    or client certificates authenticate every caller, or `insecure` says the network is trusted instead.
    """
    import sqlalchemy

    if not url.startswith(RDB_SCHEMES):
        raise StudyError(f"--storage: {url}: the proxy serves an RDB storage (sqlite, postgresql, mysql URL)")
    token = (
        check_token(read_file(token_file, "--token-file").decode(errors="replace"), "--token-file")
        if token_file
        else env_token()
    )
    if not (token or tls_client_ca or insecure or is_loopback(host)):
        raise StudyError(
            f"--host {host}: anyone who reaches the port could read, rewrite and delete every study; "
            f"authenticate the callers ({TOKEN_ENV} or --token-file, or --tls-cert/--tls-key/"
            "--tls-client-ca), "
            "or pass --insecure on a network you trust"
        )
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
    guards = [
        name for name, on in (("token", token), ("TLS", credentials), ("client certificates", tls_client_ca)) if on
    ]
    if not guards:
        print(
            f"nas-storage-proxy: no authentication: whoever reaches {target} can read, rewrite and delete every study",
            file=sys.stderr,
            flush=True,
        )
    scheme = GRPCS_SCHEME if credentials else GRPC_SCHEME
    print(
        f"nas-storage-proxy: serving {shown} ({', '.join(guards) or 'unauthenticated'}) at {scheme}{target}", flush=True
    )
    try:
        server.wait_for_termination()
    finally:
        server.stop(grace=5)
