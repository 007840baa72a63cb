"""The wire codec: dtype codes, safetensors headers and `SliceChunk` frames, by hand.

A `Slice` response is a stream of `SliceChunk { bytes data = 1; }` messages whose payloads,
concatenated, form one safetensors file. Both sides frame and unframe the message themselves
(wire-compatible with the generated protobuf class) so that the payload is never parsed or
copied by protobuf. Receiving (buffers, sockets) is the client's business
(`tensorslice.client._receive`); this module does no I/O.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from tensorslice.core.errors import InvalidSelection, TensorSliceError

__all__ = [
    "DATA_HOST_KEY",
    "DATA_PORT_KEY",
    "DIRECT_MAGIC",
    "DTYPE_NAMES",
    "INSTANCE_BYTES",
    "INSTANCE_KEY",
    "SEGMENT_SEALS",
    "SESSION_MAGIC",
    "SHM_BYTES",
    "SHM_ERROR",
    "SHM_HELLO",
    "SHM_KEPT",
    "SHM_RELEASE",
    "SHM_REPLY",
    "SHM_REQUEST",
    "SHM_SEGMENT",
    "UPLOAD_END",
    "TensorEntry",
    "decode_chunk",
    "dtype_from_name",
    "encode_chunk",
    "encode_upload_data",
    "parse_header",
    "safetensors_header",
    "same_host_socket",
    "split_chunk",
]

def same_host_socket(port: int) -> bytes:
    """The abstract Unix socket where the bulk data plane on TCP `port` also answers
    same-host sessions with shared memory segments (Linux; abstract names live in the
    network namespace, as loopback does)."""
    return b"\0tensorslice/bulk/%d" % port


SEGMENT_SEALS = 0x7  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW
"""The seals a same-host segment carries: nobody can resize it (a mapping never faults
past its end) or change its seals; it stays writable, for reuse."""

SESSION_MAGIC = b"tensorslice/shm\x01"
"""The first 16 bytes of a same-host session on the data plane's Unix socket (in place of
a ticket's token); the server answers `SHM_HELLO` and its instance id where it accepts the
session."""
SHM_HELLO = b"tensorslice/ok\x00\x02"
"""A server's greeting on a same-host session (version 2), followed by its instance id
(`INSTANCE_BYTES`): a client uses the session only where that id is the one the server it
calls announced (`INSTANCE_KEY`, `BulkTicket.instance`)."""
INSTANCE_BYTES = 16
"""Size of a server's instance id: random, made when its data plane starts."""
INSTANCE_KEY = "tensorslice-instance"
"""Trailing metadata beside `DATA_PORT_KEY`: the data plane's instance id, in hex."""
SHM_REQUEST = struct.Struct("<BI")
"""A session's request: op (1: redeem a ticket; 2: a whole call; `0x80` added: the
answer in a kept segment), the count of releases that follow (`SHM_RELEASE` each), then
the ticket's 16-byte token, or the call (see `tensorslice.server._shm`)."""
SHM_RELEASE = struct.Struct("<IQ")
"""A segment the client no longer uses: its id and the generation it was lent at."""
SHM_REPLY = struct.Struct("<BIQQQI")
"""A session's answer: kind, segment id (or status), generation, segment size, file size,
then that many `<I` ids of segments the server dropped (the client forgets them)."""
SHM_SEGMENT, SHM_BYTES, SHM_ERROR, SHM_KEPT = 0, 1, 2, 3
"""Reply kinds: the file is in the segment (its descriptor attached the first time); the
file follows on the socket (a small one, or no segment free); an error: the status in the
id's place, the length of the error's class name in the segment size's place (0: none; see
`tensorslice.core.errors.error_class_name`), then the class name and the UTF-8 message,
together as long as the file size says; the file is in a kept segment (its descriptor
attached; the server never writes it again, see `tensorslice.server._shm`)."""

DIRECT_MAGIC = b"tensorslice/req\x01"
"""The first 16 bytes of a direct request on the data plane (in place of a ticket's token):
one whole call, for clients that cannot use gRPC (a process forked from a gRPC user)."""

UPLOAD_END = b"tensorslice/end\x01"
"""What follows the data of an upload over the data plane (`OpenUpload`): where the server
reads anything else, the client sent more bytes than its header announced."""

DATA_PORT_KEY = "tensorslice-data-port"
"""Trailing metadata of `ListTensors` and `DescribeTensor`: the data plane's port."""
DATA_HOST_KEY = "tensorslice-data-host"
"""Trailing metadata beside `DATA_PORT_KEY`: the host the server advertises (`serve
--advertise-host`, else its bind host), where it has one."""

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
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("complex64", "C64"),
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


def dtype_name(dtype: torch.dtype | str) -> str:
    """``float32`` for ``torch.float32`` (or for ``"torch.float32"``, or ``"float32"``)."""
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


_TAG_UPLOAD_DATA = 0x22  # UploadChunk.data: field 4, wire type 2


def encode_upload_data(head: bytes, data: bytes | memoryview) -> bytes:
    """One serialized `UploadChunk`: `head` (its other fields, serialized, or b"") and
    `data` as its `data` field, copied once, straight into the frame."""
    size = len(data) if isinstance(data, bytes) else data.nbytes
    return b"".join((head, bytes((_TAG_UPLOAD_DATA,)), _varint(size), data))


def decode_chunk(frame: bytes) -> memoryview:
    """The `data` of a serialized `SliceChunk`, as a view of `frame` (no copy)."""
    return split_chunk(frame)[0]


def split_chunk(frame: bytes) -> tuple[memoryview, memoryview | None]:
    """The `data` of a serialized `SliceChunk` and its serialized `ticket` (a `BulkTicket`),
    or None when it has none; views of `frame` (no copy)."""
    view = memoryview(frame)
    end = len(frame)
    if end and frame[0] == _TAG_DATA:  # an inline answer: `data` alone, the common case
        size, pos = _read_varint(frame, 1)
        if pos + size == end:
            return view[pos:], None
    data = view[0:0]
    ticket: memoryview | None = None
    pos = 0
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


@functools.lru_cache(maxsize=256)
def parse_header(raw: bytes) -> tuple[tuple[TensorEntry, ...], tuple[tuple[str, str], ...]]:
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
