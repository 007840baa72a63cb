"""The server's lifecycle: a gRPC server with the TensorSlice and health services and the
bulk data plane, created, started and stopped together."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from tensorslice.server._bulk import BulkServer
from tensorslice.server._config import ServerConfig
from tensorslice.server._service import SERVICE_NAME, TensorSliceService, generic_handler
from tensorslice.server._store import TensorStore

__all__ = ["SERVER_OPTIONS", "TensorSliceServer", "create_server"]

MAX_REQUEST_BYTES = 256 << 20

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
]


class TensorSliceServer:
    """A gRPC server with the TensorSlice and health services, and the bulk data plane
    when enabled; `start`, `stop` and `wait_for_termination` act on all of them."""

    def __init__(self, grpc_server: grpc.Server, health: _health.HealthServicer,
                 bulk: BulkServer | None) -> None:
        self.grpc_server = grpc_server
        self.health = health
        self.bulk = bulk

    def start(self) -> None:
        if self.bulk is not None:
            self.bulk.start()
        self.grpc_server.start()

    def stop(self, grace: float | None) -> threading.Event:
        """Stop accepting calls; in-flight ones get `grace` seconds. The event is set once
        every call has ended."""
        self.health.enter_graceful_shutdown()
        done: threading.Event = self.grpc_server.stop(grace)
        if self.bulk is not None:
            self.bulk.stop()
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
    data plane on the same host unless ``config.bulk`` is off."""
    config = config or ServerConfig()
    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="slice"),
        options=SERVER_OPTIONS,
    )
    bulk = None
    if config.bulk:
        host = address.rsplit(":", 1)[0] if ":" in address else address
        bulk = BulkServer(host, config.bulk_port, ticket_timeout=config.ticket_timeout)
    service = TensorSliceService(store, config, bulk)
    grpc_server.add_generic_rpc_handlers((generic_handler(service),))
    health = _health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health.set(name, _health_pb2.HealthCheckResponse.SERVING)
    _health_pb2_grpc.add_HealthServicer_to_server(health, grpc_server)
    port = grpc_server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    return TensorSliceServer(grpc_server, health, bulk), port
