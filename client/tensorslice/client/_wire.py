"""The wire codec: safetensors headers and `SliceChunk` frames, by hand.

A `Slice` response is a stream of `SliceChunk { bytes data = 1; }` messages whose payloads,
concatenated, form one safetensors file. Both sides frame and unframe the message themselves
(wire-compatible with the generated protobuf class) so that the payload is never parsed or
copied by protobuf. The client writes every payload into one preallocated buffer and builds
its tensors on that buffer with `torch.frombuffer`.
"""

from __future__ import annotations

import ctypes
import functools
import json
import socket
import struct
import weakref
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from tensorslice.client._errors import InvalidSelection, TensorSliceError

__all__ = [
    "DTYPE_NAMES",
    "Assembler",
    "TensorEntry",
    "decode_chunk",
    "dtype_from_name",
    "encode_chunk",
    "safetensors_header",
    "split_chunk",
]

# torch dtype <-> safetensors dtype code
_ST_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
):
    if hasattr(torch, _name):
        _ST_CODES[getattr(torch, _name)] = _code
_FROM_ST = {code: dt for dt, code in _ST_CODES.items()}

DTYPE_NAMES: dict[str, torch.dtype] = {str(dt).removeprefix("torch."): dt for dt in _ST_CODES}


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for a name such as ``"float16"``; InvalidSelection when unknown."""
    try:
        return DTYPE_NAMES[name.removeprefix("torch.")]
    except KeyError:
        raise InvalidSelection(
            f"unknown dtype {name!r}; expected one of {', '.join(sorted(DTYPE_NAMES))}"
        ) from None


def dtype_from_code(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype code such as ``"BF16"``."""
    return _FROM_ST.get(code)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: name, dtype, shape and byte range in the data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def safetensors_header(
    tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[TensorEntry]]:
    """The 8-byte length plus JSON header of a safetensors file holding these tensors, in
    this order, and their byte ranges within the data that follows the header."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    entries = []
    offset = 0
    for name, dtype, shape in tensors:
        if dtype not in _ST_CODES:
            raise InvalidSelection(f"dtype {dtype_name(dtype)} has no safetensors encoding")
        n = 1
        for s in shape:
            n *= s
        nbytes = n * dtype.itemsize
        entries.append(TensorEntry(name, dtype, tuple(shape), offset, offset + nbytes))
        header[name] = {
            "dtype": _ST_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, entries


# ---------------------------------------------------------------------------- framing

_TAG_DATA = 0x0A  # field 1, wire type 2 (length-delimited)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def encode_chunk(*parts: bytes | memoryview) -> bytes:
    """One serialized `SliceChunk` whose `data` is the concatenation of `parts`
    (the parts are copied once, straight into the frame)."""
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    if size == 0:
        return b""
    return b"".join((bytes((_TAG_DATA,)), _varint(size), *parts))


def decode_chunk(frame: bytes) -> memoryview:
    """The `data` of a serialized `SliceChunk`, as a view of `frame` (no copy)."""
    return split_chunk(frame)[0]


def split_chunk(frame: bytes) -> tuple[memoryview, memoryview | None]:
    """The `data` of a serialized `SliceChunk` and its serialized `ticket` (a `BulkTicket`),
    or None when it has none; views of `frame` (no copy)."""
    view = memoryview(frame)
    data = view[0:0]
    ticket: memoryview | None = None
    pos = 0
    end = len(frame)
    while pos < end:
        key, pos = _read_varint(frame, pos)
        field, wire = key >> 3, key & 7
        if wire == 2:
            size, pos = _read_varint(frame, pos)
            if pos + size > end:
                raise TensorSliceError("truncated SliceChunk frame")
            if field == 1:
                data = view[pos : pos + size]
            elif field == 2:
                ticket = view[pos : pos + size]
            pos += size
        elif wire == 0:
            _, pos = _read_varint(frame, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise TensorSliceError(f"malformed SliceChunk frame (wire type {wire})")
    return data, ticket


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise TensorSliceError("truncated varint in SliceChunk frame")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


# ---------------------------------------------------------------------------- assembly

_RECV_BYTES = 16 << 20

RECYCLE_MAX_BYTES = 1 << 30
"""Receive buffers freed by their tensors are kept, up to this many bytes in all, and
reused: filling fresh memory costs a page fault per 4 KiB, about as much as the transfer."""
_RECYCLE_MIN = 1 << 20


_recycled: deque[bytearray] = deque()


def _give_back(buf: bytearray) -> None:
    if sum(map(len, _recycled)) + len(buf) <= RECYCLE_MAX_BYTES:
        _recycled.append(buf)


def _receive_buffer(n: int) -> memoryview:
    """A writable view of n bytes. Large ones come from the recycling pool when a free
    buffer of at most twice the size is there; the buffer goes back to the pool when the
    view (and every tensor built on it) is gone."""
    if n < _RECYCLE_MIN:
        return memoryview(bytearray(n))
    buf = None
    for cand in list(_recycled):
        if n <= len(cand) <= 2 * n:
            try:
                _recycled.remove(cand)
            except ValueError:  # taken by another thread meanwhile
                continue
            buf = cand
            break
    if buf is None:
        buf = bytearray(n)
    view = memoryview(buf)[:n]
    weakref.finalize(view, _give_back, buf)
    return view


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise TensorSliceError(f"bulk transfer ended early: {len(out)} of {n} bytes")
        out += part
    return bytes(out)


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.restype = ctypes.py_object
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_bytes_address = ctypes.pythonapi.PyBytes_AsString
_bytes_address.restype = ctypes.c_void_p
_bytes_address.argtypes = (ctypes.py_object,)


def _fresh_bytes(n: int) -> tuple[bytes, memoryview]:
    """A new, not yet shared `bytes` object of n bytes and a writable view of its storage.

    The C API allows filling a bytes object created from NULL before anyone else sees it;
    this lets `slice_bytes` return the assembled file as `bytes` without a second copy.
    """
    obj: bytes = _new_bytes(None, n)
    if n == 0:
        return obj, memoryview(bytearray())
    storage = (ctypes.c_char * n).from_address(_bytes_address(obj))
    return obj, memoryview(storage).cast("B")


@functools.lru_cache(maxsize=256)
def _parse_header(raw: bytes) -> tuple[tuple[TensorEntry, ...], tuple[tuple[str, str], ...]]:
    """The entries (by offset) and metadata of a safetensors JSON header; the same header
    seen again (the same request, repeated) is parsed once."""
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise TensorSliceError(f"malformed safetensors header: {exc}") from None
    metadata = tuple((header.pop("__metadata__", None) or {}).items())
    entries = []
    for name, info in header.items():
        dtype = _FROM_ST.get(info["dtype"])
        if dtype is None:
            raise TensorSliceError(f"unsupported safetensors dtype {info['dtype']}")
        start, end = info["data_offsets"]
        entries.append(TensorEntry(name, dtype, tuple(info["shape"]), start, end))
    entries.sort(key=lambda e: e.start)
    return tuple(entries), metadata


class Assembler:
    """Collects the payloads of a stream into one preallocated buffer.

    The total size is read from the safetensors header at the start of the stream; each
    payload is copied once, into its place. `tensors()` builds tensors on that buffer;
    with ``as_bytes=True`` the buffer is a `bytes` object, for `file_bytes()`.
    """

    def __init__(self, *, as_bytes: bool = False, share_memory: bool = False) -> None:
        self._as_bytes = as_bytes
        self._shared: torch.Tensor | None = None
        self._share_memory = share_memory
        self._head = bytearray()
        self._buf: memoryview | bytes | None = None
        self._view: memoryview | None = None
        self._pos = 0
        self._data_start = 0
        self.entries: list[TensorEntry] = []
        self.metadata: dict[str, str] = {}

    def feed(self, payload: bytes | memoryview) -> None:
        if self._view is None:
            self._head += payload
            self._try_header()
            return
        n = len(payload)
        if self._pos + n > len(self._view):
            raise TensorSliceError(
                f"stream holds more bytes than its header announces ({len(self._view)})"
            )
        self._view[self._pos : self._pos + n] = payload
        self._pos += n

    def _try_header(self) -> None:
        if len(self._head) < 8:
            return
        (hlen,) = struct.unpack_from("<Q", self._head)
        if len(self._head) < 8 + hlen:
            return
        entries, metadata = _parse_header(bytes(self._head[8 : 8 + hlen]))
        self.entries = list(entries)
        self.metadata = dict(metadata)
        total_data = max((e.end for e in entries), default=0)
        self._data_start = 8 + hlen
        total = self._data_start + total_data
        if self._as_bytes:
            self._buf, self._view = _fresh_bytes(total)
        elif self._share_memory:
            # Shared memory from the start: a DataLoader worker hands such tensors to the
            # main process without copying them again.
            storage = torch.UntypedStorage._new_shared(total)  # type: ignore[no-untyped-call]
            self._shared = torch.empty(0, dtype=torch.uint8).set_(storage)
            self._buf = self._view = self._shared.numpy().data.cast("B")
        else:
            self._buf = self._view = _receive_buffer(total)
        head = bytes(self._head)
        self._head = bytearray()
        self._view[: len(head)] = head
        self._pos = len(head)

    def receive(self, sock: socket.socket, nbytes: int) -> None:
        """Read a whole file of `nbytes` from `sock`: the header first, then the rest
        straight into the preallocated buffer (`recv_into`, no intermediate copy)."""
        head = _recv_exact(sock, 8)
        (hlen,) = struct.unpack_from("<Q", head)
        if 8 + hlen > nbytes:
            raise TensorSliceError(f"bulk header of {hlen} bytes exceeds the {nbytes}-byte file")
        self.feed(head + _recv_exact(sock, hlen))
        view = self._view
        if view is None or len(view) != nbytes:
            raise TensorSliceError(
                f"bulk file announces {0 if view is None else len(view)} bytes, the ticket "
                f"{nbytes}"
            )
        while self._pos < nbytes:
            n = sock.recv_into(view[self._pos :], min(nbytes - self._pos, _RECV_BYTES))
            if n == 0:
                raise TensorSliceError(
                    f"bulk transfer ended early: {self._pos} of {nbytes} bytes received"
                )
            self._pos += n

    @property
    def complete(self) -> bool:
        return self._view is not None and self._pos == len(self._view)

    def _check(self) -> tuple[memoryview | bytes, memoryview]:
        if self._buf is None or self._view is None or not self.complete:
            got = self._pos if self._view is not None else len(self._head)
            want = len(self._view) if self._view is not None else "an unknown number of"
            raise TensorSliceError(f"stream ended early: {got} of {want} bytes received")
        return self._buf, self._view

    def file_bytes(self) -> bytes:
        """The whole safetensors file (the buffer itself, not a copy)."""
        buf, view = self._check()
        return buf if isinstance(buf, bytes) else bytes(view)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the file, built on the buffer without a copy."""
        _, view = self._check()
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            count = (e.end - e.start) // e.dtype.itemsize
            start = self._data_start + e.start
            if count == 0:
                out[e.name] = torch.empty(e.shape, dtype=e.dtype)
            elif self._shared is not None and start % e.dtype.itemsize == 0:
                nbytes = count * e.dtype.itemsize
                out[e.name] = self._shared[start : start + nbytes].view(e.dtype).view(e.shape)
            else:
                # On the receive view itself: the tensors keep it (and its buffer) alive.
                flat = torch.frombuffer(view, dtype=e.dtype, count=count, offset=start)
                out[e.name] = flat.view(e.shape) if start % e.dtype.itemsize == 0 else (
                    flat.clone().view(e.shape))
        return out
