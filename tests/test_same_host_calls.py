"""Same-host calls: a server's instance id (announced, in tickets, in every session's
greeting) keeps a client's sessions with the server it calls; once it has one, a client
makes its reads (Fetch, FetchMany, Describe, List, Explain) over sessions, small answers
inline on the session's socket, large ones in segments, with gRPC's errors and deadlines."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from samehost import start

from tensorslice.client import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    TensorNotFound,
    Unauthenticated,
    VersionGone,
)
from tensorslice.client._shm import MAX_SESSIONS
from tensorslice.core.codec import (
    INSTANCE_BYTES,
    INSTANCE_KEY,
    SESSION_MAGIC,
    SHM_HELLO,
    SHM_RELEASE,
    SHM_REQUEST,
    same_host_socket,
)

X = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(31))  # 2 MiB
ROW = 32 * 16 * 16 * 4  # 32 KiB: a row is a small result, 40 rows a large one
TOKEN = "same-host-calls"


def _server(**config: Any) -> tuple[Any, str]:
    return start(tensor=X, **config)


@pytest.fixture()
def served() -> Iterator[tuple[Any, str]]:
    srv, address = _server(metrics_port=0)
    yield srv, address
    srv.stop(grace=None).wait(10)


def _plane(c: Client) -> tuple[int, bytes]:
    ((_, port), instance), = c._announced.items()
    return port, instance


@pytest.mark.e2e
def test_the_instance_id_is_announced_and_greets_every_session(
    served: tuple[Any, str],
) -> None:
    srv, address = served
    bulk = srv.bulk
    assert len(bulk.instance) == INSTANCE_BYTES
    other, _ = _server()
    try:
        assert other.bulk.instance != bulk.instance  # random, per server
    finally:
        other.stop(grace=None).wait(10)
    with Client(address, timeout=30) as c:
        c.list_tensors()
        assert _plane(c) == (bulk.port, bulk.instance)
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/tensorslice.v1.TensorSlice/DescribeTensor")
        from tensorslice.v1 import tensorslice_pb2 as pb

        _, done = call.with_call(pb.DescribeTensorRequest(name="x").SerializeToString(),
                                 timeout=30)
        assert dict(done.trailing_metadata())[INSTANCE_KEY] == bulk.instance.hex()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(same_host_socket(bulk.port))
        sock.sendall(SESSION_MAGIC)
        greeting = sock.recv(len(SHM_HELLO) + INSTANCE_BYTES, socket.MSG_WAITALL)
        assert greeting == SHM_HELLO + bulk.instance


@pytest.mark.e2e
def test_tickets_name_their_server_s_instance() -> None:
    srv, address = _server(unary_max_bytes=1024)
    try:
        with Client(address, timeout=30, same_host=False) as c:
            from tensorslice.client._base import ReceiveBulk

            seen: list[bytes] = []
            perform = c._perform

            def spy(step: Any) -> Any:
                if isinstance(step, ReceiveBulk):
                    seen.append(step.instance)
                return perform(step)

            c._perform = spy  # type: ignore[method-assign]
            assert c.slice("x", (slice(0, 40),))["values"].equal(X[0:40])
            assert seen == [srv.bulk.instance] and c.last_transport == "bulk"
    finally:
        srv.stop(grace=None).wait(10)


@pytest.mark.e2e
def test_a_session_greeting_another_instance_is_never_used(served: tuple[Any, str]) -> None:
    """As if another server on this host answered at the port's name: the client's expected
    id is not the one the name's server greets with. No session: gRPC and TCP, right data."""
    srv, address = served
    shm = srv.bulk.shm
    with Client(address, timeout=30) as c:
        c.list_tensors()
        port, instance = _plane(c)
        c._announced[("127.0.0.1", port)] = bytes(INSTANCE_BYTES)  # another server's id
        assert c.slice("x", (slice(0, 1),))["values"].equal(X[0:1])
        assert c.last_transport == "inline" and shm.inline == 0
        assert not c._shm.usable(port, bytes(INSTANCE_BYTES))  # never tried again
        # a ticket names the server's own instance: its session greets with it
        assert c.slice("x", (slice(0, 40),))["values"].equal(X[0:40])
        assert c.last_transport == "shared_memory" and c.transports["session"] == 0
        # a describe (over gRPC: no session for that id) announces the real id again
        assert c.tensor("x")[3:4].equal(X[3:4]) and c.last_transport == "session"
        assert _plane(c) == (port, instance)
    assert shm.inline == 1


@pytest.mark.e2e
def test_a_foreign_listener_at_the_name_gets_no_call() -> None:
    """Another program (or an older server) holds the port's same-host name and greets
    with an id other than the server's: the client's calls and tickets go over gRPC and
    TCP, and nothing is ever read from the impostor."""
    srv, address = _server(same_host=False, unary_max_bytes=1024)
    bulk = srv.bulk
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(same_host_socket(bulk.port))
    listener.listen(8)
    listener.settimeout(30)
    asked: list[bytes] = []

    def impostor() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            conn.recv(len(SESSION_MAGIC), socket.MSG_WAITALL)
            conn.sendall(SHM_HELLO + b"\x01" * INSTANCE_BYTES)
            asked.append(conn.recv(64))  # a client that used the session would send

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    try:
        with Client(address, timeout=30) as c:
            c._announced[("127.0.0.1", bulk.port)] = bulk.instance
            assert c.tensor("x")[0:40].equal(X[0:40])
            assert c.tensor("x")[2:3].equal(X[2:3])
            assert c.transports["bulk"] == 2 and c.transports["session"] == 0
            assert c.transports["shared_memory"] == 0
            assert not c._shm.usable(bulk.port, bulk.instance)  # tried once only
        thread.join(timeout=30)
        assert asked == [b""]  # greeted, then closed unused
    finally:
        listener.close()
        srv.stop(grace=None).wait(10)


@pytest.mark.e2e
def test_small_calls_go_over_a_session_and_large_ones_in_segments(
    served: tuple[Any, str],
) -> None:
    srv, address = served
    shm = srv.bulk.shm
    with Client(address, timeout=30) as c:
        t = c.tensor("x")  # gRPC: learns the port and the instance
        assert c.transports["session"] == 0
        assert t[5:6].equal(X[5:6]) and c.last_transport == "session"
        assert t[5:6].equal(X[5:6])  # again: the answer cache serves it
        assert c.slice_many({"a": ("x", (slice(1, 2),)), "b": ("x", (3, 0))})["b"].equal(X[3, 0])
        assert c.transports["session"] == 3 and c.transports["inline"] == 0
        assert t[0:40].equal(X[0:40]) and c.last_transport == "shared_memory"
        assert [i.name for i in c.list_tensors()] == ["x"]
        assert c.describe("x").shape == (64, 32, 16, 16)
        assert c.explain("x", (slice(0, 2),)).result_nbytes == 2 * ROW
        assert c.transports["inline"] == 0 and c.transports["bulk"] == 0
        assert shm.inline >= 6 and shm.lent == 1
    assert srv.service.calls.answers.hits >= 1


CASES: list[tuple[Any, torch.Tensor]] = [
    ((slice(0, 40),), X[0:40]),  # contiguous view, in a segment
    ((slice(None), slice(3, 20)), X[:, 3:20]),  # strided copy, in a segment
    (([5, 1, 9, 9], slice(None), 3), X[[5, 1, 9, 9], :, 3]),  # gather, on the socket
    ((slice(None, None, -3), [0, 31]), X.flip(0)[::3][:, [0, 31]]),
    ((0, 0, 0, 0), X[0, 0, 0, 0]),  # scalar
    ((slice(5, 5),), X[5:5]),  # empty
]


@pytest.mark.e2e
def test_results_over_a_session_are_the_local_ones(served: tuple[Any, str]) -> None:
    _, address = served
    with Client(address, timeout=30) as c, Client(address, timeout=30, same_host=False) as tcp:
        t, far = c.tensor("x"), tcp.tensor("x")
        for index, local in CASES:
            got = t[index]
            assert got.shape == local.shape and torch.equal(got, local)
            assert c.last_transport == ("shared_memory" if local.nbytes > 64 << 10
                                        else "session")
            assert torch.equal(far[index], local)
        assert tcp.transports["session"] == tcp.transports["shared_memory"] == 0


@pytest.mark.e2e
def test_errors_and_the_token_as_over_grpc() -> None:
    srv, address = _server(token=TOKEN)
    try:
        with Client(address, timeout=30, token=TOKEN) as c:
            t = c.tensor("x")
            with pytest.raises(TensorNotFound, match="no tensor named 'nope'"):
                c.describe("nope")
            c.put("v", torch.zeros(3))
            pinned = c.tensor("v").at_version()
            c.put("v", torch.ones(3), replace=True)
            with pytest.raises(VersionGone, match="is gone"):
                pinned[0:1]
            assert t[1:2].equal(X[1:2]) and c.last_transport == "session"
            port, instance = _plane(c)
        with Client(address, timeout=30, token="wrong") as bad:
            bad._announced[("127.0.0.1", port)] = instance  # as if learned
            with pytest.raises(Unauthenticated):
                bad.describe("x")
            with pytest.raises(Unauthenticated):
                bad.slice("x", (slice(0, 1),))
            assert bad._shm.usable(port, instance)  # the session served: its answer stands
    finally:
        srv.stop(grace=None).wait(10)


@pytest.mark.e2e
def test_a_session_that_does_not_answer_meets_the_deadline() -> None:
    """A session greets as the server would, then never answers: the call's deadline
    holds (DeadlineExceeded), as on gRPC."""
    srv, address = _server(same_host=False)
    bulk = srv.bulk
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(same_host_socket(bulk.port))
    listener.listen(1)
    listener.settimeout(30)
    done = threading.Event()

    def silent() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.recv(len(SESSION_MAGIC), socket.MSG_WAITALL)
            conn.sendall(SHM_HELLO + bulk.instance)
            conn.recv(SHM_REQUEST.size + SHM_RELEASE.size)
            done.wait(30)

    thread = threading.Thread(target=silent, daemon=True)
    thread.start()
    try:
        with Client(address, timeout=30) as c:
            c.list_tensors()
            with pytest.raises(DeadlineExceeded):
                c.describe("x", timeout=0.5)
    finally:
        done.set()
        listener.close()
        thread.join(timeout=30)
        srv.stop(grace=None).wait(10)


@pytest.mark.e2e
def test_threads_share_a_bounded_pool_of_sessions(served: tuple[Any, str]) -> None:
    srv, address = served
    errors: list[str] = []
    with Client(address, timeout=30) as c:
        t = c.tensor("x")

        def reader(k: int) -> None:
            for i in range(20):
                row = (k * 7 + i) % 64
                if not t[row : row + 1].equal(X[row : row + 1]):
                    errors.append(f"row {row}")

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=120)
        assert not errors
        key = _plane(c)
        assert 1 <= c._shm._open[key] <= MAX_SESSIONS
        assert len(c._shm._idle[key]) == c._shm._open[key]  # all back, none lost
        assert c.transports["session"] + c.transports["inline"] == 12 * 20
        assert srv.bulk.shm.sessions <= MAX_SESSIONS


@pytest.mark.e2e
def test_off_by_option_or_environment(served: tuple[Any, str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    srv, address = served
    with Client(address, timeout=30, same_host=False) as c:
        assert c.tensor("x")[0:1].equal(X[0:1]) and c.last_transport == "inline"
    monkeypatch.setenv("TENSORSLICE_SAME_HOST", "0")
    with Client(address, timeout=30) as c:
        assert c.tensor("x")[0:1].equal(X[0:1]) and c.last_transport == "inline"
    assert srv.bulk.shm.sessions == 0 and srv.bulk.shm.inline == 0


@pytest.mark.e2e
def test_async_client_calls_over_sessions(served: tuple[Any, str]) -> None:
    _, address = served

    async def main() -> None:
        async with AsyncClient(address, timeout=30) as c:
            t = await c.tensor("x")
            got = await asyncio.gather(*(t[i : i + 1] for i in range(8)))
            assert all(g.equal(X[i : i + 1]) for i, g in enumerate(got))
            assert c.transports["session"] == 8
            with pytest.raises(TensorNotFound):
                await c.describe("nope")

    asyncio.run(main())


@pytest.mark.e2e
def test_session_calls_are_counted_in_the_metrics(served: tuple[Any, str]) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    srv, address = served

    def fetched() -> float:
        url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if (s.name == "tensorslice_grpc_server_handled_total"
                        and s.labels.get("grpc_method") == "Fetch"
                        and s.labels.get("grpc_code") == "OK"):
                    return float(s.value)
        return 0.0

    with Client(address, timeout=30) as c:
        t = c.tensor("x")
        before = fetched()
        for i in range(3):
            assert t[i : i + 1].equal(X[i : i + 1])
        assert c.transports["session"] == 3
    # a call is counted once its answer is sent: the client may have read it just before
    deadline = time.monotonic() + 10
    while fetched() - before < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fetched() - before == 3


@pytest.mark.e2e
def test_a_plane_that_refuses_a_session_is_tried_again_later(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plane that closes before its greeting (its bound of sessions, another user) is
    not tried again for `RETRY_SECONDS`, then is; one with no socket at the name (another
    host) or greeting as another instance is never tried again."""
    from tensorslice.client import _shm

    now = [1000.0]
    monkeypatch.setattr(_shm, "_clock", lambda: now[0])
    name_port = 1 + (os.getpid() % 20000) + 40000  # a name nobody else binds in this test
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(same_host_socket(name_port))
    listener.listen(8)
    try:
        sessions = _shm.Sessions()
        instance = b"\x07" * INSTANCE_BYTES
        closer = threading.Thread(target=lambda: listener.accept()[0].close(), daemon=True)
        closer.start()
        assert sessions.call(name_port, instance, b"", "ListTensors", b"", None, 5, 5) is None
        closer.join(timeout=30)
        assert not sessions.usable(name_port, instance) and sessions.available
        now[0] += _shm.RETRY_SECONDS
        assert sessions.usable(name_port, instance)  # tried again: it may have room now
        assert not sessions.usable(name_port, b"")  # a plane that names no instance: never
    finally:
        listener.close()
    # no socket at the name any more: as on another host, never tried again
    assert sessions.call(name_port, instance, b"", "ListTensors", b"", None, 5, 5) is None
    now[0] += 10 * _shm.RETRY_SECONDS
    assert not sessions.usable(name_port, instance) and not sessions.available


@pytest.mark.unit
def test_an_announced_instance_that_is_not_hex_gives_no_session() -> None:
    c = Client("127.0.0.1:1", timeout=1)
    c._note_port((("tensorslice-data-port", "4242"), (INSTANCE_KEY, "not hex")))
    assert c._announced == {("127.0.0.1", 4242): b""}
    assert c._session_plane() is None
    c._note_port((("tensorslice-data-port", "4242"), (INSTANCE_KEY, "ab" * 16)))
    assert c._session_plane() == (4242, b"\xab" * 16)
    c.close()
