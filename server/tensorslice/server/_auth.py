"""Who may call, and over what: the bearer token every call but health checks must carry,
and the TLS material of the gRPC port and the bulk data plane.

- The token travels as gRPC metadata ``authorization: Bearer TOKEN``, checked by a server
  interceptor (`TokenAuth`) with a constant-time compare before any handler runs; a call
  without it, or with another, is answered UNAUTHENTICATED. Health checks
  (`grpc.health.v1.Health`) are exempt, so orchestrators probe without secrets.
- TLS: the same certificate and key serve gRPC (`grpc.ssl_server_credentials`) and the
  bulk data plane (Python's `ssl`), so a large result never leaves in clear; with a client
  CA, both require a client certificate signed by it (mutual TLS).
- The token is read from a file or the environment, never from a command-line argument
  (which every user of the machine can read in the process list).
"""

from __future__ import annotations

import hmac
import os
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

__all__ = [
    "HEALTH_PREFIX",
    "TOKEN_ENV",
    "StartupError",
    "TlsFiles",
    "TokenAuth",
    "read_token",
    "refusal_handler",
]

TOKEN_ENV = "TENSORSLICE_TOKEN"
"""The environment variable the server (and the client) read the token from."""

HEALTH_PREFIX = "/grpc.health.v1.Health/"

_MAX_TOKEN_CHARS = 4096


class StartupError(ValueError):
    """A setting the server cannot start with (a missing certificate, an empty token
    file); the message names the file or the setting."""


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {what} {os.fspath(path)}: "
                           f"{exc.strerror or exc}") from None


def check_token(token: str, source: str) -> str:
    """`token` when it can travel as a header value; StartupError naming `source` else."""
    if not token:
        raise StartupError(f"the token from {source} is empty")
    if len(token) > _MAX_TOKEN_CHARS:
        raise StartupError(f"the token from {source} has {len(token)} characters; at most "
                           f"{_MAX_TOKEN_CHARS}")
    if not all(" " < c < "\x7f" for c in token):
        raise StartupError(f"the token from {source} must be printable ASCII without spaces")
    return token


def read_token(token_file: str | None, environ: dict[str, str] | None = None) -> str | None:
    """The token: the contents of `token_file` (surrounding whitespace removed), else the
    environment variable TENSORSLICE_TOKEN, else None (no authentication)."""
    if token_file is not None:
        text = _read(token_file, "token file").decode("utf-8", "replace").strip()
        return check_token(text, f"token file {token_file}")
    value = (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip()
    return check_token(value, TOKEN_ENV) if value else None


@dataclass(frozen=True)
class TlsFiles:
    """The server's TLS files: certificate chain and key (PEM), and optionally the CA whose
    client certificates it requires (mutual TLS)."""

    cert: str
    key: str
    client_ca: str | None = None

    def load(self) -> tuple[grpc.ServerCredentials, ssl.SSLContext]:
        """gRPC's server credentials and the bulk data plane's `ssl` context, both from
        these files; StartupError naming the file that cannot be read or used."""
        cert = _read(self.cert, "TLS certificate")
        key = _read(self.key, "TLS key")
        ca = _read(self.client_ca, "TLS client CA") if self.client_ca else None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except ssl.SSLError as exc:
            raise StartupError(f"TLS certificate {self.cert} and key {self.key} do not "
                               f"form a usable pair: {exc}") from None
        if self.client_ca:
            try:
                context.load_verify_locations(cafile=self.client_ca)
            except ssl.SSLError as exc:
                raise StartupError(f"TLS client CA {self.client_ca} is not usable: "
                                   f"{exc}") from None
            context.verify_mode = ssl.CERT_REQUIRED
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
        )
        return credentials, context


def refusal_handler(handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode,
                    message: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape as `handler` that answers `code` with `message` without
    parsing the request."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    def deny_stream(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)
        yield b""  # unreachable: makes this a generator, as a streaming handler must be

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny)


class TokenAuth(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Refuses, UNAUTHENTICATED, every call whose ``authorization`` metadata is not
    ``Bearer TOKEN``; methods under an `exempt` prefix (health checks) pass unchecked."""

    def __init__(self, token: str, exempt: Sequence[str] = (HEALTH_PREFIX,), *,
                 write_token: str | None = None, writes: Sequence[str] = ()) -> None:
        self._expected = f"Bearer {token}".encode()
        self._exempt = tuple(exempt)
        self._write = None if write_token is None else f"Bearer {write_token}".encode()
        self._writes = frozenset(writes)
        self.refused = 0

    def _is_write_token(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        given = [v for k, v in metadata or () if k == "authorization"]
        if self._write is None or len(given) != 1:
            return False
        raw = given[0] if isinstance(given[0], bytes) else given[0].encode("utf-8", "replace")
        return hmac.compare_digest(raw, self._write)

    def check(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
        """None when `metadata` carries the token (or the write token); else why not."""
        if self._is_write_token(metadata):
            return None
        given = [v for k, v in metadata or () if k == "authorization"]
        if not given:
            return ("no credentials: this server wants the metadata 'authorization: Bearer "
                    "TOKEN' (the Python client: Client(address, token=...) or the "
                    "environment variable TENSORSLICE_TOKEN)")
        value = given[0]
        raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
        if len(given) == 1 and hmac.compare_digest(raw, self._expected):
            return None
        return ("invalid token: the 'authorization' metadata is not 'Bearer' followed by "
                "this server's token")

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(self._exempt):
            return handler
        why = self.check(details.invocation_metadata)
        if why is None:
            if (self._write is not None and details.method in self._writes
                    and not self._is_write_token(details.invocation_metadata)):
                self.refused += 1
                return refusal_handler(
                    handler, grpc.StatusCode.PERMISSION_DENIED,
                    "this token may read but not write: put, append and drop need the "
                    "server's write token (serve --write-token-file)")
            return handler
        self.refused += 1
        return refusal_handler(handler, grpc.StatusCode.UNAUTHENTICATED, why)
