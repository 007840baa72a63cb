"""Every bound a caller can push on: hit with small limits, and normal clients served
meanwhile (concurrent calls, stalled streams, materialised bytes, tickets, bulk
connections and handshakes, request size, shutdown, ports in use)."""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tensorslice.core.codec import decode_chunk
from tensorslice.core.endpoint import SERVICE_NAME
from tensorslice.core.errors import ResultTooLarge, ServerUnavailable
from tensorslice.core.selection import Combine, Indices, Range, Selection, Threshold
from tensorslice.server import AddressInUse, ServerConfig, TensorStore, create_server
from tensorslice.server._bulk import TOKEN_BYTES, BulkServer
from tensorslice.server._execute import execute
from tensorslice.server._limits import ByteBudget, CallGate, StreamWatchdog
from tensorslice.server._model import TensorMeta
from tensorslice.server._plan import plan
from tensorslice.server._server import TensorSliceServer
from tensorslice.v1 import tensorslice_pb2 as pb

BIG = torch.arange(8 << 20, dtype=torch.float32).reshape(8192, 1024)  # 32 MiB
SMALL = torch.arange(64, dtype=torch.float32).reshape(8, 8)


def _start(**config: Any) -> tuple[TensorSliceServer, str]:
    store = TensorStore()
    store.add("big", BIG)
    store.add("small", SMALL)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(**config))
    srv.start()
    return srv, f"127.0.0.1:{port}"


@pytest.fixture()
def serve() -> Iterator[Callable[..., tuple[TensorSliceServer, str]]]:
    started: list[TensorSliceServer] = []

    def make(**config: Any) -> tuple[TensorSliceServer, str]:
        srv, address = _start(**config)
        started.append(srv)
        return srv, address

    yield make
    for srv in started:
        srv.stop(grace=None).wait(10)


def _channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", -1)])


def _unary(ch: grpc.Channel, method: str) -> Any:
    return ch.unary_unary(f"/{SERVICE_NAME}/{method}",
                          request_serializer=lambda m: m.SerializeToString(),
                          response_deserializer=None)


def _stream(ch: grpc.Channel, method: str) -> Any:
    return ch.unary_stream(f"/{SERVICE_NAME}/{method}",
                           request_serializer=lambda m: m.SerializeToString(),
                           response_deserializer=None)


def _whole(tensor: str) -> pb.SliceRequest:
    return pb.SliceRequest(tensor=tensor)


def _small_ok(ch: grpc.Channel) -> None:
    frame = _unary(ch, "Fetch")(_whole("small"), timeout=60)
    assert torch.equal(safetensors.torch.load(bytes(decode_chunk(frame)))["values"], SMALL)


def _healthy(ch: grpc.Channel) -> bool:
    stub = health_pb2_grpc.HealthStub(ch)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def _stall(ch: grpc.Channel) -> Any:
    """A `Slice` of 32 MiB whose reader takes one message and stops."""
    call = _stream(ch, "Slice")(_whole("big"), timeout=600)
    next(call)
    return call


def _until(cond: Callable[[], bool], seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _code(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    err: Any = info.value
    return err.code(), err.details()


# ------------------------------------------------------------------ concurrent calls


@pytest.mark.e2e
def test_calls_beyond_max_calls_are_refused_health_and_listing_served(serve: Any) -> None:
    srv, address = serve(max_calls=2, call_wait=0, send_timeout=0, chunk_bytes=64 << 10)
    with _channel(address) as a, _channel(address) as b, \
            _channel(address) as c:
        stalled = [_stall(a), _stall(b)]
        code, details = _code(lambda: _small_ok(c))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details == ("server busy: 2 calls in progress, the limit of 2 "
                           "(max_calls, serve --max-calls); retry shortly")
        code, _ = _code(lambda: next(_stream(c, "Slice")(_whole("big"), timeout=10)))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert srv.service is not None and srv.service.gate.active == 2  # refusals took none
        assert _healthy(c)  # health is not counted and has threads of its own
        assert _unary(c, "ListTensors")(pb.ListTensorsRequest(), timeout=5)
        for call in stalled:
            call.cancel()
        assert _until(lambda: srv.service is not None and srv.service.gate.active == 0)
        _small_ok(c)


@pytest.mark.e2e
def test_stalled_streams_are_cancelled_after_send_timeout(serve: Any) -> None:
    # The send timeout is set per phase, so that no phase depends on how fast this machine
    # runs: long while the stalled readers take their first message (a starved reader must
    # not be cancelled before it stalls), short once they hold their slots, long again for
    # the reader that keeps reading.
    srv, address = serve(max_calls=2, send_timeout=600, chunk_bytes=64 << 10)
    assert srv.service is not None
    dog, gate = srv.service.watchdog, srv.service.gate
    with _channel(address) as a, _channel(address) as b, \
            _channel(address) as c:
        stalled = [_stall(a), _stall(b)]
        assert gate.active == 2
        dog.timeout = 0.5  # the stalled readers have taken one message each and stopped
        assert _until(lambda: dog.cancelled >= 2, 120)
        assert _until(lambda: gate.active == 0, 120)
        dog.timeout = 600
        _small_ok(c)  # slots and threads are free again
        for call in stalled:
            code, _ = _code(lambda call=call: list(call))
            assert code == grpc.StatusCode.CANCELLED
        # A reader that keeps reading is not cancelled: the timeout is per message.
        frames = list(_stream(c, "Slice")(_whole("big"), timeout=600))
        data = b"".join(bytes(decode_chunk(f)) for f in frames)
        assert torch.equal(safetensors.torch.load(data)["values"], BIG)
        assert dog.cancelled == 2


@pytest.mark.unit
def test_watchdog_cancels_only_messages_waiting_past_the_timeout() -> None:
    now = [0.0]
    dog = StreamWatchdog(2.0, clock=lambda: now[0])
    cancelled: list[str] = []
    dog.sending("slow", lambda: cancelled.append("slow"))
    dog.sending("quick", lambda: cancelled.append("quick"))
    now[0] = 1.5
    dog.sent("quick")  # its reader took the message
    dog.sending("quick", lambda: cancelled.append("quick"))
    assert dog.check() == 0
    now[0] = 2.5
    assert dog.check() == 1 and cancelled == ["slow"]
    now[0] = 10.0
    dog.done("quick")
    assert dog.check() == 0 and cancelled == ["slow"]


@pytest.mark.unit
def test_call_gate_lets_a_call_wait_for_a_slot() -> None:
    gate = CallGate(1, "max_calls", wait=30)
    gate.enter()
    entered = threading.Event()

    def second() -> None:
        gate.enter()
        entered.set()

    t = threading.Thread(target=second)
    t.start()
    assert _until(lambda: gate.waiting == 1)
    assert not entered.is_set()
    gate.leave()  # the slot goes to the waiting call
    t.join(10)
    assert entered.is_set() and gate.active == 1 and gate.refused == 0
    full = CallGate(1, wait=0.05)
    full.enter()
    with pytest.raises(ServerUnavailable):
        full.enter()  # waited for a slot that did not come
    assert full.refused == 1 and full.waiting == 0


@pytest.mark.unit
def test_call_gate_bounds_the_waiting_calls() -> None:
    gate = CallGate(1, wait=30)
    gate.enter()
    waiter = threading.Thread(target=gate.enter)
    waiter.start()
    assert _until(lambda: gate.waiting == 1)
    with pytest.raises(ServerUnavailable):
        gate.enter()  # one running, one waiting: the limit; refused at once
    gate.leave()
    waiter.join(10)
    assert gate.active == 1 and gate.refused == 1


@pytest.mark.unit
def test_call_gate_counts_and_refuses() -> None:
    gate = CallGate(1, "max_calls")
    gate.enter()
    with pytest.raises(ServerUnavailable, match=re.escape(
            "server busy: 1 calls in progress, the limit of 1 (max_calls); retry shortly")):
        gate.enter()
    gate.leave()
    gate.enter()
    assert gate.active == 1 and gate.refused == 1


# ------------------------------------------------------------------ materialised bytes


@pytest.mark.unit
def test_byte_budget_refuses_too_large_and_busy() -> None:
    budget = ByteBudget(1000, "max_materialized_bytes")
    with pytest.raises(ResultTooLarge, match=re.escape(
            "a gather needs 1001 bytes in memory at once, more than the server's limit of "
            "1000 bytes (max_materialized_bytes)")):
        budget.hold().add(1001, "a gather")
    a = budget.hold()
    a.add(600, "a")
    b = budget.hold()
    with pytest.raises(ServerUnavailable, match=re.escape(
            "server busy: b needs 600 bytes in memory and other calls hold 600 of the 1000 "
            "bytes allowed (max_materialized_bytes); retry shortly")):
        b.add(600, "b")
    a.release()
    a.release()  # once only
    b.add(600, "b")
    assert budget.used == 600
    b.drop(100)
    b.release()
    assert budget.used == 0 and budget.peak == 600


def _gather_request() -> pb.SliceRequest:
    """BIG[a, b] with a (512, 1) and b (1, 512): a 1 MiB result from two small lists."""
    rows = pb.Indices(values=list(range(512)), shape=[512, 1])
    cols = pb.Indices(values=list(range(512)), shape=[1, 512])
    return pb.SliceRequest(tensor="big", combine=pb.VECTORIZED,
                           selectors=[pb.Selector(indices=rows), pb.Selector(indices=cols)])


@pytest.mark.e2e
def test_materialized_budget_refuses_gathers_beyond_it_views_still_served(serve: Any) -> None:
    srv, address = serve(max_materialized_bytes=512 << 10, unary_max_bytes=64 << 20)
    with _channel(address) as ch:
        code, details = _code(lambda: _unary(ch, "Fetch")(_gather_request(), timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == (
            "the result of 'big' needs 1048576 bytes in memory at once, more than the "
            "server's limit of 524288 bytes (max_materialized_bytes, serve "
            "--max-materialized-bytes)")
        # A 32 MiB view streams from the tensor's memory: nothing materialised.
        frame = _unary(ch, "Fetch")(_whole("big"), timeout=30)
        assert torch.equal(safetensors.torch.load(bytes(decode_chunk(frame)))["values"], BIG)
        assert srv.service is not None and srv.service.calls.budget.used == 0


@pytest.mark.e2e
def test_materialized_budget_busy_then_served(serve: Any) -> None:
    srv, address = serve(max_materialized_bytes=2 << 20, unary_max_bytes=64 << 20)
    assert srv.service is not None
    other = srv.service.calls.budget.hold()
    other.add(1536 << 10, "another call")
    with _channel(address) as ch:
        code, details = _code(lambda: _unary(ch, "Fetch")(_gather_request(), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details.startswith("server busy: the result of 'big' needs 1048576 bytes")
        other.release()
        frame = _unary(ch, "Fetch")(_gather_request(), timeout=10)
        got = safetensors.torch.load(bytes(decode_chunk(frame)))["values"]
        assert torch.equal(got, BIG[:512, :512])
    assert srv.service.calls.budget.used == 0 and srv.service.calls.budget.peak >= 1 << 20


class _Recorder:
    def __init__(self) -> None:
        self.added: list[tuple[int, str]] = []
        self.dropped = 0

    def add(self, nbytes: int, what: str) -> None:
        self.added.append((nbytes, what))

    def drop(self, nbytes: int) -> None:
        self.dropped += nbytes


@pytest.mark.unit
def test_threshold_result_checked_against_limit_before_it_is_gathered() -> None:
    x = torch.randn(4, 64, 32)
    meta = TensorMeta("t", tuple(x.shape), x.dtype)
    sel = Selection((Range(), Threshold("mean", ">", -10.0, "any")), Combine.OUTER, None, 0)
    p = plan(meta, sel, limit=4096)  # every channel passes: 32 KiB of values
    rec = _Recorder()
    with pytest.raises(ResultTooLarge, match=re.escape(
            "result of 33280 bytes (values shape [4, 64, 32], float32) exceeds the limit "
            "of 4096 bytes")):
        execute(p, x, rec)
    assert not any("result" in what for _, what in rec.added)  # nothing gathered
    ok = plan(meta, sel, limit=1 << 20)
    rec = _Recorder()
    out = execute(ok, x, rec)
    assert [what for _, what in rec.added][-1] == "the result of a threshold on 't'"
    assert rec.added[-1][0] == out[0].nbytes + out[1].nbytes


@pytest.mark.unit
def test_gather_reserves_its_result_before_building_it() -> None:
    x = torch.randn(64, 64)
    meta = TensorMeta("t", tuple(x.shape), x.dtype)
    a, b = torch.arange(16).reshape(16, 1), torch.arange(16).reshape(1, 16)
    p = plan(meta, Selection((Indices(a), Indices(b)), Combine.VECTORIZED, None, 0))
    rec = _Recorder()
    execute(p, x, rec)
    assert rec.added == [(16 * 16 * 4, "the result of 't'")]
    view = plan(meta, Selection((Range(0, 8),), Combine.OUTER, None, 0))
    rec = _Recorder()
    execute(view, x, rec)
    assert rec.added == [(0, "the result of 't'")]


@pytest.mark.unit
def test_default_result_limit_fits_the_machine() -> None:
    from tensorslice.server._limits import machine_memory

    config = ServerConfig()
    assert 0 < config.max_result_bytes <= machine_memory() // 4
    assert config.max_result_bytes <= config.max_materialized_bytes < machine_memory()
    assert config.max_ticket_bytes < config.max_materialized_bytes
    assert config.max_calls >= 8 and config.max_request_bytes <= 64 << 20


# ------------------------------------------------------------------ tickets


def _ticket(ch: grpc.Channel, request: pb.SliceRequest) -> pb.BulkTicket:
    request.bulk = True
    chunk = pb.SliceChunk.FromString(_unary(ch, "Fetch")(request, timeout=10))
    assert chunk.HasField("ticket")
    return chunk.ticket


def _redeem(port: int, token: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(token)
        out = bytearray()
        while part := s.recv(1 << 20):
            out += part
        return bytes(out)


@pytest.mark.e2e
def test_pending_tickets_bounded_in_count(serve: Any) -> None:
    _, address = serve(max_pending_tickets=3, unary_max_bytes=1024)
    with _channel(address) as ch:
        tickets = [_ticket(ch, _whole("big")) for _ in range(3)]
        code, details = _code(lambda: _ticket(ch, _whole("big")))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details == ("server busy: 3 bulk tickets await redemption, the limit of 3 "
                           "(max_pending_tickets, serve --max-pending-tickets); retry shortly")
        _small_ok(ch)  # small results are inline: no ticket needed
        data = _redeem(tickets[0].port, tickets[0].token)
        assert torch.equal(safetensors.torch.load(data)["values"], BIG)
        _ticket(ch, _whole("big"))  # room again


@pytest.mark.e2e
def test_pending_tickets_bounded_in_bytes_and_expiry_gives_them_back(serve: Any) -> None:
    srv, address = serve(max_ticket_bytes=(1 << 20) + 1000, unary_max_bytes=1024,
                         ticket_timeout=0.5)
    assert srv.service is not None and srv.bulk is not None
    with _channel(address) as ch:
        _ticket(ch, _gather_request())  # 1 MiB materialised, held by its ticket
        assert srv.service.calls.budget.used >= 1 << 20
        peak = srv.service.calls.budget.peak
        code, details = _code(lambda: _ticket(ch, _gather_request()))
        assert code == grpc.StatusCode.UNAVAILABLE
        assert "(max_ticket_bytes, serve --max-ticket-bytes); retry shortly" in details
        assert srv.service.calls.budget.peak == peak  # refused before building anything
        _ticket(ch, _whole("big"))  # a view holds nothing: still offered
        assert _until(lambda: srv.bulk.pending == 0)  # type: ignore[union-attr]
        assert srv.service.calls.budget.used == 0 and srv.bulk.held_bytes == 0
        t = _ticket(ch, _gather_request())
        assert torch.equal(safetensors.torch.load(_redeem(t.port, t.token))["values"],
                           BIG[:512, :512])
    assert _until(lambda: srv.service.calls.budget.used == 0)  # type: ignore[union-attr]


# ------------------------------------------------------------------ bulk connections


@pytest.mark.e2e
def test_idle_bulk_connections_bounded_without_threads() -> None:
    bulk = BulkServer("127.0.0.1", 0, max_connections=8, handshake_timeout=30).start()
    idle: list[socket.socket] = []
    try:
        threads = threading.active_count()
        for _ in range(200):
            idle.append(socket.create_connection(("127.0.0.1", bulk.port), timeout=10))
        assert _until(lambda: bulk.refused >= 192)
        assert bulk.connections == 8
        assert threading.active_count() <= threads  # handshakes have no threads
        closed = 0
        for s in idle:  # the refused ones read end-of-stream
            s.settimeout(0.01)
            try:
                closed += s.recv(1) == b""
            except TimeoutError:
                pass
        assert closed == 192
    finally:
        for s in idle:
            s.close()
        bulk.stop()


@pytest.mark.e2e
def test_handshake_deadline_is_whole_not_per_read() -> None:
    bulk = BulkServer("127.0.0.1", 0, handshake_timeout=0.5).start()
    try:
        token = bulk.offer([b"payload"], 7)
        with socket.create_connection(("127.0.0.1", bulk.port), timeout=10) as s:
            sent = 0
            try:
                for byte in token:  # one byte every 0.2 s: each read is quick
                    s.sendall(bytes([byte]))
                    sent += 1
                    time.sleep(0.2)
            except OSError:  # the server closed the connection at its deadline
                pass
        assert sent < TOKEN_BYTES
        assert bulk.refused == 1 and bulk.sent == 0
        assert _redeem(bulk.port, token) == b"payload"  # the ticket outlives a slow reader
    finally:
        bulk.stop()


@pytest.mark.e2e
def test_normal_bulk_clients_served_beside_idle_ones() -> None:
    bulk = BulkServer("127.0.0.1", 0, max_connections=8, handshake_timeout=30).start()
    idle = [socket.create_connection(("127.0.0.1", bulk.port), timeout=10) for _ in range(4)]
    try:
        for i in range(10):
            token = bulk.offer([b"x" * i], i)
            assert _redeem(bulk.port, token) == b"x" * i
        assert bulk.sent == 10
    finally:
        for s in idle:
            s.close()
        bulk.stop()


@pytest.mark.e2e
def test_bad_tokens_do_not_log_a_warning_each(caplog: pytest.LogCaptureFixture) -> None:
    bulk = BulkServer("127.0.0.1", 0).start()
    try:
        with caplog.at_level(logging.INFO, logger="tensorslice.server"):
            for _ in range(30):
                assert _redeem(bulk.port, b"\1" * TOKEN_BYTES) == b""
            assert _until(lambda: bulk.refused == 30)
        loud = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(loud) <= 1
    finally:
        bulk.stop()


@pytest.mark.e2e
def test_stop_lets_transfers_in_flight_and_pending_tickets_finish() -> None:
    bulk = BulkServer("127.0.0.1", 0).start()
    gate = threading.Event()

    def slow() -> Iterator[bytes]:
        yield b"a" * 1000
        gate.wait(10)
        yield b"b" * 1000

    running = bulk.offer(slow(), 2000)
    pending = bulk.offer([b"later"], 5)
    s = socket.create_connection(("127.0.0.1", bulk.port), timeout=10)
    s.sendall(running)
    first = s.recv(1000)
    stopper = threading.Thread(target=bulk.stop, args=(10,))
    stopper.start()
    with pytest.raises(ServerUnavailable, match="shutting down"):
        bulk.offer([b"new"], 3)
    assert _redeem(bulk.port, pending) == b"later"  # issued before the stop: redeemable
    gate.set()
    rest = bytearray(first)
    while part := s.recv(1 << 16):
        rest += part
    s.close()
    assert bytes(rest) == b"a" * 1000 + b"b" * 1000
    stopper.join(10)
    assert not stopper.is_alive() and bulk.sent == 2


@pytest.mark.e2e
def test_stop_grants_the_grace_period_to_tickets_issued() -> None:
    srv, address = _start(unary_max_bytes=1024)
    with _channel(address) as ch:
        ticket = _ticket(ch, _whole("big"))
    done = srv.stop(grace=30)
    assert not done.wait(0.5)  # a ticket is pending: the bulk plane still serves it
    data = _redeem(ticket.port, ticket.token)
    assert torch.equal(safetensors.torch.load(data)["values"], BIG)
    assert done.wait(30)
    assert srv.bulk is not None and srv.bulk.sent == 1


# ------------------------------------------------------------------ requests, ports


@pytest.mark.e2e
def test_request_size_bounded_and_next_request_served(serve: Any) -> None:
    _, address = serve(max_request_bytes=64 << 10)
    big = pb.SliceRequest(tensor="big", selectors=[
        pb.Selector(indices=pb.Indices(values=list(range(8192)) * 16))])
    with _channel(address) as ch:
        code, _ = _code(lambda: _unary(ch, "Fetch")(big, timeout=10))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        _small_ok(ch)


@pytest.mark.unit
def test_index_lists_beyond_the_result_limit_refused_before_conversion() -> None:
    from tensorslice.server._orchestrate import Calls

    store = TensorStore()
    store.add("small", SMALL)
    calls = Calls(store, ServerConfig(max_result_bytes=1000))
    many = pb.SliceRequest(tensor="small", selectors=[
        pb.Selector(indices=pb.Indices(values=[1] * 300))])
    with pytest.raises(ResultTooLarge, match=re.escape(
            "selector 0: an index list of 300 positions makes a result of at least 1200 "
            "bytes, more than the limit of 1000 bytes")):
        calls.plan(many)
    few = pb.SliceRequest(tensor="small", selectors=[
        pb.Selector(indices=pb.Indices(values=[1] * 20))])
    assert calls.plan(few)[1].result_shape == (20, 8)


@pytest.mark.unit
def test_request_masks_decode_to_one_byte_bools() -> None:
    from tensorslice.core.selection import Mask, selection_from_proto

    bits = bytes([1, 0] * 50_000)
    req = pb.SliceRequest(tensor="t", selectors=[pb.Selector(mask=pb.Mask(values=bits))])
    mask = selection_from_proto(req).selectors[0]
    assert isinstance(mask, Mask) and mask.values.dtype == torch.bool
    assert int(mask.values.sum()) == 50_000
    assert mask.values.untyped_storage().nbytes() == len(bits)  # one byte each, no widening


@pytest.mark.e2e
def test_second_server_on_a_busy_port_raises_address_in_use(serve: Any) -> None:
    srv, address = serve()
    store = TensorStore()
    store.add("small", SMALL)
    with pytest.raises(AddressInUse, match=re.escape(f"cannot listen on {address} (gRPC)")):
        create_server(store, address)
    assert srv.bulk is not None
    with pytest.raises(AddressInUse, match=re.escape(
            f"cannot listen on 127.0.0.1:{srv.bulk.port} (bulk data plane)")):
        create_server(store, "127.0.0.1:0", ServerConfig(bulk_port=srv.bulk.port))


# ------------------------------------------------------------------ the slab pool


def _pool_bytes(pool: Any) -> int:
    """Bytes of the free buffers the pool lists, counted from its lists."""
    return sum(b.numel() for bufs in pool._free.values() for b in bufs)


@pytest.mark.unit
def test_slab_pool_never_keeps_more_than_its_byte_cap() -> None:
    from tensorslice.server._payload import POOL_MAX_BYTES, BufferPool

    cpu = torch.device("cpu")
    pool = BufferPool(max_cached=4, max_bytes=10_000)
    # Sizes that differ call after call (row gathers of every row width) never pile up.
    for size in [*range(1000, 4000, 7), 10_001, 9_999]:
        bufs = [pool.acquire(size, cpu) for _ in range(3)]
        for b in bufs:
            pool.release(b)
            assert pool.held_bytes == _pool_bytes(pool) <= 10_000
    assert pool.held_bytes == 9_999  # a buffer as large as the cap leaves room for no other
    pool.release(pool.acquire(1, cpu))
    assert pool.held_bytes == _pool_bytes(pool) == 9_999 + 1  # the last given back are kept
    # A kept buffer leaves the pool when handed out: never two holders at once.
    a = pool.acquire(9_999, cpu)
    b = pool.acquire(9_999, cpu)
    assert a.data_ptr() != b.data_ptr() and pool.held_bytes == _pool_bytes(pool) == 1
    before = pool.allocations
    pool.release(a)
    assert pool.acquire(9_999, cpu) is a and pool.allocations == before  # reused
    assert BufferPool().max_bytes == POOL_MAX_BYTES


# ------------------------------------------------------------------ parse cost


@pytest.mark.e2e
def test_parse_cost_reserved_before_parsing_and_small_clients_served(serve: Any) -> None:
    from tensorslice.server._service import PARSE_COST

    n = 1 << 20  # one-byte index values: the costliest request to parse, per byte
    bad = pb.SliceRequest(tensor="big", selectors=[
        pb.Selector(indices=pb.Indices(values=[1] * n, shape=[n + 1]))])
    size = bad.ByteSize()
    limit = PARSE_COST * size * 3 // 2  # room for one such request, and small ones beside
    srv, address = serve(max_materialized_bytes=limit, max_request_bytes=4 * size,
                         max_calls=16)
    assert srv.service is not None
    budget = srv.service.calls.budget
    answers: list[tuple[grpc.StatusCode, str]] = []
    small_ok: list[bool] = []
    small_failed: list[BaseException] = []
    flooding = threading.Event()
    flooding.set()

    def flood(ch: grpc.Channel) -> None:
        for _ in range(4):
            answers.append(_code(lambda: _unary(ch, "Fetch")(bad, timeout=120)))

    def small(ch: grpc.Channel) -> None:
        try:
            while flooding.is_set():
                _small_ok(ch)
                small_ok.append(True)
        except BaseException as exc:
            small_failed.append(exc)

    with _channel(address) as a, _channel(address) as b, _channel(address) as c:
        floods = [threading.Thread(target=flood, args=(ch,)) for ch in (a, b) * 4]
        normal = threading.Thread(target=small, args=(c,))
        normal.start()
        for t in floods:
            t.start()
        for t in floods:
            t.join(300)
        flooding.clear()
        normal.join(60)
        whole = pb.SliceRequest(tensor="big", selectors=[
            pb.Selector(indices=pb.Indices(values=[1] * (2 * n)))])
        code, details = _code(lambda: _unary(c, "Fetch")(whole, timeout=60))
    busy = (f"server busy: parsing a tensorslice.v1.SliceRequest of {size} bytes "
            f"({PARSE_COST} bytes per byte) needs {PARSE_COST * size} bytes in memory and "
            f"other calls hold ")
    assert len(answers) == 32
    assert {k for k, _ in answers} <= {grpc.StatusCode.INVALID_ARGUMENT,
                                       grpc.StatusCode.UNAVAILABLE}
    refused = [d for k, d in answers if k == grpc.StatusCode.UNAVAILABLE]
    assert refused, "eight clients at once, room for one: some must be refused"
    for d in refused:
        assert d.startswith(busy) and d.endswith(
            f" of the {limit} bytes allowed (max_materialized_bytes, serve "
            f"--max-materialized-bytes); retry shortly"), d
    assert small_ok and not small_failed and not normal.is_alive()  # served all along
    assert budget.peak <= limit and budget.used == 0
    # A request whose parse alone exceeds the budget: RESOURCE_EXHAUSTED, naming the limit.
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details == (f"parsing a tensorslice.v1.SliceRequest of {whole.ByteSize()} bytes "
                       f"({PARSE_COST} bytes per byte) needs {PARSE_COST * whole.ByteSize()} "
                       f"bytes in memory at once, more than the server's limit of {limit} "
                       f"bytes (max_materialized_bytes, serve --max-materialized-bytes)")
