"""The gRPC servicer: proto <-> domain objects and errors <-> status codes, nothing more.
What a call does is `_orchestrate`'s; the server around the servicer is `_server`'s."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

from tensorslice.core.codec import dtype_name
from tensorslice.core.errors import TensorSliceError
from tensorslice.server._bulk import BulkServer
from tensorslice.server._config import ServerConfig
from tensorslice.server._model import Plan
from tensorslice.server._orchestrate import Calls
from tensorslice.server._store import Entry, TensorStore
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["SERVICE_NAME", "TensorSliceService", "generic_handler"]

log = logging.getLogger("tensorslice.server")

SERVICE_NAME = _pb.DESCRIPTOR.services_by_name["TensorSlice"].full_name

T = TypeVar("T")


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
        self.calls = Calls(store, self.config, bulk)

    def ListTensors(self, request: _pb.ListTensorsRequest, context: grpc.ServicerContext
                    ) -> _pb.ListTensorsResponse:
        return _pb.ListTensorsResponse(tensors=[tensor_info(e) for e in self.store.entries()])

    def DescribeTensor(self, request: _pb.DescribeTensorRequest, context: grpc.ServicerContext
                       ) -> _pb.TensorInfo:
        return tensor_info(self.store.get(request.name))

    def Explain(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> _pb.SlicePlan:
        _, p = self.calls.plan(request)
        return plan_to_proto(p)

    def Slice(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        return self.calls.frames(self.calls.planned(request))

    def Fetch(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> bytes:
        return self.calls.one_message(self.calls.planned(request), request.bulk)

    def SliceMany(self, request: _pb.SliceManyRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        return self.calls.frames(self.calls.planned_many(request))

    def FetchMany(self, request: _pb.SliceManyRequest, context: grpc.ServicerContext
                  ) -> bytes:
        return self.calls.one_message(self.calls.planned_many(request), request.bulk)


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


# Each method: (streams its answer, request class, response class; None where the answer is
# framed by hand with `tensorslice.core.codec.encode_chunk` and passes through unchanged).
_METHODS: dict[str, tuple[bool, Any, Any]] = {
    "ListTensors": (False, _pb.ListTensorsRequest, _pb.ListTensorsResponse),
    "DescribeTensor": (False, _pb.DescribeTensorRequest, _pb.TensorInfo),
    "Explain": (False, _pb.SliceRequest, _pb.SlicePlan),
    "Slice": (True, _pb.SliceRequest, None),
    "Fetch": (False, _pb.SliceRequest, None),
    "FetchMany": (False, _pb.SliceManyRequest, None),
    "SliceMany": (True, _pb.SliceManyRequest, None),
}


def generic_handler(service: TensorSliceService) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The service's handlers: errors become status codes (`_abort`)."""
    handlers = {}
    for name, (streams, request_cls, response_cls) in _METHODS.items():
        fn = getattr(service, name)
        serialize = None if response_cls is None else response_cls.SerializeToString
        if streams:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _stream(fn), request_deserializer=request_cls.FromString,
                response_serializer=serialize,
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn), request_deserializer=request_cls.FromString,
                response_serializer=serialize,
            )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
