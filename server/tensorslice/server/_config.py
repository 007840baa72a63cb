"""Server settings, with explicit defaults; every bound a caller can push on is one of
them (`_limits` says what each guarantees), its default taken from the machine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tensorslice.server._limits import machine_cpus, machine_memory
from tensorslice.server._shm import default_shm_bytes
from tensorslice.server._stream import CHUNK_BYTES, SLAB_BYTES

if TYPE_CHECKING:
    from tensorslice.server._auth import TlsFiles

__all__ = ["HEALTH_THREADS", "ServerConfig"]

HEALTH_THREADS = 4
"""Threads beyond those of the calls (`max_calls` running, as many waiting): health checks
and refusals never wait for a busy pool."""


class ServerConfig:
    """Server settings, with explicit defaults; every bound a caller can push on is one of
    them (see `_limits`). Defaults left as None follow the machine (`machine_memory`,
    `machine_cpus`)."""

    def __init__(
        self,
        *,
        max_result_bytes: int | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        slab_bytes: int = SLAB_BYTES,
        max_calls: int | None = None,
        call_wait: float = 2.0,
        send_timeout: float = 10.0,
        max_materialized_bytes: int | None = None,
        max_request_bytes: int | None = None,
        unary_max_bytes: int = 1 << 20,
        bulk: bool = True,
        bulk_port: int = 0,
        ticket_timeout: float = 15.0,
        max_pending_tickets: int = 256,
        max_ticket_bytes: int | None = None,
        max_bulk_connections: int = 64,
        handshake_timeout: float = 5.0,
        token: str | None = None,
        tls: TlsFiles | None = None,
        metrics_port: int | None = None,
        reflection: bool = True,
        read_only: bool = False,
        write_token: str | None = None,
        unix_socket: str | None = None,
        same_host: bool = True,
        shm_max_bytes: int | None = None,
        max_connection_age: float = 0.0,
        max_connection_age_grace: float = 30.0,
        advertise_host: str | None = None,
    ) -> None:
        memory = machine_memory()
        self.max_result_bytes = (
            max_result_bytes if max_result_bytes is not None else memory // 8
        )
        """Largest result, in bytes (0: no limit); default an eighth of the memory."""
        self.chunk_bytes = chunk_bytes
        self.slab_bytes = slab_bytes
        self.max_calls = max_calls if max_calls is not None else max(8, 4 * machine_cpus())
        """TensorSlice calls running at once; more are refused with UNAVAILABLE. Health
        checks are not counted. Default 4 per CPU, at least 8."""
        self.call_wait = call_wait
        """Seconds a call beyond `max_calls` waits for a slot before it is refused (at most
        `max_calls` calls wait)."""
        self.send_timeout = send_timeout
        """Seconds a stream waits for its reader to take the next message before it is
        cancelled, freeing its thread (0: wait for ever)."""
        self.max_materialized_bytes = (
            max_materialized_bytes if max_materialized_bytes is not None else memory // 4
        )
        """Bytes every call together may hold materialised (gathers, threshold statistics,
        results awaiting their bulk transfer); default a quarter of the memory."""
        self.max_request_bytes = (
            max_request_bytes if max_request_bytes is not None
            else max(1 << 20, min(64 << 20, memory // 256))
        )
        """Largest request message gRPC accepts (RESOURCE_EXHAUSTED beyond)."""
        self.unary_max_bytes = unary_max_bytes
        """Largest result `Fetch` returns inline, in one response message."""
        self.bulk = bulk
        """Run the bulk data plane (a TCP listener on the gRPC host) for large results."""
        self.bulk_port = bulk_port
        """Its port; 0 picks a free one (clients learn it from their tickets)."""
        self.ticket_timeout = ticket_timeout
        """Seconds a bulk ticket stays valid unredeemed."""
        self.max_pending_tickets = max_pending_tickets
        """Bulk tickets issued and not yet redeemed, at most."""
        self.max_ticket_bytes = (
            max_ticket_bytes if max_ticket_bytes is not None else memory // 16
        )
        """Materialised bytes that pending tickets may hold, at most (part of
        `max_materialized_bytes`); default a sixteenth of the memory."""
        self.max_bulk_connections = max_bulk_connections
        """Bulk connections open at once (handshaking or transferring); more are closed."""
        self.handshake_timeout = handshake_timeout
        """Seconds a bulk connection has, from accept, to present its whole token."""
        self.token = token
        """The bearer token every call but health checks must carry (metadata
        ``authorization: Bearer TOKEN``); None: no authentication."""
        self.tls = tls
        """Certificate, key and optional client CA of the gRPC port and the bulk data
        plane; None: plaintext."""
        self.metrics_port = metrics_port
        """Port of the Prometheus metrics endpoint on the gRPC host (0: a free one);
        None: no endpoint."""
        self.reflection = reflection
        """Serve gRPC server reflection (``grpcurl list`` / ``describe``)."""
        self.read_only = read_only
        """Refuse every write (put, append, drop) with PERMISSION_DENIED."""
        self.write_token = write_token
        """The bearer token writes must carry (reads take it or `token`); None: writes
        need only what reads need."""
        self.same_host = same_host
        """Hand large results to clients on this host in pooled shared-memory segments
        (Linux, no TLS): the bulk plane also listens on an abstract Unix socket."""
        self.shm_max_bytes = (
            shm_max_bytes if shm_max_bytes is not None else default_shm_bytes(memory)
        )
        """Bytes of same-host segments all clients' sessions may hold together; beyond,
        results go on the session's socket instead. Default a quarter of the memory."""
        self.unix_socket = unix_socket
        """A Unix domain socket's path where gRPC listens too (clients on this host reach
        it as ``unix:PATH``; the bulk data plane stays on TCP); None: none."""
        self.max_connection_age = max_connection_age
        """Seconds after which the server asks a client to close its connection (gRPC
        GOAWAY, with gRPC's own jitter of up to 10%); the client reconnects and re-resolves
        its address, so clients of a load-balanced name (Kubernetes' headless Service, a
        DNS name) find replicas started after they connected. 0: never."""
        self.max_connection_age_grace = max_connection_age_grace
        """Seconds the calls still running on a connection past its age get to finish
        before it is closed."""
        self.advertise_host = advertise_host
        """The host bulk tickets (and the data plane's announcement) name, where clients
        reach this server: replicas behind one load-balanced name need it, since a second
        connection to the name may land on another replica. None: the bind host where it
        is one address; for a wildcard bind (``0.0.0.0``, ``::``) none, and clients use
        the host they called."""

    def __repr__(self) -> str:
        shown = {k: ("'***'" if k in ("token", "write_token") and v is not None else repr(v))
                 for k, v in vars(self).items()}
        fields = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"ServerConfig({fields})"
