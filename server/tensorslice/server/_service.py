"""The gRPC servicer: proto <-> domain objects and errors <-> status codes, nothing more."""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health as _health
from grpc_health.v1 import health_pb2 as _health_pb2
from grpc_health.v1 import health_pb2_grpc as _health_pb2_grpc

from tensorslice.core.codec import dtype_name, encode_chunk
from tensorslice.core.errors import (
    FailedPrecondition,
    InvalidSelection,
    ResultTooLarge,
    TensorSliceError,
)
from tensorslice.core.selection import selection_from_proto
from tensorslice.server._bulk import BulkServer
from tensorslice.server._execute import execute
from tensorslice.server._model import Mode, Plan
from tensorslice.server._payload import Payload
from tensorslice.server._plan import combined_limit, plan
from tensorslice.server._store import Entry, TensorStore
from tensorslice.server._stream import CHUNK_BYTES, SLAB_BYTES, frames, pieces
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = [
    "SERVICE_NAME",
    "ServerConfig",
    "TensorSliceServer",
    "TensorSliceService",
    "create_server",
]

log = logging.getLogger("tensorslice.server")

SERVICE_NAME = _pb.DESCRIPTOR.services_by_name["TensorSlice"].full_name
MAX_REQUEST_BYTES = 256 << 20
_BULK_PIECE_BYTES = 16 << 20
_PLAN_CACHE_SIZE = 1024
_PLAN_CACHE_KEY_BYTES = 4096  # requests with large index lists are planned afresh

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
        unary_max_bytes: int = 1 << 20,
        bulk: bool = True,
        bulk_port: int = 0,
        ticket_timeout: float = 60.0,
    ) -> None:
        self.max_result_bytes = max_result_bytes
        self.chunk_bytes = chunk_bytes
        self.slab_bytes = slab_bytes
        self.max_workers = max_workers
        self.unary_max_bytes = unary_max_bytes
        """Largest result `Fetch` returns inline, in one response message."""
        self.bulk = bulk
        """Run the bulk data plane (a TCP listener on the gRPC host) for large results."""
        self.bulk_port = bulk_port
        """Its port; 0 picks a free one (clients learn it from their tickets)."""
        self.ticket_timeout = ticket_timeout


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
        context.abort(grpc.StatusCode[exc.status.name], exc.message)
    log.exception("internal error while serving a request", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal error; the server log has the details")


class TensorSliceService:
    """Handlers of the `TensorSlice` service over a store."""

    def __init__(self, store: TensorStore, config: ServerConfig | None = None,
                 bulk: BulkServer | None = None) -> None:
        self.store = store
        self.config = config or ServerConfig()
        self.bulk = bulk
        # Plans are pure functions of (tensor metadata, request): a request seen again (a
        # dashboard polling, a client re-reading a window) skips parsing and planning. An
        # entry is valid for the tensor version it was planned against.
        self._plans: OrderedDict[bytes, tuple[int, Plan]] = OrderedDict()
        self._plans_lock = threading.Lock()

    def ListTensors(self, request: _pb.ListTensorsRequest, context: grpc.ServicerContext
                    ) -> _pb.ListTensorsResponse:
        return _pb.ListTensorsResponse(tensors=[tensor_info(e) for e in self.store.entries()])

    def DescribeTensor(self, request: _pb.DescribeTensorRequest, context: grpc.ServicerContext
                       ) -> _pb.TensorInfo:
        return tensor_info(self.store.get(request.name))

    def _plan(self, request: _pb.SliceRequest) -> tuple[Entry, Plan]:
        entry = self.store.get(request.tensor)
        key = request.SerializeToString(deterministic=True)
        if len(key) > _PLAN_CACHE_KEY_BYTES:
            return entry, self._plan_fresh(entry, request)
        with self._plans_lock:
            hit = self._plans.get(key)
            if hit is not None and hit[0] == entry.version:
                self._plans.move_to_end(key)
                return entry, hit[1]
        p = self._plan_fresh(entry, request)
        with self._plans_lock:
            self._plans[key] = (entry.version, p)
            if len(self._plans) > _PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return entry, p

    def _plan_fresh(self, entry: Entry, request: _pb.SliceRequest) -> Plan:
        selection = selection_from_proto(request)
        return plan(entry.meta, selection, limit=self.config.max_result_bytes)

    def Explain(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> _pb.SlicePlan:
        _, p = self._plan(request)
        return plan_to_proto(p)

    def _result(self, request: _pb.SliceRequest) -> _Result:
        entry, p = self._plan(request)
        metadata = {
            "tensorslice.tensor": entry.meta.name,
            "tensorslice.version": str(entry.version),
            "tensorslice.plan": p.summary(),
        }
        return _Result(execute(p, entry.tensor), metadata)

    def _frames(self, result: _Result) -> Iterator[bytes]:
        return frames(result.payloads, result.metadata, chunk_bytes=self.config.chunk_bytes,
                      slab_bytes=self.config.slab_bytes)

    def _one_message(self, result: _Result, bulk: bool) -> bytes:
        """A whole result as one serialized `SliceChunk`: inline when small, else a ticket
        for the bulk data plane."""
        # One message or a socket: no framing to bound, so large pieces (fewer sendall calls).
        body = pieces(result.payloads, result.metadata, chunk_bytes=_BULK_PIECE_BYTES,
                      slab_bytes=self.config.slab_bytes)
        header = next(body)
        size = len(header) + sum(p.nbytes for p in result.payloads)
        if size <= self.config.unary_max_bytes:
            # A piece may be a view of a reused buffer: copy each before the next is made.
            return encode_chunk(header, *(bytes(p) if isinstance(p, memoryview) else p
                                          for p in body))
        if bulk and self.bulk is not None:
            token = self.bulk.offer(itertools.chain((header,), body), size)
            ticket = _pb.BulkTicket(port=self.bulk.port, token=token, nbytes=size)
            return _pb.SliceChunk(ticket=ticket).SerializeToString()
        raise FailedPrecondition(
            f"result of {size} bytes is larger than the {self.config.unary_max_bytes}-byte "
            f"limit of a single response{' and the server has no bulk listener' if bulk else ''}"
            f"; use Slice (streaming)"
        )

    def Slice(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        return self._frames(self._result(request))

    def Fetch(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> bytes:
        return self._one_message(self._result(request), request.bulk)

    def SliceMany(self, request: _pb.SliceManyRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        return self._frames(self._result_many(request))

    def FetchMany(self, request: _pb.SliceManyRequest, context: grpc.ServicerContext
                  ) -> bytes:
        return self._one_message(self._result_many(request), request.bulk)

    def _result_many(self, request: _pb.SliceManyRequest) -> _Result:
        """Several selections as one file. Every item is planned (validated) before any
        data moves; each item's ``values`` is renamed to its key, a threshold item's
        ``indices``/``offsets`` to ``KEY.indices``/``KEY.offsets``."""
        if not request.items:
            raise InvalidSelection("SliceMany needs at least one item")
        planned: list[tuple[str, Entry, Plan]] = []
        reserved: set[str] = set()
        for pos, item in enumerate(request.items):
            key = item.key
            if not key:
                raise InvalidSelection(f"item {pos} of SliceMany has an empty key")
            entry, p = self._plan(item.request)
            names = {key}
            if p.mode is Mode.THRESHOLD:
                names |= {f"{key}.indices", f"{key}.offsets"}
            clash = names & reserved
            if clash:
                raise InvalidSelection(
                    f"item {pos} of SliceMany: result name {sorted(clash)[0]!r} is not unique"
                )
            reserved |= names
            planned.append((key, entry, p))
        limit = combined_limit(request.max_bytes, self.config.max_result_bytes)
        _check_total(sum(max(p.result_nbytes, 0) for _, _, p in planned), limit)
        payloads: list[Payload] = []
        for key, entry, p in planned:
            for payload in execute(p, entry.tensor):
                payload.name = key if payload.name == "values" else f"{key}.{payload.name}"
                payloads.append(payload)
        _check_total(sum(x.nbytes for x in payloads), limit)
        metadata = {
            "tensorslice.tensors": json.dumps({k: e.meta.name for k, e, _ in planned}),
            "tensorslice.versions": json.dumps({k: e.version for k, e, _ in planned}),
            "tensorslice.plans": json.dumps({k: p.summary() for k, _, p in planned}),
        }
        return _Result(payloads, metadata)


@dataclass
class _Result:
    """A planned, executed result: payloads (producing their bytes lazily) and metadata."""

    payloads: list[Payload]
    metadata: dict[str, str]


def _check_total(total: int, limit: int) -> None:
    if limit and total > limit:
        raise ResultTooLarge(
            f"results of {total} bytes in all exceed the limit of {limit} bytes"
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
    """Handlers with the generated (de)serializers, except the responses of `Slice` and
    `SliceMany`, which are framed by hand (`_wire.encode_chunk`) and pass through
    unchanged."""
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
        "Fetch": grpc.unary_unary_rpc_method_handler(
            _unary(service.Fetch),
            request_deserializer=_pb.SliceRequest.FromString,
            response_serializer=None,
        ),
        "FetchMany": grpc.unary_unary_rpc_method_handler(
            _unary(service.FetchMany),
            request_deserializer=_pb.SliceManyRequest.FromString,
            response_serializer=None,
        ),
        "SliceMany": grpc.unary_stream_rpc_method_handler(
            _stream(service.SliceMany),
            request_deserializer=_pb.SliceManyRequest.FromString,
            response_serializer=None,
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


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
