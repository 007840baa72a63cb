"""The server's lifecycle: a gRPC server with the TensorSlice, health and reflection
services, the bulk data plane and the metrics endpoint, created, started and stopped
together; authentication and TLS (`_auth`) wrap them all."""

from __future__ import annotations

import os
import ssl
import threading
import time
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from tensorslice.core.endpoint import SERVICE_NAME, has_tcp_host, host_of
from tensorslice.server._auth import TokenAuth
from tensorslice.server._bulk import BulkServer
from tensorslice.server._config import HEALTH_THREADS, ServerConfig
from tensorslice.server._metrics import Metrics, MetricsInterceptor, ServerCollector, serve_metrics
from tensorslice.server._service import WRITE_METHODS, TensorSliceService, generic_handler
from tensorslice.server._store import TensorStore

__all__ = ["AddressInUse", "TensorSliceServer", "advertised_host", "create_server",
           "server_options"]



def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]
    if config.max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", round(config.max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms",
             round(config.max_connection_age_grace * 1000)),
        ]
    return options


class AddressInUse(OSError):
    """The server could not listen on an address (typically: another server holds it)."""


class TensorSliceServer:
    """A gRPC server with the TensorSlice and health services, and the bulk data plane
    when enabled; `start`, `stop` and `wait_for_termination` act on all of them."""

    def __init__(self, grpc_server: grpc.Server, health: _health.HealthServicer,
                 bulk: BulkServer | None, service: TensorSliceService | None = None,
                 metrics: Metrics | None = None,
                 metrics_address: tuple[str, int] | None = None) -> None:
        self.grpc_server = grpc_server
        self.health = health
        self.bulk = bulk
        self.service = service
        self.metrics = metrics
        self._metrics_address = metrics_address
        self._metrics_http: Any = None
        self.metrics_port: int | None = None
        """The metrics endpoint's port, once started (None: no endpoint)."""

    def start(self) -> None:
        """Start everything; AddressInUse (everything stopped again) when the metrics port
        cannot be bound."""
        if self.metrics is not None and self._metrics_address is not None:
            host, port = self._metrics_address
            try:
                self._metrics_http, self.metrics_port = serve_metrics(self.metrics, host, port)
            except OSError as exc:
                raise AddressInUse(f"cannot listen on {host}:{port} (metrics): "
                                   f"{exc.strerror or exc}") from None
        if self.bulk is not None:
            self.bulk.start()
        if self.service is not None:
            self.service.watchdog.start()
        self.grpc_server.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Stop accepting calls; in-flight ones, bulk transfers included (and tickets
        issued, which may still be redeemed), get `grace` seconds. The event is set once
        every call and transfer has ended."""
        self.health.enter_graceful_shutdown()
        deadline = time.monotonic() + (grace or 0)
        grpc_done: threading.Event = self.grpc_server.stop(grace)
        done = threading.Event()

        def drain() -> None:
            # Calls in flight may still issue tickets: the bulk plane keeps taking them
            # until the last call has ended, then serves what is pending until the deadline.
            grpc_done.wait()
            if self.bulk is not None:
                self.bulk.stop(max(deadline - time.monotonic(), 0))
            if self.service is not None:
                self.service.watchdog.stop()
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            done.set()

        threading.Thread(target=drain, name="tensorslice-stop", daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))


def _add_unix_port(grpc_server: grpc.Server, path: str,
                   credentials: grpc.ServerCredentials | None) -> None:
    """Listen on the Unix domain socket `path` too (gRPC replaces a stale socket file
    there). Raises AddressInUse where it cannot be bound."""
    target = f"unix:{path}"
    try:
        ok = (grpc_server.add_insecure_port(target) if credentials is None
              else grpc_server.add_secure_port(target, credentials))
    except RuntimeError:
        ok = 0
    if ok == 0:
        grpc_server.stop(None)
        raise AddressInUse(f"cannot listen on {target} (gRPC): the path is not writable, "
                           f"its directory missing, or the path longer than 107 bytes")


def advertised_host(bind_host: str, advertise: str | None) -> str:
    """The host a server names in its bulk tickets: `advertise` where given, else the bind
    host where it is one address; "" for a wildcard bind (clients then use the host they
    called)."""
    if advertise:
        return advertise
    return "" if bind_host in _WILDCARDS else bind_host


_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]", "*"})


def create_server(
    store: TensorStore,
    address: str = "127.0.0.1:0",
    config: ServerConfig | None = None,
) -> tuple[TensorSliceServer, int]:
    """A ready-to-start server for `store` bound to `address`, and the port it got
    (bind port 0 for a free one). Includes the standard gRPC health service, reflection
    (unless ``config.reflection`` is off), the bulk data plane on the same host (unless
    ``config.bulk`` is off) and the metrics endpoint (when ``config.metrics_port`` is
    set; bound by `start`). With ``config.token`` every call but health checks must carry
    it; with ``config.tls`` the gRPC port and the bulk data plane speak TLS only. Raises
    `AddressInUse` when a port cannot be bound, `StartupError` when a TLS file cannot be
    read or used."""
    config = config or ServerConfig()
    credentials: grpc.ServerCredentials | None = None
    ssl_context: ssl.SSLContext | None = None
    if config.tls is not None:
        credentials, ssl_context = config.tls.load()
    metrics = Metrics() if config.metrics_port is not None else None
    interceptors: list[grpc.ServerInterceptor[Any, Any]] = []
    if metrics is not None:
        interceptors.append(MetricsInterceptor(metrics))  # outermost: refusals count too
    if config.token is not None:
        interceptors.append(TokenAuth(
            config.token, write_token=config.write_token,
            writes=[f"/{SERVICE_NAME}/{m}" for m in sorted(WRITE_METHODS)]))
    grpc_server = grpc.server(
        # The TensorSlice calls (running and waiting for a slot), plus threads that
        # health checks and refusals never find busy.
        futures.ThreadPoolExecutor(max_workers=2 * config.max_calls + HEALTH_THREADS,
                                   thread_name_prefix="slice"),
        options=server_options(config),
        interceptors=interceptors,
    )
    try:
        port = (grpc_server.add_insecure_port(address) if credentials is None
                else grpc_server.add_secure_port(address, credentials))
    except RuntimeError:  # recent grpcio raises where older ones returned 0
        port = 0
    if port == 0:
        raise AddressInUse(f"cannot listen on {address} (gRPC): the address is in use or "
                           f"not local")
    if config.unix_socket is not None:
        _add_unix_port(grpc_server, config.unix_socket, credentials)
    # A server reached over a Unix socket only is reached from this host only: its bulk
    # data plane and metrics listen on loopback, never on every interface.
    host = host_of(address) if has_tcp_host(address) else "127.0.0.1"
    bulk = None
    if config.bulk:
        try:
            bulk = BulkServer(host, config.bulk_port, ticket_timeout=config.ticket_timeout,
                              max_tickets=config.max_pending_tickets,
                              max_ticket_bytes=config.max_ticket_bytes,
                              max_connections=config.max_bulk_connections,
                              handshake_timeout=config.handshake_timeout,
                              send_timeout=config.send_timeout,
                              ssl_context=ssl_context, same_host=config.same_host,
                              shm_max_bytes=config.shm_max_bytes,
                              shm_peer_uid=(os.getuid() if config.token is not None
                                            or config.write_token is not None else None))
        except OSError as exc:
            grpc_server.stop(None)
            raise AddressInUse(
                f"cannot listen on {host}:{config.bulk_port} (bulk data plane): "
                f"{exc.strerror or exc}"
            ) from None
    service = TensorSliceService(store, config, bulk)
    if bulk is not None:
        bulk.direct = service.direct
        bulk.advertised_host = advertised_host(host, config.advertise_host)
    grpc_server.add_generic_rpc_handlers((generic_handler(service),))
    health = _health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health.set(name, _health_pb2.HealthCheckResponse.SERVING)
    _health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    service.health = health  # direct health checks (forked clients) ask it too
    if config.reflection:
        from grpc_reflection.v1alpha import reflection

        names = (SERVICE_NAME, _health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                 reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, grpc_server)
    metrics_address = None
    if metrics is not None:
        service.metrics = metrics
        metrics.registry.register(ServerCollector(service, metrics))
        metrics_address = (host or "0.0.0.0", int(config.metrics_port or 0))
    return TensorSliceServer(grpc_server, health, bulk, service, metrics, metrics_address), port
