"""The staging path: slabs to host chunks. CPU slabs are read in place; the pipelining of
device slabs (pinned buffers, copies in flight, buffer reuse) is tested on the CPU with an
injected copy operation that models an asynchronous device: a copy started may land at any
moment until it is waited for."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from tensorslice.server._payload import BufferPool, ContiguousPayload, StridedPayload
from tensorslice.server._staging import (
    STAGE_BYTES,
    PinnedPool,
    Stager,
    host_bytes,
    host_chunks,
    pinned_pool,
    stage_bytes_for,
)
from tensorslice.server._stream import frames

pytestmark = pytest.mark.unit


def _bytes_of(*ts: torch.Tensor) -> bytes:
    return b"".join(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in ts)


class FakeDevice:
    """Asynchronous copies in the order they were started. `eager` lands each one as soon
    as it starts (a fast device: a copy into a buffer the caller still reads would corrupt
    it at once); otherwise copies land only when waited for (a slow device: a chunk handed
    out before its copy was waited for would hold stale bytes)."""

    def __init__(self, eager: bool) -> None:
        self.eager = eager
        self.started = 0
        self.landed = 0
        self.waited = 0
        self._queue: list[tuple[torch.Tensor, torch.Tensor, Done]] = []

    def copy_async(self, dst: torch.Tensor, src: torch.Tensor) -> Done:
        assert dst.device.type == "cpu" and dst.numel() == src.numel()
        done = Done(self)
        self._queue.append((dst, src.clone(), done))  # src may be reused once enqueued
        self.started += 1
        if self.eager:
            self.land_all()
        return done

    def land_all(self) -> None:
        while self._queue:
            dst, src, done = self._queue.pop(0)
            dst.copy_(src)
            done.landed = True
            self.landed += 1

    def land_until(self, target: Done) -> None:
        while not target.landed:
            dst, src, done = self._queue.pop(0)  # in order: a stream
            dst.copy_(src)
            done.landed = True
            self.landed += 1

    @property
    def unwaited(self) -> int:
        return self.started - self.waited


class Done:
    def __init__(self, device: FakeDevice) -> None:
        self.device = device
        self.landed = False
        self.synchronized = False

    def synchronize(self) -> None:
        self.device.land_until(self)
        if not self.synchronized:
            self.synchronized = True
            self.device.waited += 1


def _slabs(n: int, size: int, reuse: bool) -> Iterator[torch.Tensor]:
    """`n` slabs of `size` bytes with distinct contents; with `reuse`, all written into one
    buffer, as the producers do with their reused device buffers."""
    buf = torch.empty(size, dtype=torch.uint8)
    for i in range(n):
        data = (torch.arange(size, dtype=torch.int64) * 7 + i * 13) % 251
        if reuse:
            buf.copy_(data)
            yield buf
        else:
            yield data.to(torch.uint8)


def _expected(n: int, size: int) -> bytes:
    return b"".join(_bytes_of(s.clone()) for s in _slabs(n, size, reuse=False))


# ------------------------------------------------------------------------- CPU slabs


def test_cpu_slabs_are_read_in_place() -> None:
    a = torch.arange(10, dtype=torch.float32)
    b = torch.arange(7, dtype=torch.int64).reshape(7, 1)
    chunks = list(host_chunks([a, b], 16))
    assert b"".join(bytes(c) for c in chunks) == _bytes_of(a, b)
    assert [len(c) for c in chunks] == [16, 16, 8, 16, 16, 16, 8]
    # a view of the tensor's own memory: no copy
    a[0] = 42.0
    assert bytes(chunks[0][:4]) == _bytes_of(torch.tensor([42.0]))


def test_cpu_slab_non_contiguous_and_empty() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(4, 6)[:, 1:3]
    chunks = list(host_chunks([x, torch.empty(0)], 1 << 20))
    assert b"".join(bytes(c) for c in chunks) == _bytes_of(x)
    assert host_bytes(torch.empty(0)).nbytes == 0


# ------------------------------------------------------------------------- pipelining


@pytest.mark.parametrize("eager", [True, False], ids=["fast-device", "slow-device"])
@pytest.mark.parametrize("depth", [1, 2, 3, 5])
@pytest.mark.parametrize("reuse", [False, True], ids=["fresh-slabs", "reused-slab"])
def test_pipeline_order_and_bounds(eager: bool, depth: int, reuse: bool) -> None:
    n, size, chunk = 6, 40, 16  # 3 chunks per slab, the last one short
    dev = FakeDevice(eager)
    pool = PinnedPool(chunk, pin=False)
    out = bytearray()
    for mv in host_chunks(_slabs(n, size, reuse), chunk, depth=depth, pool=pool,
                          copy_async=dev.copy_async):
        received = bytes(mv)
        # while the caller holds a chunk: at most depth - 1 copies in flight (started,
        # not yet handed out), at most `depth` buffers taken
        assert dev.unwaited <= depth - 1
        assert pool.allocations <= depth
        # a copy landing now (the device runs on) must not touch the chunk being read
        dev.land_all()
        assert bytes(mv) == received
        out += received
    assert bytes(out) == _expected(n, size)
    assert dev.started == dev.landed == dev.waited == 3 * n
    assert pool.allocations == min(depth, 3 * n)
    assert pool.cached == pool.allocations  # every buffer back in the pool


@pytest.mark.parametrize("eager", [True, False], ids=["fast-device", "slow-device"])
@pytest.mark.parametrize("stage", [48, 50, 64])
def test_one_copy_feeds_several_chunks(eager: bool, stage: int) -> None:
    """Buffers larger than chunks: one copy per buffer, its bytes handed out chunk by chunk
    (a buffer of 50 stages 48 bytes: whole chunks only); the buffer is refilled only once
    the caller came back after its last chunk."""
    n, size, chunk = 5, 100, 16
    dev = FakeDevice(eager)
    pool = PinnedPool(stage, pin=False)
    out = bytearray()
    sizes = []
    for mv in host_chunks(_slabs(n, size, reuse=True), chunk, depth=2, pool=pool,
                          copy_async=dev.copy_async):
        received = bytes(mv)
        assert dev.unwaited <= 1 and pool.allocations <= 2
        dev.land_all()
        assert bytes(mv) == received
        sizes.append(len(mv))
        out += received
    assert bytes(out) == _expected(n, size)
    assert max(sizes) == chunk
    per_slab = -(-size // (stage // chunk * chunk))
    assert dev.started == n * per_slab
    assert pool.cached == pool.allocations == 2


def test_stage_size() -> None:
    assert stage_bytes_for(1 << 20) == STAGE_BYTES
    assert stage_bytes_for(3 << 20) == 6 << 20
    assert stage_bytes_for(STAGE_BYTES * 2) == STAGE_BYTES * 2
    assert stage_bytes_for(8192) == STAGE_BYTES


def test_pipeline_keeps_depth_minus_one_in_flight() -> None:
    """The overlap itself: while the caller holds a chunk, the next depth - 1 are copying."""
    dev = FakeDevice(eager=False)
    pool = PinnedPool(8, pin=False)
    seen = []
    for _ in host_chunks(_slabs(4, 32, reuse=False), 8, depth=3, pool=pool,
                         copy_async=dev.copy_async):
        seen.append(dev.unwaited)
    assert seen[:-2] == [2] * (len(seen) - 2) and seen[-2:] == [1, 0]


def test_pool_reused_across_calls() -> None:
    dev = FakeDevice(eager=True)
    pool = PinnedPool(16, pin=False)
    for _ in range(3):
        data = b"".join(bytes(mv) for mv in host_chunks(
            _slabs(3, 40, reuse=True), 16, pool=pool, copy_async=dev.copy_async))
        assert data == _expected(3, 40)
    assert pool.allocations == 3 and pool.cached == 3


@pytest.mark.parametrize("eager", [True, False], ids=["fast-device", "slow-device"])
def test_exception_mid_stream_releases_buffers(eager: bool) -> None:
    dev = FakeDevice(eager)
    pool = PinnedPool(16, pin=False)

    def failing() -> Iterator[torch.Tensor]:
        yield from _slabs(2, 40, reuse=False)
        raise RuntimeError("producer failed")

    got = 0
    with pytest.raises(RuntimeError, match="producer failed"):
        for _ in host_chunks(failing(), 16, depth=3, pool=pool, copy_async=dev.copy_async):
            got += 1
    assert got >= 1
    assert dev.waited == dev.started  # every copy in flight waited for before release
    assert pool.cached == pool.allocations == 3


@pytest.mark.parametrize("eager", [True, False], ids=["fast-device", "slow-device"])
def test_closed_mid_stream_releases_buffers(eager: bool) -> None:
    """A client that cancels: the generator is closed while copies are in flight."""
    dev = FakeDevice(eager)
    pool = PinnedPool(16, pin=False)
    gen = host_chunks(_slabs(5, 40, reuse=False), 16, depth=3, pool=pool,
                      copy_async=dev.copy_async)
    first = bytes(next(gen))
    assert first == _expected(1, 40)[:16]
    assert dev.unwaited == 2
    gen.close()
    assert dev.waited == dev.started
    assert pool.cached == pool.allocations == 3


def test_stager_direct() -> None:
    dev = FakeDevice(eager=False)
    pool = PinnedPool(4, pin=False)
    st = Stager(2, pool.acquire, pool.release, dev.copy_async)
    assert st.put(torch.tensor([1, 2, 3], dtype=torch.uint8)) is None
    mv = st.put(torch.tensor([4], dtype=torch.uint8))
    assert mv is not None and bytes(mv) == b"\x01\x02\x03"
    assert st.in_flight == 1 and st.buffers == 2
    mv = st.pop()
    assert mv is not None and bytes(mv) == b"\x04"
    assert st.pop() is None
    with pytest.raises(ValueError, match="does not fit a 4-byte buffer"):
        st.put(torch.zeros(5, dtype=torch.uint8))
    st.close()
    st.close()  # idempotent
    assert pool.cached == 2
    with pytest.raises(RuntimeError, match="closed"):
        st.put(torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="depth must be at least 1"):
        Stager(0, pool.acquire, pool.release, dev.copy_async)


def test_pool_smaller_than_chunk_is_refused() -> None:
    dev = FakeDevice(eager=True)
    with pytest.raises(ValueError, match="smaller than chunks"):
        list(host_chunks([torch.zeros(8)], 16, pool=PinnedPool(8, pin=False),
                         copy_async=dev.copy_async))


def test_pinned_pool_bounds_its_cache() -> None:
    pool = PinnedPool(8, max_cached=2, pin=False)
    bufs = [pool.acquire() for _ in range(3)]
    for b in bufs:
        pool.release(b)
    pool.release(bufs[0])  # a second release of the same buffer is ignored
    assert pool.cached == 2 and pool.allocations == 3
    assert pinned_pool(12345) is pinned_pool(12345)


# ------------------------------------------------------------------------- with payloads


@pytest.mark.parametrize("eager", [True, False], ids=["fast-device", "slow-device"])
def test_strided_payload_through_staging(eager: bool) -> None:
    """A producer that refills one reused buffer per slab, staged chunk by chunk: the bytes
    are exactly the view's."""
    x = torch.randn(20, 9, 7)
    view = x[:, 2:7]
    dev = FakeDevice(eager)
    pool = PinnedPool(64, pin=False)
    slabs = StridedPayload("values", view).slabs(7 * 5 * 4 * 3, BufferPool())
    data = b"".join(bytes(mv) for mv in host_chunks(slabs, 64, pool=pool,
                                                     copy_async=dev.copy_async))
    assert data == _bytes_of(view)
    assert pool.cached == pool.allocations


@pytest.mark.gpu
def test_cuda_slabs_through_pinned_buffers() -> None:
    """Real asynchronous copies through three small pinned buffers: many rotations, while
    the strided producer refills its one device buffer after every slab."""
    x = torch.randn(33, 17, 5, device="cuda")
    view = x[:, 3:11]
    pool = PinnedPool(384)
    assert pool.pin
    for payload, ref in ((ContiguousPayload("v", x), x), (StridedPayload("v", view), view)):
        data = b"".join(bytes(mv) for mv in host_chunks(payload.slabs(1000, BufferPool()), 96,
                                                         pool=pool))
        assert data == _bytes_of(ref.cpu())
    assert pool.cached == pool.allocations == 3


@pytest.mark.gpu
def test_cuda_frames_many_stages() -> None:
    """Through `frames` with the default staging (8 MiB buffers): a 32 MiB strided result,
    the producer refilling a 256 KiB device buffer while copies of earlier slabs are in
    flight."""
    from safetensors.torch import load

    from tensorslice.core.codec import decode_chunk

    x = torch.randn(256, 64, 1024, device="cuda")
    view = x[:, 1:63:2]
    raw = b"".join(bytes(decode_chunk(f)) for f in frames(
        [StridedPayload("values", view)], {}, chunk_bytes=1 << 20, slab_bytes=256 << 10))
    assert torch.equal(load(raw)["values"], view.cpu())
    pool = pinned_pool(stage_bytes_for(1 << 20))
    assert pool.pin and pool.cached == pool.allocations
