"""Uploads (`Put`, `Append`): a safetensors file holding one tensor, received in pieces and
written slab by slab into its final place.

The header is read and checked first (one tensor, a known dtype, offsets that say exactly
what the shape needs); only then is the tensor's memory counted in the store's budget and
allocated, on the store's device; the data that follows is copied straight into it (on a
CUDA store through one pinned staging slab: never a full extra host copy). A file that ends
early, runs on beyond its end, or lies in its header stores nothing.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from tensorslice.core.codec import dtype_from_code, dtype_name
from tensorslice.core.errors import InvalidSelection
from tensorslice.server._limits import shorten
from tensorslice.server._store import Storage

__all__ = ["MAX_HEADER_BYTES", "Upload", "parse_upload_header", "receive"]

MAX_HEADER_BYTES = 1 << 20
"""Largest safetensors header an upload may carry (its JSON: names, dtype, shape)."""
_STAGING_BYTES = 8 << 20


@dataclass(frozen=True)
class Upload:
    """What an upload's header declares."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    metadata: dict[str, str]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_upload_header(raw: bytes, what: str) -> Upload:
    """The one tensor a safetensors header declares; InvalidSelection naming what is
    wrong otherwise."""
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise InvalidSelection(f"{what}: the safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise InvalidSelection(f"{what}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise InvalidSelection(f"{what}: __metadata__ must map strings to strings")
    if len(header) != 1:
        raise InvalidSelection(
            f"{what}: the file must hold exactly one tensor; it holds {len(header)}"
        )
    ((key, info),) = header.items()
    if not isinstance(info, dict):
        raise InvalidSelection(f"{what}: the entry of {shorten(key, 80)!r} is not an object")
    code = info.get("dtype")
    dtype = dtype_from_code(code) if isinstance(code, str) else None
    if dtype is None:
        raise InvalidSelection(f"{what}: unsupported safetensors dtype {code!r}")
    shape = info.get("shape")
    if not (isinstance(shape, list) and all(type(s) is int and s >= 0 for s in shape)):
        raise InvalidSelection(f"{what}: shape {shape!r} is not a list of sizes >= 0")
    nbytes = math.prod(shape) * dtype.itemsize
    offsets = info.get("data_offsets")
    if offsets != [0, nbytes]:
        raise InvalidSelection(
            f"{what}: data_offsets {offsets!r} do not match shape {shape} of "
            f"{dtype_name(dtype)} ({nbytes} bytes: [0, {nbytes}] expected)"
        )
    return Upload(key, dtype, tuple(shape), metadata)


class _Reader:
    """Bytes taken in order from a stream of pieces."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self._it = iter(pieces)
        self._piece = b""
        self._off = 0
        self.received = 0

    def take_at(self, n: int) -> tuple[int, int] | None:
        """The address and length of up to `n` next bytes (at least one), or None at the
        end of the stream. The address is valid until the next call."""
        while self._off >= len(self._piece):
            piece = next(self._it, None)
            if piece is None:
                return None
            self._piece, self._off = bytes(piece), 0
        k = min(n, len(self._piece) - self._off)
        addr = ctypes.cast(ctypes.c_char_p(self._piece), ctypes.c_void_p).value
        assert addr is not None
        out = (addr + self._off, k)
        self._off += k
        self.received += k
        return out

    def take(self, n: int) -> bytes | None:
        """Up to `n` bytes (at least one), or None at the end of the stream."""
        at = self.take_at(n)
        if at is None:
            return None
        return self._piece[self._off - at[1] : self._off]

    def exactly(self, n: int, what: str) -> bytes:
        parts = []
        left = n
        while left:
            part = self.take(left)
            if part is None:
                raise InvalidSelection(
                    f"{what}: the upload ended after {self.received} bytes, inside the "
                    f"safetensors header ({n} bytes were due)"
                )
            parts.append(bytes(part))
            left -= len(part)
        return b"".join(parts)


def receive(pieces: Iterable[bytes], allocate: Callable[[Upload], Storage], what: str
            ) -> tuple[Upload, Storage]:
    """Read an uploaded safetensors file from `pieces`: header checked, then the storage
    `allocate` gives (counted in the budget, on the device) filled with the data, slab by
    slab. InvalidSelection when the file is malformed, short or long; nothing is kept."""
    r = _Reader(pieces)
    (hlen,) = struct.unpack("<Q", r.exactly(8, what))
    if hlen > MAX_HEADER_BYTES:
        raise InvalidSelection(
            f"{what}: a safetensors header of {hlen} bytes is larger than the "
            f"{MAX_HEADER_BYTES}-byte limit of an upload"
        )
    up = parse_upload_header(r.exactly(hlen, what), what)
    storage = allocate(up)
    try:
        _fill(r, storage.tensor, up.nbytes, what)
        if r.take(1) is not None:
            raise InvalidSelection(
                f"{what}: the upload runs on beyond the file's end (8 + {hlen} header "
                f"bytes and {up.nbytes} data bytes)"
            )
    except BaseException:
        storage.free()
        raise
    return up, storage


def _fill(r: _Reader, out: torch.Tensor, nbytes: int, what: str) -> None:
    """Copy the next `nbytes` of `r` into `out`'s memory, in order."""
    staging: torch.Tensor | None = None
    flat = out.reshape(-1).view(torch.uint8) if nbytes else None
    if out.device.type != "cpu" and nbytes:
        staging = torch.empty(min(nbytes, _STAGING_BYTES), dtype=torch.uint8,
                              pin_memory=torch.cuda.is_available())
    pos = 0
    staged = 0
    while pos < nbytes:
        want = nbytes - pos - staged
        if staging is not None:
            want = min(want, staging.numel() - staged)
        part = r.take_at(want)
        if part is None:
            raise InvalidSelection(
                f"{what}: the upload ended after {pos + staged} of the {nbytes} data "
                f"bytes its header declares"
            )
        src, k = part
        if staging is None:
            ctypes.memmove(out.data_ptr() + pos, src, k)
            pos += k
        else:
            ctypes.memmove(staging.data_ptr() + staged, src, k)
            staged += k
            if staged == staging.numel() or pos + staged == nbytes:
                assert flat is not None
                flat[pos : pos + staged].copy_(staging[:staged])
                pos += staged
                staged = 0
