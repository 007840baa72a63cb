"""The gRPC servicer: proto <-> domain objects and errors <-> status codes, nothing more.
What a call does is `_orchestrate`'s; the server around the servicer is `_server`'s."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc

from tensorslice.core.codec import DATA_PORT_KEY, dtype_name, split_chunk
from tensorslice.core.endpoint import SERVICE_NAME
from tensorslice.core.errors import (
    ERROR_CLASS_KEY,
    InvalidSelection,
    ServerUnavailable,
    TensorSliceError,
    Unauthenticated,
    error_class_name,
)
from tensorslice.server._auth import TokenAuth
from tensorslice.server._bulk import BulkServer, DirectAnswer
from tensorslice.server._config import ServerConfig
from tensorslice.server._limits import CallGate, StreamWatchdog, shorten
from tensorslice.server._metrics import Metrics
from tensorslice.server._model import Plan
from tensorslice.server._orchestrate import Calls, Frames
from tensorslice.server._store import Entry, TensorStore
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["WRITE_METHODS", "TensorSliceService", "generic_handler"]

log = logging.getLogger("tensorslice.server")

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
        version=entry.version,
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


_MESSAGE_CHARS = 1000  # an error message never echoes more than this back


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    """The one place where errors become status codes."""
    if isinstance(exc, TensorSliceError):
        name = error_class_name(exc)
        if name is not None:
            context.set_trailing_metadata(((ERROR_CLASS_KEY, name),))
        context.abort(grpc.StatusCode[exc.status.name], shorten(exc.message, _MESSAGE_CHARS))
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
        self.gate = CallGate(self.config.max_calls, "max_calls, serve --max-calls",
                             wait=self.config.call_wait)
        self.watchdog = StreamWatchdog(self.config.send_timeout)
        self.metrics: Metrics | None = None
        """Where result bytes are counted, when the server has a metrics endpoint."""
        self._auth = None if self.config.token is None else TokenAuth(self.config.token)

    def ListTensors(self, request: _pb.ListTensorsRequest,
                    context: grpc.ServicerContext | None) -> _pb.ListTensorsResponse:
        self._announce(context)
        return _pb.ListTensorsResponse(tensors=[tensor_info(e) for e in self.store.entries()])

    def DescribeTensor(self, request: _pb.DescribeTensorRequest,
                       context: grpc.ServicerContext | None) -> _pb.TensorInfo:
        self._announce(context)
        return tensor_info(self.store.get(request.name))

    def _announce(self, context: grpc.ServicerContext | None) -> None:
        """Tell the client the data plane's port (`DATA_PORT_KEY`, trailing metadata): it
        learns it before it is forked (a forked client calls over the data plane only)."""
        if context is not None and self.bulk is not None:
            context.set_trailing_metadata(((DATA_PORT_KEY, str(self.bulk.port)),))

    def direct(self, method: str, authorization: bytes, data: bytes) -> DirectAnswer:
        """A whole call over the data plane (`BulkServer`'s direct requests, from clients in
        processes forked from a gRPC user): the same token check, calls, limits and errors
        as over gRPC. A result is answered as the whole file, whatever its size."""
        if self._auth is not None:
            given = [("authorization", authorization)] if authorization else []
            why = self._auth.check(given)
            if why is not None:
                raise Unauthenticated(why)
        spec = _METHODS.get(method)
        if spec is None or method in WRITE_METHODS:  # writes go over gRPC only
            raise InvalidSelection(f"unknown method {shorten(method, 64)!r}")
        _, counted, request_cls, _ = spec
        request = _parser(request_cls)(data)
        if isinstance(request, _Malformed):
            raise InvalidSelection(request.message)
        if method in ("ListTensors", "DescribeTensor", "Explain"):
            answer = getattr(self, method)(request, None).SerializeToString()
            return (answer,), len(answer), _nothing
        if counted:
            self.gate.enter()
        try:
            many = method in ("SliceMany", "FetchMany")
            planned = (self.calls.planned_many(request) if many
                       else self.calls.planned(request))
            body, size, hold = self.calls.whole_file(planned)
        except BaseException:
            if counted:
                self.gate.leave()
            raise
        leave = _once(self.gate.leave) if counted else _nothing

        def release() -> None:
            hold.release()
            leave()

        return body, size, release

    def Explain(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> _pb.SlicePlan:
        _, p = self.calls.plan(request)
        return plan_to_proto(p)

    def Slice(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        return _ending(self.calls.frames(self.calls.planned(request)), context)

    def Fetch(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> bytes:
        return self._inline(self.calls.one_message(self.calls.planned(request), request.bulk))

    def SliceMany(self, request: _pb.SliceManyRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        return _ending(self.calls.frames(self.calls.planned_many(request)), context)

    def FetchMany(self, request: _pb.SliceManyRequest, context: grpc.ServicerContext
                  ) -> bytes:
        return self._inline(
            self.calls.one_message(self.calls.planned_many(request), request.bulk)
        )

    def Put(self, requests: Iterable[_pb.UploadChunk], context: grpc.ServicerContext
            ) -> _pb.TensorInfo:
        return tensor_info(self.calls.put(requests))

    def Append(self, requests: Iterable[_pb.UploadChunk], context: grpc.ServicerContext
               ) -> _pb.TensorInfo:
        return tensor_info(self.calls.append(requests))

    def Drop(self, request: _pb.DropRequest, context: grpc.ServicerContext
             ) -> _pb.DropResponse:
        return _pb.DropResponse(version=self.calls.drop(request.name))

    def _inline(self, frame: bytes) -> bytes:
        """`frame`, counted as inline bytes when it carries data (not a bulk ticket)."""
        if self.metrics is not None:
            data, ticket = split_chunk(frame)
            if ticket is None:
                self.metrics.sent("inline", len(data))
        return frame

    def count_streamed(self, nbytes: int) -> None:
        if self.metrics is not None:
            self.metrics.sent("stream", nbytes)


def _ending(answer: Frames, context: grpc.ServicerContext) -> Iterator[bytes]:
    """The frames of `answer`, whose memory is given back when the call ends, however it
    ends (a cancelled stream's generator may never be resumed)."""
    if not context.add_callback(answer.release):
        answer.release()  # the call has ended already
    return iter(answer)


class _Malformed:
    """A request message that did not parse; its handler answers INVALID_ARGUMENT."""

    def __init__(self, message: str) -> None:
        self.message = message


def _parser(cls: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: gRPC answers a deserializer's exception
    with INTERNAL (and logs a traceback), so a request that does not parse becomes a
    `_Malformed` for the handler to refuse."""
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return cls.FromString(data)
        except Exception as exc:  # DecodeError, or anything else the parser raises
            return _Malformed(f"malformed {name} ({len(data)} bytes): {shorten(str(exc), 200)}")

    return parse


def _unary(
    fn: Callable[[Any, grpc.ServicerContext], T], gate: CallGate | None,
) -> Callable[[Any, grpc.ServicerContext], T]:
    def handler(request: Any, context: grpc.ServicerContext) -> T:
        try:
            if isinstance(request, _Malformed):
                raise InvalidSelection(request.message)
            if gate is None:
                return fn(request, context)
            gate.enter()
            try:
                return fn(request, context)
            finally:
                gate.leave()
        except Exception as exc:
            _abort(context, exc)
            raise  # unreachable: abort raises

    return handler


def _stream(
    fn: Callable[[Any, grpc.ServicerContext], Iterator[bytes]],
    gate: CallGate,
    watchdog: StreamWatchdog,
    count: Callable[[int], None],
) -> Callable[[Any, grpc.ServicerContext], Iterator[bytes]]:
    """A streaming handler that holds a slot of `gate` until the stream ends, however it
    ends, and tells `watchdog` while each message waits for the reader: a stream whose
    reader stops is cancelled (gRPC's send wait would hold the thread for ever)."""

    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        key = object()
        leave = _once(gate.leave)
        entered = False
        try:
            if isinstance(request, _Malformed):
                raise InvalidSelection(request.message)
            gate.enter()
            entered = True  # a refused call took no slot and gives none back
            if not context.add_callback(leave):
                return
            it = fn(request, context)
            try:
                for message in it:
                    watchdog.sending(key, context.cancel)
                    yield message  # resumes once gRPC has sent it and asks for the next
                    watchdog.sent(key)
                    count(len(message))
            finally:
                close = getattr(it, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            _abort(context, exc)
        finally:
            watchdog.done(key)
            if entered:
                leave()

    return handler


def _nothing() -> None:
    pass


def _requests(it: Iterator[Any], context: grpc.ServicerContext,
              watchdog: StreamWatchdog) -> Iterator[Any]:
    """A client stream's messages; one that did not parse is refused, and a stream the
    client cut off ends the call (nothing is stored). While the next message is awaited the
    stream is in `watchdog`'s care: a client that stops sending mid-upload is cancelled after
    `send_timeout`, so it cannot keep its slot and its memory reservation."""
    key = object()
    while True:
        watchdog.sending(key, context.cancel)
        try:
            message = next(it)
        except StopIteration:
            return
        except grpc.RpcError:  # the client cancelled, went away or stalled mid-upload
            raise ServerUnavailable("the upload was cut off (the client cancelled, went "
                                    "away, or sent nothing for send_timeout); nothing was "
                                    "stored") from None
        finally:
            watchdog.done(key)
        if isinstance(message, _Malformed):
            raise InvalidSelection(message.message)
        yield message


def _upload(
    fn: Callable[[Any, grpc.ServicerContext], T], gate: CallGate, watchdog: StreamWatchdog,
) -> Callable[[Any, grpc.ServicerContext], T]:
    """A client-streaming handler (an upload), counted against `max_calls`."""

    def handler(request_iterator: Any, context: grpc.ServicerContext) -> T:
        try:
            gate.enter()
            try:
                return fn(_requests(request_iterator, context, watchdog), context)
            finally:
                gate.leave()
        except Exception as exc:
            _abort(context, exc)
            raise  # unreachable: abort raises

    return handler


def _once(fn: Callable[[], object]) -> Callable[[], None]:
    lock = threading.Lock()
    done = False

    def call() -> None:
        nonlocal done
        with lock:
            if done:
                return
            done = True
        fn()

    return call


# Each method: (streams its answer, counted against `max_calls`, request class, response
# class; None where the answer is framed by hand with `tensorslice.core.codec.encode_chunk`
# and passes through unchanged). Listing and describing are cheap and bounded: not counted.
_METHODS: dict[str, tuple[bool, bool, Any, Any]] = {
    "ListTensors": (False, False, _pb.ListTensorsRequest, _pb.ListTensorsResponse),
    "DescribeTensor": (False, False, _pb.DescribeTensorRequest, _pb.TensorInfo),
    "Explain": (False, True, _pb.SliceRequest, _pb.SlicePlan),
    "Slice": (True, True, _pb.SliceRequest, None),
    "Fetch": (False, True, _pb.SliceRequest, None),
    "FetchMany": (False, True, _pb.SliceManyRequest, None),
    "SliceMany": (True, True, _pb.SliceManyRequest, None),
    "Drop": (False, True, _pb.DropRequest, _pb.DropResponse),
}
# Client-streaming methods (uploads): request class, response class.
_UPLOADS: dict[str, tuple[Any, Any]] = {
    "Put": (_pb.UploadChunk, _pb.TensorInfo),
    "Append": (_pb.UploadChunk, _pb.TensorInfo),
}
WRITE_METHODS = frozenset({"Put", "Append", "Drop"})
"""The methods that change what the server holds."""


def generic_handler(service: TensorSliceService) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The service's handlers: requests parsed by us (`_parser`), calls counted
    (`CallGate`), stalled streams cancelled (`StreamWatchdog`), errors become status codes
    (`_abort`)."""
    handlers = {}
    for name, (streams, counted, request_cls, response_cls) in _METHODS.items():
        fn = getattr(service, name)
        serialize = None if response_cls is None else response_cls.SerializeToString
        if streams:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _stream(fn, service.gate, service.watchdog, service.count_streamed),
                request_deserializer=_parser(request_cls), response_serializer=serialize,
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn, service.gate if counted else None),
                request_deserializer=_parser(request_cls), response_serializer=serialize,
            )
    for name, (request_cls, response_cls) in _UPLOADS.items():
        handlers[name] = grpc.stream_unary_rpc_method_handler(
            _upload(getattr(service, name), service.gate, service.watchdog),
            request_deserializer=_parser(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
