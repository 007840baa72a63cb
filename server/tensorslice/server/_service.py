"""The gRPC servicer: proto <-> domain objects and errors <-> status codes, nothing more."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from tensorslice.client._errors import TensorSliceError
from tensorslice.client._selection import selection_from_proto
from tensorslice.client._wire import dtype_name
from tensorslice.server._planner import Plan, execute, plan
from tensorslice.server._store import Entry, TensorStore
from tensorslice.server._stream import CHUNK_BYTES, SLAB_BYTES, frames
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["SERVICE_NAME", "ServerConfig", "TensorSliceService", "create_server"]

log = logging.getLogger("tensorslice.server")

SERVICE_NAME = _pb.DESCRIPTOR.services_by_name["TensorSlice"].full_name
MAX_REQUEST_BYTES = 256 << 20

T = TypeVar("T")


class ServerConfig:
    """Server settings, with explicit defaults."""

    def __init__(
        self,
        *,
        max_result_bytes: int = 64 << 30,
        chunk_bytes: int = CHUNK_BYTES,
        slab_bytes: int = SLAB_BYTES,
        max_workers: int = 16,
    ) -> None:
        self.max_result_bytes = max_result_bytes
        self.chunk_bytes = chunk_bytes
        self.slab_bytes = slab_bytes
        self.max_workers = max_workers


def tensor_info(entry: Entry) -> _pb.TensorInfo:
    m = entry.meta
    return _pb.TensorInfo(
        name=m.name,
        shape=list(m.shape),
        dtype=dtype_name(m.dtype),
        device=m.device,
        nbytes=m.nbytes,
        dim_names=list(m.dim_names),
    )


def plan_to_proto(p: Plan) -> _pb.SlicePlan:
    return _pb.SlicePlan(
        steps=[
            _pb.PlanStep(kind=s.kind, dim=s.dim, detail=s.detail, bytes_moved=s.bytes_moved,
                         order=s.order)
            for s in p.steps
        ],
        result_shape=list(p.result_shape),
        result_dtype=dtype_name(p.result_dtype),
        result_nbytes=p.result_nbytes,
        zero_copy=p.zero_copy,
        summary=p.summary(),
    )


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """The one place where errors become status codes."""
    if isinstance(exc, TensorSliceError):
        context.abort(exc.code, exc.message)
    log.exception("internal error while serving a request", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")


class TensorSliceService:
    """Handlers of the `TensorSlice` service over a store."""

    def __init__(self, store: TensorStore, config: ServerConfig | None = None) -> None:
        self.store = store
        self.config = config or ServerConfig()

    def ListTensors(self, request: _pb.ListTensorsRequest, context: grpc.ServicerContext
                    ) -> _pb.ListTensorsResponse:
        return _pb.ListTensorsResponse(tensors=[tensor_info(e) for e in self.store.entries()])

    def DescribeTensor(self, request: _pb.DescribeTensorRequest, context: grpc.ServicerContext
                       ) -> _pb.TensorInfo:
        return tensor_info(self.store.get(request.name))

    def _plan(self, request: _pb.SliceRequest) -> tuple[Entry, Plan]:
        entry = self.store.get(request.tensor)
        selection = selection_from_proto(request)
        return entry, plan(entry.meta, selection, limit=self.config.max_result_bytes)

    def Explain(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> _pb.SlicePlan:
        _, p = self._plan(request)
        return plan_to_proto(p)

    def Slice(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        entry, p = self._plan(request)
        payloads = execute(p, entry.tensor)
        metadata = {
            "tensorslice.tensor": entry.meta.name,
            "tensorslice.version": str(entry.version),
            "tensorslice.plan": p.summary(),
        }
        return frames(
            payloads, metadata, chunk_bytes=self.config.chunk_bytes,
            slab_bytes=self.config.slab_bytes,
        )


def _unary(
    fn: Callable[[Any, grpc.ServicerContext], T],
) -> Callable[[Any, grpc.ServicerContext], T]:
    def handler(request: Any, context: grpc.ServicerContext) -> T:
        try:
            return fn(request, context)
        except Exception as exc:
            _abort(context, exc)
            raise  # unreachable: abort raises

    return handler


def _stream(
    fn: Callable[[Any, grpc.ServicerContext], Iterator[bytes]],
) -> Callable[[Any, grpc.ServicerContext], Iterator[bytes]]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            it = fn(request, context)
            yield from it
        except Exception as exc:
            _abort(context, exc)

    return handler


def generic_handler(service: TensorSliceService) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """Handlers with the generated (de)serializers, except `Slice`'s responses, which are
    framed by hand (`_wire.encode_chunk`) and pass through unchanged."""
    handlers = {
        "ListTensors": grpc.unary_unary_rpc_method_handler(
            _unary(service.ListTensors),
            request_deserializer=_pb.ListTensorsRequest.FromString,
            response_serializer=_pb.ListTensorsResponse.SerializeToString,
        ),
        "DescribeTensor": grpc.unary_unary_rpc_method_handler(
            _unary(service.DescribeTensor),
            request_deserializer=_pb.DescribeTensorRequest.FromString,
            response_serializer=_pb.TensorInfo.SerializeToString,
        ),
        "Explain": grpc.unary_unary_rpc_method_handler(
            _unary(service.Explain),
            request_deserializer=_pb.SliceRequest.FromString,
            response_serializer=_pb.SlicePlan.SerializeToString,
        ),
        "Slice": grpc.unary_stream_rpc_method_handler(
            _stream(service.Slice),
            request_deserializer=_pb.SliceRequest.FromString,
            response_serializer=None,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    ("grpc.max_send_message_length", -1),
    ("grpc.so_reuseport", 0),
]


def create_server(
    store: TensorStore,
    address: str = "127.0.0.1:0",
    config: ServerConfig | None = None,
) -> tuple[grpc.Server, int]:
    """A ready-to-start server for `store` bound to `address`, and the port it got
    (bind port 0 for a free one). Includes the standard gRPC health service."""
    config = config or ServerConfig()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="slice"),
        options=SERVER_OPTIONS,
    )
    server.add_generic_rpc_handlers((generic_handler(TensorSliceService(store, config)),))
    health = _health.HealthServicer()
    for name in ("", SERVICE_NAME):
        health.set(name, _health_pb2.HealthCheckResponse.SERVING)
    _health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.health = health  # type: ignore[attr-defined]
    return server, port
