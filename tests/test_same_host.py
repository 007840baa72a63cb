"""Same-host results: pooled shared-memory segments (memfd) lent over a session on the bulk
plane's abstract Unix socket, reused once the client released them; every fallback."""

from __future__ import annotations

import asyncio
import gc
import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
import torch
from samehost import X, child, session, start, until

from tensorslice.client import AsyncClient, Client, TensorSliceError
from tensorslice.core.codec import (
    SHM_HELLO,
    SHM_RELEASE,
    SHM_REPLY,
    SHM_REQUEST,
    SHM_SEGMENT,
    same_host_socket,
)

SEGMENT = "memfd:tensorslice-segment"


def _server(port: int = 0, **config: object) -> tuple[object, str]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return start(port, device=device, **({"unary_max_bytes": 1024} | config))


@pytest.fixture()
def served() -> Iterator[tuple[object, str]]:
    srv, address = _server()
    yield srv, address
    srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


def _mapped() -> int:
    with open("/proc/self/maps") as f:
        return sum(SEGMENT in line for line in f)


def _open_segments() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(f"/{SEGMENT}")
        except OSError:
            pass
    return count


@pytest.mark.e2e
def test_segments_are_pooled_and_reused_only_once_released(
    served: tuple[object, str],
) -> None:
    srv, address = served
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    assert shm is not None
    with Client(address, timeout=30) as c:  # on by default
        a = c.tensor("x")[0:40]
        b = c.tensor("x")[[5, 1, 9, 9]]  # 128 KiB: over the session's inline bound
        assert a.equal(X[0:40]) and b.equal(X[[5, 1, 9, 9]])
        assert c.last_transport == "shared_memory"
        assert c.transports["shared_memory"] == 2 and c.transports["bulk"] == 0
        assert shm.segments == 2 and srv.bulk.sessions == 1  # type: ignore[attr-defined]
        a.add_(1)  # a result is writable, and its segment is still lent: never rewritten
        for i in range(6):  # each lands in a segment other than a's
            assert c.tensor("x")[i : i + 40].equal(X[i : i + 40])
        assert a.equal(X[0:40] + 1)
        del a, b
        gc.collect()
        for i in range(6):  # a's and b's segments are free again: nothing new is made
            assert c.tensor("x")[i : i + 30].equal(X[i : i + 30])
        assert shm.segments <= 3 and shm.lent == 14 and shm.fallbacks == 0
        data = c.slice_bytes("x", (slice(2, 50),))  # bytes: copied out of the segment
        assert isinstance(data, bytes) and c.transports["shared_memory"] == 15
    # closing the client closes its session: the server drops its segments
    assert until(lambda: shm.segments == 0 and shm.bytes == 0 and shm.sessions == 0)
    gc.collect()
    assert _open_segments() == 0 and _mapped() == 0


@pytest.mark.e2e
def test_async_client_uses_the_same_sessions(served: tuple[object, str]) -> None:
    _, address = served

    async def main() -> None:
        async with AsyncClient(address, timeout=30) as c:
            for i in range(3):
                got = await (await c.tensor("x"))[i : i + 40]
                assert got.equal(X[i : i + 40])
            assert c.transports["shared_memory"] == 3

    asyncio.run(main())


@pytest.mark.e2e
def test_same_host_off_by_option_or_environment(
    served: tuple[object, str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    srv, address = served
    with Client(address, timeout=30, same_host=False) as c:
        assert c.tensor("x")[0:40].equal(X[0:40])
        assert c.transports["bulk"] == 1 and c.transports["shared_memory"] == 0
        assert c.last_transport == "bulk"
    monkeypatch.setenv("TENSORSLICE_SAME_HOST", "0")
    with Client(address, timeout=30) as c:
        assert c.tensor("x")[0:40].equal(X[0:40])
        assert c.transports["bulk"] == 1 and c.transports["shared_memory"] == 0
    assert srv.bulk.shm.lent == 0  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_a_full_budget_sends_on_the_socket_instead() -> None:
    srv, address = _server(shm_max_bytes=1 << 20)  # below one 2 MiB result
    try:
        with Client(address, timeout=30) as c:
            assert c.tensor("x")[:].equal(X)  # a call over the session: the answer on it
            assert c.transports["session"] == 1 and c.transports["shared_memory"] == 0
        shm = srv.bulk.shm  # type: ignore[attr-defined]
        assert shm.fallbacks == 1 and shm.lent == 0 and shm.segments == 0
    finally:
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_results_outlive_a_server_restart_and_the_next_call_works() -> None:
    srv, address = _server()
    port = int(address.rsplit(":", 1)[1])
    bulk_port = srv.bulk.port  # type: ignore[attr-defined]
    with Client(address, timeout=30) as c:
        held = c.tensor("x")[[3, 2, 1]]
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]
        assert held.equal(X[[3, 2, 1]])  # the mapping keeps the segment's memory
        srv, _ = _server(port, bulk_port=bulk_port)
        try:
            assert c.tensor("x")[0:40].equal(X[0:40])  # a new session, with the new server
            assert c.transports["shared_memory"] == 2
            assert held.equal(X[[3, 2, 1]])
        finally:
            srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_server_without_same_host_falls_back_to_tcp_once() -> None:
    srv, address = _server(same_host=False)  # as if in another network namespace
    try:
        with Client(address, timeout=30) as c:
            assert c.tensor("x")[0:40].equal(X[0:40])
            assert c.tensor("x")[1:41].equal(X[1:41])
            assert c.transports["bulk"] == 2 and c._shm is not None
            assert not c._shm.available  # tried once only
    finally:
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


def _redeem(sock: socket.socket, token: bytes, releases: list[tuple[int, int]]
            ) -> tuple[tuple[int, ...], int | None]:
    rel = b"".join(SHM_RELEASE.pack(i, g) for i, g in releases)
    sock.sendall(SHM_REQUEST.pack(1, len(releases)) + rel + token)
    msg, fds, _, _ = socket.recv_fds(sock, SHM_REPLY.size, 1)
    if len(msg) < SHM_REPLY.size:
        msg += sock.recv(SHM_REPLY.size - len(msg), socket.MSG_WAITALL)
    reply = SHM_REPLY.unpack(msg)
    sock.recv(4 * reply[5], socket.MSG_WAITALL)  # forgotten ids
    return reply, (fds[0] if fds else None)


@pytest.mark.e2e
def test_a_segment_is_written_only_after_its_exact_release(
    served: tuple[object, str],
) -> None:
    srv, _ = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    payload = bytes(range(256)) * 4096  # 1 MiB

    def ticket(fill: int) -> bytes:
        token: bytes = bulk.offer([bytes([fill]) * len(payload)], len(payload))
        return token

    with session(bulk.port) as sock:
        (kind, seg, gen, size, nbytes, _), fd = _redeem(sock, ticket(1), [(999, 1)])
        assert kind == SHM_SEGMENT and fd is not None and nbytes == len(payload)
        with pytest.raises(PermissionError):  # sealed: nobody can shrink it
            os.ftruncate(fd, 0)
        m = mmap.mmap(fd, size)
        os.close(fd)
        assert m[:nbytes] == b"\x01" * nbytes
        # a release of the wrong generation changes nothing: a new segment is made
        (kind2, seg2, _, _, _, _), fd2 = _redeem(sock, ticket(2), [(seg, gen + 1)])
        assert kind2 == SHM_SEGMENT and seg2 != seg and fd2 is not None
        os.close(fd2)
        assert m[:nbytes] == b"\x01" * nbytes  # untouched
        # the exact release frees it: reused, no descriptor, a newer generation
        (kind3, seg3, gen3, _, _, _), fd3 = _redeem(sock, ticket(3), [(seg, gen)])
        assert (kind3, seg3, fd3) == (SHM_SEGMENT, seg, None) and gen3 > gen
        assert m[:nbytes] == b"\x03" * nbytes
        m.close()
        assert bulk.shm.stale == 2  # the foreign id and the wrong generation
        # an unknown token: an error, the session goes on
        (kind4, _, _, _, nbytes4, _), _ = _redeem(sock, b"\0" * 16, [])
        assert kind4 == 2
        assert b"unknown or expired" in sock.recv(nbytes4, socket.MSG_WAITALL)


def _impostor(name: bytes, answer: str, instance: bytes
              ) -> tuple[socket.socket, threading.Thread]:
    """A listener at the same-host name that refuses, or greets as the server of
    `instance` and answers with a bad segment."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(name)
    listener.listen(1)
    listener.settimeout(30)

    def serve() -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(30)
            conn.recv(16, socket.MSG_WAITALL)
            if answer == "close":
                return
            conn.sendall(SHM_HELLO + instance)
            head = conn.recv(SHM_REQUEST.size, socket.MSG_WAITALL)
            _, count = SHM_REQUEST.unpack(head)
            conn.recv(count * SHM_RELEASE.size + 16, socket.MSG_WAITALL)
            nbytes = 64 + X[0:40].numel() * 4  # what the ticket announces, roughly
            if answer == "unknown id":
                conn.sendall(SHM_REPLY.pack(SHM_SEGMENT, 7, 1, 1 << 22, nbytes, 0))
                return
            fd = os.memfd_create("impostor", os.MFD_ALLOW_SEALING)
            try:
                os.ftruncate(fd, 1 << 22)
                with mmap.mmap(fd, 64) as m:
                    m[:8] = b"\xff" * 8
                size = 1 << 22 if answer == "unsealed" else 1 << 30
                socket.send_fds(conn, [SHM_REPLY.pack(SHM_SEGMENT, 1, 1, size, nbytes, 0)],
                                [fd])
            finally:
                os.close(fd)
            conn.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener, thread


@pytest.mark.e2e
@pytest.mark.parametrize("answer", ["close", "unknown id", "unsealed", "wrong size"])
def test_a_foreign_socket_at_the_name_never_gives_wrong_data(answer: str) -> None:
    srv, address = _server(same_host=False)
    bulk = srv.bulk  # type: ignore[attr-defined]
    listener, thread = _impostor(same_host_socket(bulk.port), answer, bulk.instance)
    try:
        with Client(address, timeout=30) as c:
            if answer == "close":  # no session: the ticket is redeemed over TCP
                assert c.tensor("x")[0:40].equal(X[0:40])
                assert c.transports["bulk"] == 1
            else:
                with pytest.raises(TensorSliceError, match=r"same-host .*refused"):
                    c.tensor("x")[0:40]
        thread.join(timeout=30)
        gc.collect()
        assert _open_segments() == 0
    finally:
        listener.close()
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


_CHILD = """
import sys, time
from tensorslice.client import Client
c = Client(sys.argv[1], timeout=30)
held = [c.tensor("x")[i : i + 40] for i in range(3)]
print("fetched", c.transports["shared_memory"], flush=True)
time.sleep(120)
"""


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1])
    return 0


@pytest.mark.e2e
def test_a_client_killed_holding_segments_leaves_nothing_on_the_server(
    served: tuple[object, str],
) -> None:
    srv, address = served
    bulk = srv.bulk  # type: ignore[attr-defined]
    shared_before = _rss_kib()
    with child(_CHILD, address, 3):
        assert bulk.shm.segments == 3 and bulk.sessions == 1
        assert _open_segments() == 3
    assert until(lambda: bulk.sessions == 0 and bulk.shm.segments == 0)
    assert bulk.shm.bytes == 0 and bulk.pending == 0 and bulk.held_bytes == 0
    assert _open_segments() == 0 and _mapped() == 0
    assert _rss_kib() <= shared_before + 1024  # the segments' pages are gone from the server
    srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]
    if os.path.isdir("/dev/shm"):  # segments are anonymous: nothing is ever named there
        assert not [n for n in os.listdir("/dev/shm") if "tensorslice" in n]


@pytest.mark.unit
def test_a_forked_child_never_releases_its_parents_loans() -> None:
    from tensorslice.client import _shm

    epoch = _shm._fork_epoch[0]
    pid = os.fork()
    if pid == 0:  # the child exits at once
        os._exit(0 if _shm._fork_epoch[0] == epoch + 1 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _shm._fork_epoch[0] == epoch + 1
    import queue

    q: queue.SimpleQueue[tuple[int, int]] = queue.SimpleQueue()
    _shm._released(q, 1, 1, epoch)  # lent before the fork: dropped
    _shm._released(q, 2, 1, epoch + 1)
    assert q.get_nowait() == (2, 1) and q.empty()
    assert struct.calcsize("<IQ") == SHM_RELEASE.size


def _forked_worker(address: str, port: int, instance: bytes, same_host: bool,
                   token: str | None, out: object) -> None:
    from tensorslice.client._fork import forked_from_grpc

    torch.set_num_threads(1)
    c = Client(address, timeout=30, same_host=same_host, token=token)
    c._data_planes = [("127.0.0.1", port, socket.AF_INET, ("127.0.0.1", port))]
    c._announced = {("127.0.0.1", port): instance}
    results: list[object] = [forked_from_grpc()]
    try:
        results.append([t.name for t in c.list_tensors()])
        results.append(all(c.tensor("x")[i : i + 40].equal(X[i : i + 40]) for i in range(4)))
        got = c.slice_many({"a": ("x", (slice(0, 20),))}, share_memory=True)["a"]
        results.append(got.equal(X[0:20]) and got.is_shared())
        c.describe("nope")
    except TensorSliceError as exc:
        results.append(f"{type(exc).__name__}: {exc}")
    out.put(results)  # type: ignore[attr-defined]


@pytest.mark.e2e
@pytest.mark.parametrize("same_host", [True, False])
def test_a_forked_client_calls_over_a_session(same_host: bool) -> None:
    import multiprocessing

    srv, address = _server(token="s3cret")
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    try:
        with Client(address, timeout=30, token="s3cret") as parent:
            parent.list_tensors()  # gRPC used: a forked child must not
            port = parent._data_port
            instance = parent._announced[("127.0.0.1", port)]
        assert port is not None and instance == srv.bulk.instance  # type: ignore[attr-defined]
        ctx = multiprocessing.get_context("fork")
        out = ctx.Queue()
        child = ctx.Process(target=_forked_worker,
                            args=(address, port, instance, same_host, "s3cret", out))
        child.start()
        got = out.get(timeout=60)
        child.join(timeout=30)
        assert got == [True, ["x"], True, True,
                       "TensorNotFound: no tensor named 'nope'; the server holds: x"]
        # every call went over the session (the small answers on its socket, the results
        # in segments, reused), or none did; the result asked for in shared memory came in
        # a kept segment (counted until the child goes)
        assert ((shm.lent >= 5 and shm.inline >= 2 and shm.kept == 1 and shm.segments <= 3)
                if same_host else shm.lent == 0)
        assert until(lambda: shm.sessions == 0 and shm.segments == 0 and shm.bytes == 0)
        child = ctx.Process(target=_forked_worker,
                            args=(address, port, instance, True, "wrong", out))
        child.start()
        got = out.get(timeout=60)
        child.join(timeout=30)
        assert got[0] is True and str(got[1]).startswith("Unauthenticated")
    finally:
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_dataloader_batches_reach_the_main_process_in_kept_segments_without_a_copy(
) -> None:
    from torch.utils.data import DataLoader

    from tensorslice.client import RemoteTensorDataset

    srv, address = _server()
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    try:
        ds = RemoteTensorDataset(Client(address, timeout=60), "x")
        loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=ds.collate,
                            multiprocessing_context="fork", timeout=120)
        mapped = _mapped()
        held = list(loader)  # every batch kept in this process while the workers go on
        assert len(held) == 16 and shm.kept == 16
        for i, batch in enumerate(held):  # none was written again after it was handed on
            assert batch.equal(X[4 * i : 4 * i + 4]) and batch.untyped_storage().is_shared()
        # each batch is on its own segment's mapping: torch passed the descriptor on and
        # copied nothing; the server keeps none of them (it unmaps each once it is sent)
        assert until(lambda: _mapped() == mapped + 16)
        assert until(lambda: shm.sessions == 0 and shm.segments == 0 and shm.bytes == 0)
        del held, loader, batch
        gc.collect()
        # the last mapping (and torch's descriptor) gone: the memory is the system's
        assert _mapped() == mapped and _open_segments() == 0
    finally:
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


_KEEPER = """
import sys, time
from tensorslice.client import Client
c = Client(sys.argv[1], timeout=30)
held = [c.slice_many({"a": ("x", (slice(i, i + 40),))}, share_memory=True)["a"]
        for i in range(3)]
assert all(t.untyped_storage().is_shared() for t in held)
print("fetched", c.transports["shared_memory"], flush=True)
time.sleep(120)
"""


@pytest.mark.e2e
def test_kept_segments_are_bounded_and_a_killed_client_leaves_nothing_on_the_server(
) -> None:
    srv, address = _server()
    bulk = srv.bulk  # type: ignore[attr-defined]
    shared_before = _rss_kib()
    with child(_KEEPER, address, 3):
        # counted against the session until released, held by the client alone
        assert bulk.shm.kept == 3 and bulk.shm.segments == 3 and bulk.sessions == 1
        assert bulk.shm.bytes >= 3 * 40 * X[0].numel() * 4
        # the server closes its side once the reply is sent (its thread, just after)
        assert until(lambda: _open_segments() == 0 and _mapped() == 0)
        assert _rss_kib() <= shared_before + 1024
    assert until(lambda: bulk.sessions == 0 and bulk.shm.segments == 0)
    assert bulk.shm.bytes == 0 and bulk.pending == 0 and bulk.held_bytes == 0
    srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_kept_segments_beyond_the_sessions_bound_come_pooled_and_are_released() -> None:
    srv, address = _server()
    shm = srv.bulk.shm  # type: ignore[attr-defined]
    shm.max_segments = 3
    try:
        with Client(address, timeout=30) as c:
            def fetch(i: int) -> torch.Tensor:
                return c.slice_many({"a": ("x", (slice(i, i + 40),))}, share_memory=True)["a"]

            held = [fetch(i) for i in range(3)]
            assert shm.kept == 3 and len(held) == 3
            extra = fetch(3)  # no room for a 4th: on the socket, into shared memory
            assert extra.equal(X[3:43]) and extra.untyped_storage().is_shared()
            assert shm.kept == 3 and shm.fallbacks == 1 and shm.segments == 3
            del held[0]
            gc.collect()
            again = fetch(4)  # the release went with this request: room for a kept one
            assert again.equal(X[4:44]) and shm.kept == 4 and shm.segments == 3
            assert all(t.equal(X[i + 1 : i + 41]) for i, t in enumerate(held))
        assert until(lambda: shm.segments == 0 and shm.bytes == 0)
    finally:
        srv.stop(grace=None).wait(10)  # type: ignore[attr-defined]
