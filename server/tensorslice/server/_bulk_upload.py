"""Uploads over the bulk data plane (`OpenUpload`): the tensor's bytes over a plain socket,
received straight into its final storage.

An upload opens with a small gRPC call carrying the safetensors file's header; everything
that can be refused is refused there, before any data moves (the write permission, the
name, the header, an append's dtype and row shape, the memory budget: the storage is
allocated then). The call answers with a ticket of the bulk plane (`BulkServer.offer_upload`);
the client connects, sends the token, the data and `UPLOAD_END`, and reads the answer on
that connection. Guarantees:

- The data lands in its final place with one copy by the kernel: `recv_into` straight into
  the tensor's memory on a CPU store; on a device, into two reused pinned slabs, each copied
  to the device while the other fills (never a full extra host copy).
- Nothing is stored unless exactly the announced bytes arrive, followed by `UPLOAD_END`: a
  connection that closes early, sends more (`UPLOAD_END` not where it is due), or sends
  nothing for `send_timeout` seconds (per read) is answered with an error where it can
  still be, and its storage freed: the reservation comes back. So is a ticket that expires
  unredeemed or that a stopping server drops.
- The answer comes only after the version is committed, and persisted where the store
  persists (`TensorStore.put`/`append`): ``<BQ`` (status, 0 for OK; length), then the
  serialized `TensorInfo` or the error's UTF-8 message.
- The copies to the device are injected (`CopyAsync`), so their ordering is testable
  without one: a slab is refilled only once its previous copy has completed, and every copy
  has completed before the version is committed or the storage freed.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable

import torch

from tensorslice.core.codec import UPLOAD_END
from tensorslice.core.errors import InvalidSelection, ServerUnavailable, Status, TensorSliceError
from tensorslice.server._staging import CopyAsync, Waitable, host_bytes, pinned_pool
from tensorslice.server._store import Storage

__all__ = ["SLAB_BYTES", "BulkUpload", "receive_into", "to_device_async"]

log = logging.getLogger("tensorslice.server")

SLAB_BYTES = 8 << 20
"""Bytes of each of the two pinned slabs a device upload crosses the host through."""
_RECV_STEP = 16 << 20  # most bytes asked of one recv_into (one TLS record is 16 KiB anyway)
_MAX_ERROR_BYTES = 4096

ReadInto = Callable[[memoryview], None]
"""Fills the whole view from the connection, or raises."""


def to_device_async(dst: torch.Tensor, src: torch.Tensor) -> Waitable:
    """Enqueue `dst.copy_(src)` (pinned host to device) on the current stream of `dst`'s
    device and record an event after it on that stream."""
    stream = torch.cuda.current_stream(dst.device)
    dst.copy_(src, non_blocking=True)
    event = torch.cuda.Event()  # type: ignore[no-untyped-call]
    event.record(stream)
    return event


def receive_into(read_into: ReadInto, out: torch.Tensor, *,
                 slabs: tuple[torch.Tensor, torch.Tensor] | None = None,
                 copy_async: CopyAsync = to_device_async) -> None:
    """Fill `out` (contiguous) with the next bytes `read_into` reads: straight into its
    memory on the host; through `slabs` (two uint8 host buffers of one size) and
    `copy_async` otherwise. Every copy has completed when this returns or raises."""
    nbytes = out.numel() * out.element_size()
    if not nbytes:
        return
    if slabs is None:
        read_into(host_bytes(out))
        return
    flat = out.reshape(-1).view(torch.uint8)
    step = slabs[0].numel()
    in_flight: deque[Waitable] = deque()  # oldest first: the next slab's copy leads
    try:
        for i, start in enumerate(range(0, nbytes, step)):
            k = min(step, nbytes - start)
            slab = slabs[i % 2]
            if len(in_flight) == 2:  # this slab's previous copy must land before it refills
                in_flight.popleft().synchronize()
            read_into(host_bytes(slab)[:k])
            in_flight.append(copy_async(flat[start : start + k], slab[:k]))
    finally:
        while in_flight:
            in_flight.popleft().synchronize()


def socket_reader(sock: socket.socket) -> ReadInto:
    """`ReadInto` over a blocking socket (its timeout bounds each read): ConnectionError
    where it closes before the view is full."""

    def read_into(view: memoryview) -> None:
        got, n = 0, len(view)
        while got < n:
            k = sock.recv_into(view[got:], min(n - got, _RECV_STEP))
            if not k:
                raise ConnectionError(f"closed after {got} of {n} bytes")
            got += k

    return read_into


Commit = Callable[[Storage], bytes]
"""Publishes a filled storage (a put's tensor, an append's rows); the serialized answer."""


class BulkUpload:
    """One upload ticket's work: its storage (allocated and counted when the upload was
    opened), what commits it, and how to receive it from a connection. `release` frees
    the storage unless it was committed; idempotent."""

    def __init__(self, storage: Storage, nbytes: int, commit: Commit, what: str) -> None:
        self.storage: Storage | None = storage
        self.nbytes = nbytes
        self.commit = commit
        self.what = what
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            storage, self.storage = self.storage, None
        if storage is not None:
            storage.free()

    def receive(self, sock: socket.socket, timeout: float | None) -> bool:
        """Receive the data, commit it and answer, on `sock` (blocking; `timeout` bounds
        each read). True when committed. Errors of the upload are answered, not raised;
        the storage is freed unless committed."""
        storage = self.storage
        if storage is None:
            return False
        try:
            sock.settimeout(timeout)
            try:
                read_into = socket_reader(sock)
                t = storage.tensor
                slabs = None
                if t.device.type != "cpu" and self.nbytes:
                    pool = pinned_pool(SLAB_BYTES)
                    slabs = (pool.acquire(), pool.acquire())
                try:
                    receive_into(read_into, t, slabs=slabs)
                finally:
                    if slabs is not None:
                        pool.release(slabs[0])
                        pool.release(slabs[1])
                end = bytearray(len(UPLOAD_END))
                read_into(memoryview(end))
                if bytes(end) != UPLOAD_END:
                    raise InvalidSelection(
                        f"{self.what}: the upload runs on beyond the {self.nbytes} data "
                        f"bytes its header announced"
                    )
            except (OSError, ConnectionError) as exc:
                log.info("%s over the bulk data plane cut off: %s; nothing was stored",
                         self.what, exc)
                return False
            with self._lock:
                taken, self.storage = self.storage, None
            if taken is None:  # released meanwhile (the server stopping)
                raise ServerUnavailable("the server is shutting down; nothing was stored")
            try:
                answer = self.commit(taken)
            except BaseException:
                taken.free()  # not published: nothing references it
                raise
        except TensorSliceError as exc:
            self.release()
            _answer(sock, exc.status, exc.message.encode("utf-8", "replace")[:_MAX_ERROR_BYTES])
            return False
        except Exception:
            self.release()
            log.exception("internal error while storing %s", self.what)
            _answer(sock, Status.INTERNAL, b"internal error; the server log has the details")
            return False
        _answer(sock, Status.OK, answer)
        return True


def _answer(sock: socket.socket, status: Status, data: bytes) -> None:
    try:
        sock.sendall(struct.pack("<BQ", status.value, len(data)) + data)
    except OSError as exc:
        log.info("upload answer not delivered: %s", exc)
