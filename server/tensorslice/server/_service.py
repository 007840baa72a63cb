"""The gRPC servicer: proto <-> domain objects and errors <-> status codes, nothing more.
What a call does is `_orchestrate`'s; the server around the servicer is `_server`'s."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2 as _health_pb2

from tensorslice.core.codec import (
    DATA_HOST_KEY,
    DATA_PORT_KEY,
    INSTANCE_KEY,
    dtype_name,
    encode_chunk,
    split_chunk,
)
from tensorslice.core.endpoint import SERVICE_NAME
from tensorslice.core.errors import (
    ERROR_CLASS_KEY,
    InvalidSelection,
    ServerUnavailable,
    Status,
    TensorNotFound,
    TensorSliceError,
    Unauthenticated,
    error_class_name,
)
from tensorslice.server._auth import TokenAuth
from tensorslice.server._bulk import BulkServer, DirectAnswer
from tensorslice.server._config import ServerConfig
from tensorslice.server._limits import ByteBudget, CallGate, Hold, StreamWatchdog, shorten
from tensorslice.server._metrics import Metrics
from tensorslice.server._model import Plan
from tensorslice.server._orchestrate import Calls, Frames
from tensorslice.server._store import Entry, TensorStore
from tensorslice.v1 import tensorslice_pb2 as _pb

__all__ = ["HEALTH_CHECK", "PARSE_COST", "WRITE_METHODS", "TensorSliceService", "generic_handler"]

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
_DRAIN_BYTES = 8 << 20  # what is left of a refused upload read before its refusal is sent


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
        self._raw_parsers = {name: _parser(_METHODS[name][2], self.calls.budget)
                             for name in _RAW_METHODS}  # see `_answer`
        self.gate = CallGate(self.config.max_calls, "max_calls, serve --max-calls",
                             wait=self.config.call_wait)
        self.watchdog = StreamWatchdog(self.config.send_timeout)
        self.metrics: Metrics | None = None
        """Where result bytes are counted, when the server has a metrics endpoint."""
        self._auth = (None if self.config.token is None
                      else TokenAuth(self.config.token, write_token=self.config.write_token))
        self.health: Any = None
        """The server's health servicer (`grpc_health`), which direct health checks ask."""

    def ListTensors(self, request: _pb.ListTensorsRequest,
                    context: grpc.ServicerContext | None) -> _pb.ListTensorsResponse:
        self._announce(context)
        return _pb.ListTensorsResponse(tensors=[tensor_info(e) for e in self.store.entries()])

    def DescribeTensor(self, request: _pb.DescribeTensorRequest,
                       context: grpc.ServicerContext | None) -> _pb.TensorInfo:
        self._announce(context)
        return tensor_info(self.store.get(request.name))

    def _announce(self, context: grpc.ServicerContext | None) -> None:
        """Tell the client the data plane's port and instance id (`DATA_PORT_KEY`,
        `INSTANCE_KEY`, trailing metadata): it learns them before it is forked (a forked
        client calls over the data plane only) and before it calls over a same-host
        session."""
        if context is not None and self.bulk is not None:
            announced = [(DATA_PORT_KEY, str(self.bulk.port)),
                         (INSTANCE_KEY, self.bulk.instance.hex())]
            if self.bulk.advertised_host:
                announced.append((DATA_HOST_KEY, self.bulk.advertised_host))
            context.set_trailing_metadata(tuple(announced))

    def direct(self, method: str, authorization: bytes, data: bytes) -> DirectAnswer:
        """A whole call over the data plane (`BulkServer`'s direct requests, from clients in
        processes forked from a gRPC user): the same token check, calls, limits, errors and
        metrics as over gRPC. A result is answered as the whole file, whatever its size.
        `method` is a TensorSlice method's name, or `HEALTH_CHECK` (which needs no token,
        as over gRPC)."""
        start = time.perf_counter()
        path = (f"/{method}" if method == HEALTH_CHECK
                else f"/{SERVICE_NAME}/{method}" if method in _METHODS else None)
        try:
            body, size, release = self._direct(method, authorization, data)
        except BaseException as exc:
            if path is not None:
                status = exc.status if isinstance(exc, TensorSliceError) else Status.INTERNAL
                self._observe(path, grpc.StatusCode[status.name], start)
            raise
        if path is None:  # pragma: no cover - `_direct` refuses unknown methods
            return body, size, release

        def done() -> None:  # once the answer is sent (or the connection dropped)
            try:
                release()
            finally:
                self._observe(path, grpc.StatusCode.OK, start)

        return body, size, _once(done)

    def _observe(self, path: str, code: grpc.StatusCode, start: float) -> None:
        if self.metrics is not None:
            self.metrics.observe(path, code, time.perf_counter() - start)

    def _direct(self, method: str, authorization: bytes, data: bytes) -> DirectAnswer:
        if method == HEALTH_CHECK:
            return self._direct_health(data)
        if self._auth is not None:
            given = [("authorization", authorization)] if authorization else []
            why = self._auth.check(given)
            if why is not None:
                raise Unauthenticated(why)
        spec = _METHODS.get(method)
        if method in WRITE_METHODS or method in _UPLOADS:
            raise InvalidSelection(f"{method!r} is a write: writes go over gRPC only, not "
                                   "as direct or same-host session calls")
        if spec is None:
            raise InvalidSelection(f"unknown method {shorten(method, 64)!r}")
        _, counted, request_cls, _ = spec
        kept = _KEPT_AS.get(method)
        if kept is not None:  # the answer kept for the same bytes, while still valid
            frame = self.calls.answers.get(kept, data, self.store)
            if frame is not None:
                self.gate.enter()
                answer = split_chunk(frame)[0]
                return (answer,), len(answer), _once(self.gate.leave)
        request, parsed = _unwrap(_parser(request_cls, self.calls.budget)(data))
        try:
            if method in ("ListTensors", "DescribeTensor", "Explain"):
                answer = getattr(self, method)(request, None).SerializeToString()
                parsed()
                return (answer,), len(answer), _nothing
            if counted:
                self.gate.enter()
            try:
                many = method in ("SliceMany", "FetchMany")
                planned = (self.calls.planned_many(request) if many
                           else self.calls.planned(request))
                file, size, hold = self.calls.whole_file(planned)
                body: Iterable[bytes | memoryview] = file  # written into a segment, or sent
                if kept is not None and size <= min(self.calls.answers.max_answer,
                                                    self.config.unary_max_bytes):
                    try:  # kept for the next call of the same bytes, gRPC's or a direct one
                        frame = encode_chunk(*[bytes(p) for p in file])
                    finally:
                        hold.release()
                    self.calls.answers.put(kept, data, planned, frame)
                    body = iter((split_chunk(frame)[0],))
            except BaseException:
                if counted:
                    self.gate.leave()
                raise
        except BaseException:
            parsed()
            raise
        leave = _once(self.gate.leave) if counted else _nothing

        def release() -> None:
            hold.release()
            parsed()
            leave()

        return body, size, release

    def _direct_health(self, data: bytes) -> DirectAnswer:
        """The standard health check, answered from the server's health service."""
        request, parsed = _unwrap(_parser(_health_pb2.HealthCheckRequest,
                                          self.calls.budget)(data))
        parsed()  # a service's name, read at once
        if self.health is None:
            raise TensorNotFound("this server runs no health service")
        context = _StatusOnly()
        response = self.health.Check(request, context)
        if context.code == grpc.StatusCode.NOT_FOUND:
            raise TensorNotFound(
                f"no health status for service {shorten(request.service, 80)!r}")
        answer = response.SerializeToString()
        return (answer,), len(answer), _nothing

    def Explain(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> _pb.SlicePlan:
        _, p = self.calls.plan(request)
        return plan_to_proto(p)

    def Slice(self, request: _pb.SliceRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        return _ending(self.calls.frames(self.calls.planned(request)), context)

    def Fetch(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        return self._answer("Fetch", raw)

    def SliceMany(self, request: _pb.SliceManyRequest, context: grpc.ServicerContext
                  ) -> Iterator[bytes]:
        return _ending(self.calls.frames(self.calls.planned_many(request)), context)

    def FetchMany(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        return self._answer("FetchMany", raw)

    def _answer(self, method: str, raw: bytes) -> bytes:
        """A one-message call from its request's bytes: the answer kept for the same bytes
        when still valid (`AnswerCache`), else parsed, planned and executed (and kept when
        small)."""
        calls = self.calls
        frame = calls.answers.get(method, raw, self.store)
        if frame is None:
            request, release = _unwrap(self._raw_parsers[method](raw))
            try:
                planned = (calls.planned_many(request) if method == "FetchMany"
                           else calls.planned(request, raw))
                frame = calls.one_message(planned, request.bulk)
            finally:
                release()
            calls.answers.put(method, raw, planned, frame)
        return self._inline(frame)

    def Put(self, requests: Iterable[_pb.UploadChunk], context: grpc.ServicerContext
            ) -> _pb.TensorInfo:
        return tensor_info(self.calls.put(requests))

    def Append(self, requests: Iterable[_pb.UploadChunk], context: grpc.ServicerContext
               ) -> _pb.TensorInfo:
        return tensor_info(self.calls.append(requests))

    def Drop(self, request: _pb.DropRequest, context: grpc.ServicerContext
             ) -> _pb.DropResponse:
        return _pb.DropResponse(version=self.calls.drop(request.name))

    def OpenUpload(self, request: _pb.OpenUploadRequest, context: grpc.ServicerContext
                   ) -> _pb.BulkTicket:
        return self.calls.open_upload(
            request, lambda entry: tensor_info(entry).SerializeToString())

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


class _StatusOnly:
    """The part of a servicer context the health servicer's `Check` uses."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code


PARSE_COST = 32
"""Bytes of memory parsing a request may take per byte of it, at most: reserved in the
budget of materialised bytes before parsing, given back when the call ends. Measured peaks
(a server's resident memory, gRPC's copies of the message included): an index list of
one-byte values about 26 times its size (8 bytes per value in the parsed message, 8 more as
an index tensor), a mask about 4 times."""


class _Refused:
    """A request refused before its handler ran: it did not parse, or parsing it would not
    fit the memory budget. Its handler raises `error`."""

    def __init__(self, error: TensorSliceError) -> None:
        self.error = error


class _Parsed:
    """A parsed request and the memory its parsing holds against the budget, given back
    when its call ends (`release`), or at the latest when the request is dropped."""

    def __init__(self, message: Any, hold: Hold) -> None:
        self.message = message
        self._finalizer = weakref.finalize(self, hold.release)

    def release(self) -> None:
        """Give the reservation back (once; a bound `release` keeps this request alive)."""
        self._finalizer()


def _unwrap(request: Any) -> tuple[Any, Callable[[], object]]:
    """A handler's request and what gives its parse cost back; raises a refusal's error."""
    if isinstance(request, _Refused):
        raise request.error
    if isinstance(request, _Parsed):
        return request.message, request.release
    return request, _nothing


def _parser(cls: Any, budget: ByteBudget | None = None) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: gRPC answers a deserializer's exception
    with INTERNAL (and logs a traceback), so a request that does not parse becomes a
    `_Refused` for the handler to raise. With a `budget`, parsing reserves `PARSE_COST` times
    the request's size first (refused when that does not fit), and the request comes
    `_Parsed` with its reservation."""
    name = cls.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        hold = None
        if budget is not None:
            hold = budget.hold()
            try:
                hold.add(PARSE_COST * len(data),
                         f"parsing a {name} of {len(data)} bytes ({PARSE_COST} bytes per byte)")
            except TensorSliceError as exc:
                return _Refused(exc)
        try:
            message = cls.FromString(data)
        except Exception as exc:  # DecodeError, or anything else the parser raises
            if hold is not None:
                hold.release()
            return _Refused(InvalidSelection(
                f"malformed {name} ({len(data)} bytes): {shorten(str(exc), 200)}"))
        return message if hold is None else _Parsed(message, hold)

    return parse


def _unary(
    fn: Callable[[Any, grpc.ServicerContext], T], gate: CallGate | None,
) -> Callable[[Any, grpc.ServicerContext], T]:
    def handler(request: Any, context: grpc.ServicerContext) -> T:
        release: Callable[[], object] = _nothing
        try:
            request, release = _unwrap(request)
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
        finally:
            release()

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
        release: Callable[[], object] = _nothing
        try:
            request, release = _unwrap(request)
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
            release()
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
        message, release = _unwrap(message)
        try:
            yield message
        finally:
            release()


def _upload(
    fn: Callable[[Any, grpc.ServicerContext], T], gate: CallGate, watchdog: StreamWatchdog,
) -> Callable[[Any, grpc.ServicerContext], T]:
    """A client-streaming handler (an upload), counted against `max_calls`."""

    def handler(request_iterator: Any, context: grpc.ServicerContext) -> T:
        requests = _requests(request_iterator, context, watchdog)
        try:
            gate.enter()
            try:
                return fn(requests, context)
            finally:
                gate.leave()
        except Exception as exc:
            if isinstance(exc, TensorSliceError) and not isinstance(exc, ServerUnavailable):
                _drain(requests)
            _abort(context, exc)
            raise  # unreachable: abort raises

    return handler


def _drain(requests: Iterator[Any]) -> None:
    """Read what is left of a refused upload, up to `_DRAIN_BYTES`, before the refusal is
    sent: a client still writing when the status comes may lose the status to its failed
    write (grpc.aio reports INTERNAL, "Internal error from Core", in place of the server's
    code), so a small upload is read to its end first; a larger one is refused where it
    stands. A client that stops sending is cut off by the stream watchdog as in any upload."""
    drained = 0
    try:
        for message in requests:
            drained += message.ByteSize()
            if drained > _DRAIN_BYTES:
                return
    except Exception:  # the stream broke or was cut off: nothing more to wait for
        return


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
    "OpenUpload": (False, True, _pb.OpenUploadRequest, _pb.BulkTicket),
}
# Client-streaming methods (uploads): request class, response class.
_UPLOADS: dict[str, tuple[Any, Any]] = {
    "Put": (_pb.UploadChunk, _pb.TensorInfo),
    "Append": (_pb.UploadChunk, _pb.TensorInfo),
}
HEALTH_CHECK = (
    f"{_health_pb2.DESCRIPTOR.services_by_name['Health'].full_name}/Check"
)
"""The direct request method of the standard health check (the gRPC path less its '/')."""
# One-message answers: their handlers take the request's bytes (the answer cache's key)
# and parse them only when no answer is kept.
_RAW_METHODS = frozenset({"Fetch", "FetchMany"})
# Direct calls whose small answers are kept in (and served from) the answer cache, under the
# one-message method's name: a request's bytes are the same whichever way it comes.
_KEPT_AS = {"Fetch": "Fetch", "Slice": "Fetch", "FetchMany": "FetchMany",
            "SliceMany": "FetchMany"}
WRITE_METHODS = frozenset({"Put", "Append", "Drop", "OpenUpload"})
"""The methods that change what the server holds."""


def generic_handler(service: TensorSliceService) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The service's handlers: requests parsed by us (`_parser`), calls counted
    (`CallGate`), stalled streams cancelled (`StreamWatchdog`), errors become status codes
    (`_abort`)."""
    handlers = {}
    budget = service.calls.budget  # requests' parse cost counts against it
    for name, (streams, counted, request_cls, response_cls) in _METHODS.items():
        fn = getattr(service, name)
        serialize = None if response_cls is None else response_cls.SerializeToString
        if streams:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _stream(fn, service.gate, service.watchdog, service.count_streamed),
                request_deserializer=_parser(request_cls, budget),
                response_serializer=serialize,
            )
        else:
            # None: the handler gets the bytes (`_answer` parses them, with the budget)
            parse = None if name in _RAW_METHODS else _parser(request_cls, budget)
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _unary(fn, service.gate if counted else None),
                request_deserializer=parse, response_serializer=serialize,
            )
    for name, (request_cls, response_cls) in _UPLOADS.items():
        handlers[name] = grpc.stream_unary_rpc_method_handler(
            _upload(getattr(service, name), service.gate, service.watchdog),
            request_deserializer=_parser(request_cls, budget),
            response_serializer=response_cls.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
