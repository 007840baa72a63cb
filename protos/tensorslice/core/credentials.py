"""A client's credentials: the bearer token and the TLS settings, given as arguments or
taken from the environment, so that DataLoader workers (which inherit the environment,
and receive pickled clients) authenticate like their parent. Used by both clients and by
`tensorslice health` (which must start fast: nothing here imports torch or grpc).

Environment variables, read when a client is created without the argument:

- ``TENSORSLICE_TOKEN``: the token (or ``TENSORSLICE_TOKEN_FILE``: a file holding it);
- ``TENSORSLICE_TLS_CA``: a PEM file of the CA that signed the server's certificate (TLS
  on); ``TENSORSLICE_TLS=1``: TLS with the system's CAs;
- ``TENSORSLICE_TLS_CERT`` and ``TENSORSLICE_TLS_KEY``: a client certificate and key, for
  a server that requires them (mutual TLS);
- ``TENSORSLICE_TLS_SERVER_NAME``: the name the server's certificate must carry, where it
  differs from the host the client connects to.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Credentials", "TlsConfig", "resolve_tls", "resolve_token"]


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings of a client: `ca`, the PEM file of the CA that signed the server's
    certificate (None: the system's CAs); `cert` and `key`, the client's own certificate
    and key for mutual TLS; `server_name`, the name the server's certificate must carry
    where it is not the host connected to. The files are read once, when the client is
    created."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: a client certificate needs its key, and a key its "
                             f"certificate (cert={self.cert!r}, key={self.key!r})")
        for what in ("ca", "cert", "key"):
            path = getattr(self, what)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS {what} file {path} does not exist")

    def read(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The PEM bytes of the CA, the client certificate and its key (None where unset)."""
        return tuple(  # type: ignore[return-value]
            None if p is None else Path(p).read_bytes() for p in (self.ca, self.cert, self.key)
        )


class Credentials:
    """What a client presents: the ``authorization`` metadata and the TLS material, read
    once; picklable (the `ssl` context is made again in each process)."""

    def __init__(self, token: str | None, tls: TlsConfig | None) -> None:
        if token is not None and not all(" " < c < "\x7f" for c in token):
            raise ValueError("the token must be printable ASCII without spaces")
        self.metadata: tuple[tuple[str, str], ...] | None = (
            (("authorization", f"Bearer {token}"),) if token else None
        )
        self.tls = tls
        self.pem: tuple[bytes | None, bytes | None, bytes | None] = (
            tls.read() if tls is not None else (None, None, None)
        )
        self._ssl: ssl.SSLContext | None = None
        self._ssl_pid = 0

    def grpc_options(self) -> list[tuple[str, str]]:
        if self.tls is not None and self.tls.server_name:
            return [("grpc.ssl_target_name_override", self.tls.server_name)]
        return []

    def ssl_context(self) -> ssl.SSLContext | None:
        """The bulk data plane's TLS context (the same trust as the gRPC channel), or None
        without TLS."""
        if self.tls is None:
            return None
        if self._ssl is None or self._ssl_pid != os.getpid():
            ca = self.pem[0]
            context = ssl.create_default_context(cadata=None if ca is None else ca.decode())
            if self.tls.cert is not None and self.tls.key is not None:
                context.load_cert_chain(self.tls.cert, self.tls.key)
            self._ssl, self._ssl_pid = context, os.getpid()
        return self._ssl

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_ssl"] = None  # an SSLContext does not pickle
        state["_ssl_pid"] = 0
        return state


def resolve_token(token: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """`token`, else ``TENSORSLICE_TOKEN``, else the contents of ``TENSORSLICE_TOKEN_FILE``,
    else None."""
    env = os.environ if environ is None else environ
    if token is not None:
        return token or None
    value = env.get("TENSORSLICE_TOKEN", "").strip()
    if value:
        return value
    path = env.get("TENSORSLICE_TOKEN_FILE", "")
    if path:
        try:
            return Path(path).read_text().strip() or None
        except OSError as exc:
            raise ValueError(f"TENSORSLICE_TOKEN_FILE {path}: {exc.strerror or exc}") from None
    return None


def resolve_tls(tls: TlsConfig | bool | str | None,
                environ: Mapping[str, str] | None = None) -> TlsConfig | None:
    """The TLS settings: a `TlsConfig`; True for the system's CAs; a CA file's path; False for
    none; None to follow the environment (``TENSORSLICE_TLS_CA``, ``TENSORSLICE_TLS``, ...)."""
    if isinstance(tls, TlsConfig):
        return tls
    if tls is True:
        return TlsConfig()
    if isinstance(tls, str):
        return TlsConfig(ca=tls)
    if tls is False:
        return None
    env = os.environ if environ is None else environ
    ca = env.get("TENSORSLICE_TLS_CA") or None
    cert = env.get("TENSORSLICE_TLS_CERT") or None
    key = env.get("TENSORSLICE_TLS_KEY") or None
    name = env.get("TENSORSLICE_TLS_SERVER_NAME") or None
    on = env.get("TENSORSLICE_TLS", "").strip().lower() in ("1", "true", "yes", "on")
    if not (ca or cert or key or on):
        return None
    return TlsConfig(ca=ca, cert=cert, key=key, server_name=name)
