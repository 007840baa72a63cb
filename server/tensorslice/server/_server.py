"""The server's lifecycle: a gRPC server with the TensorSlice and health services and the
bulk data plane, created, started and stopped together."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from tensorslice.core.endpoint import SERVICE_NAME, host_of
from tensorslice.server._bulk import BulkServer
from tensorslice.server._config import HEALTH_THREADS, ServerConfig
from tensorslice.server._service import TensorSliceService, generic_handler
from tensorslice.server._store import TensorStore

__all__ = ["AddressInUse", "TensorSliceServer", "create_server", "server_options"]



def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]


class AddressInUse(OSError):
    """The server could not listen on an address (typically: another server holds it)."""


class TensorSliceServer:
    """A gRPC server with the TensorSlice and health services, and the bulk data plane
    when enabled; `start`, `stop` and `wait_for_termination` act on all of them."""

    def __init__(self, grpc_server: grpc.Server, health: _health.HealthServicer,
                 bulk: BulkServer | None, service: TensorSliceService | None = None) -> None:
        self.grpc_server = grpc_server
        self.health = health
        self.bulk = bulk
        self.service = service

    def start(self) -> None:
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
        grpc_done: threading.Event = self.grpc_server.stop(grace)
        done = threading.Event()

        def drain() -> None:
            if self.bulk is not None:
                self.bulk.stop(grace)
            grpc_done.wait()
            if self.service is not None:
                self.service.watchdog.stop()
            done.set()

        threading.Thread(target=drain, name="tensorslice-stop", daemon=True).start()
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return bool(self.grpc_server.wait_for_termination(timeout))


def create_server(
    store: TensorStore,
    address: str = "127.0.0.1:0",
    config: ServerConfig | None = None,
) -> tuple[TensorSliceServer, int]:
    """A ready-to-start server for `store` bound to `address`, and the port it got
    (bind port 0 for a free one). Includes the standard gRPC health service, and the bulk
    data plane on the same host unless ``config.bulk`` is off. Raises `AddressInUse` when
    either port cannot be bound."""
    config = config or ServerConfig()
    grpc_server = grpc.server(
        # The TensorSlice calls (running and waiting for a slot), plus threads that
        # health checks and refusals never find busy.
        futures.ThreadPoolExecutor(max_workers=2 * config.max_calls + HEALTH_THREADS,
                                   thread_name_prefix="slice"),
        options=server_options(config),
    )
    try:
        port = grpc_server.add_insecure_port(address)
    except RuntimeError:  # recent grpcio raises where older ones returned 0
        port = 0
    if port == 0:
        raise AddressInUse(f"cannot listen on {address} (gRPC): the address is in use or "
                           f"not local")
    bulk = None
    if config.bulk:
        host = host_of(address)
        try:
            bulk = BulkServer(host, config.bulk_port, ticket_timeout=config.ticket_timeout,
                              max_tickets=config.max_pending_tickets,
                              max_ticket_bytes=config.max_ticket_bytes,
                              max_connections=config.max_bulk_connections,
                              handshake_timeout=config.handshake_timeout,
                              send_timeout=config.send_timeout)
        except OSError as exc:
            grpc_server.stop(None)
            raise AddressInUse(
                f"cannot listen on {host}:{config.bulk_port} (bulk data plane): "
                f"{exc.strerror or exc}"
            ) from None
    service = TensorSliceService(store, config, bulk)
    grpc_server.add_generic_rpc_handlers((generic_handler(service),))
    health = _health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health.set(name, _health_pb2.HealthCheckResponse.SERVING)
    _health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    return TensorSliceServer(grpc_server, health, bulk, service), port
