"""A result's payloads as one safetensors file: raw pieces (for the bulk data plane), the
whole file written into the caller's memory (a same-host segment), or `SliceChunk` frames
(for the gRPC stream)."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from tensorslice.core.codec import encode_chunk, safetensors_header
from tensorslice.server._payload import DEFAULT_POOL, BufferPool, Payload
from tensorslice.server._staging import host_chunks

__all__ = ["CHUNK_BYTES", "SLAB_BYTES", "WholeFile", "file_header", "file_nbytes", "frames",
           "pieces"]

CHUNK_BYTES = 2 << 20
"""Payload bytes per `SliceChunk` (see README, "Transport")."""
SLAB_BYTES = 4 << 20
"""Bytes a strided copy or a row gather writes per step into its reused buffer."""
_COALESCE = 64 << 10  # pieces smaller than this share a frame with their neighbours


def _ordered(payloads: Sequence[Payload]) -> list[Payload]:
    # Largest item size first, so that every tensor starts 8-byte aligned.
    return sorted(payloads, key=lambda p: -p.dtype.itemsize)


def _header(payloads: Sequence[Payload], metadata: Mapping[str, str]) -> bytes:
    return _cached_header(tuple((p.name, p.dtype, p.shape) for p in payloads),
                          tuple(metadata.items()))


@functools.lru_cache(maxsize=1024)
def _cached_header(
    tensors: tuple[tuple[str, torch.dtype, tuple[int, ...]], ...],
    metadata: tuple[tuple[str, str], ...],
) -> bytes:
    # The same plan served again makes the same header: build its JSON once.
    header, _ = safetensors_header(tensors, dict(metadata))
    return header


def file_header(
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> bytes:
    """The header `pieces` starts the file of tensors of these names, dtypes and shapes
    with."""
    ordered = sorted(tensors, key=lambda t: -t[1].itemsize)
    return _cached_header(tuple(ordered), tuple(metadata.items()))


def file_nbytes(
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str]
) -> int:
    """The size of the file `pieces` makes of tensors of these names, dtypes and shapes:
    known from a plan, before any data moves."""
    header = file_header(tensors, metadata)
    return len(header) + sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in tensors)


def pieces(
    payloads: Sequence[Payload],
    metadata: Mapping[str, str],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    slab_bytes: int = SLAB_BYTES,
    pool: BufferPool = DEFAULT_POOL,
) -> Iterator[bytes | memoryview]:
    """The bytes of the file, in order: the header, then each tensor's bytes read from its
    own memory (or a reused slab buffer). A memoryview is valid until the next piece."""
    return iter(WholeFile(payloads, metadata, chunk_bytes=chunk_bytes, slab_bytes=slab_bytes,
                          pool=pool))


class WholeFile:
    """A result's file, produced on demand one of two ways: iterated, its pieces in order
    (the header, then each tensor's bytes from its own memory or a reused slab buffer; a
    memoryview is valid until the next piece), for a socket; or `write_into` memory the
    caller gives, where a gather writes its rows straight in (no slab buffer, no second
    pass). `nbytes` is known before any data moves. `keep` is held as long as the file is
    (what its payloads read: a planned result's versions)."""

    def __init__(self, payloads: Sequence[Payload], metadata: Mapping[str, str], *,
                 chunk_bytes: int = CHUNK_BYTES, slab_bytes: int = SLAB_BYTES,
                 pool: BufferPool = DEFAULT_POOL, keep: object = None) -> None:
        self._ordered = _ordered(payloads)
        self.header = _header(self._ordered, metadata)
        self.nbytes = len(self.header) + sum(p.nbytes for p in self._ordered)
        self._chunk_bytes = chunk_bytes
        self._slab_bytes = slab_bytes
        self._pool = pool
        self._keep = keep

    def __iter__(self) -> Iterator[bytes | memoryview]:
        yield self.header
        for p in self._ordered:
            yield from host_chunks(p.slabs(self._slab_bytes, self._pool), self._chunk_bytes)

    def write_into(self, out: memoryview) -> None:
        """Write the whole file at the start of `out` (writable, at least `nbytes`, 8-byte
        aligned so that every tensor's data is aligned for its dtype)."""
        if len(out) < self.nbytes:
            raise ValueError(f"a {len(out)}-byte buffer cannot hold a {self.nbytes}-byte file")
        head = len(self.header)
        out[:head] = self.header
        dest = torch.frombuffer(out, dtype=torch.uint8, count=self.nbytes)
        at = head
        for p in self._ordered:
            start, end = at, at + p.nbytes
            if not p.write_into(dest[start:end], self._slab_bytes, self._pool):
                for piece in host_chunks(p.slabs(self._slab_bytes, self._pool),
                                         self._chunk_bytes):
                    out[at : at + len(piece)] = piece
                    at += len(piece)
                if at != end:
                    raise RuntimeError(f"tensor {p.name!r} gave {at - start} of {p.nbytes} "
                                       f"bytes")
            at = end


def frames(
    payloads: Sequence[Payload],
    metadata: Mapping[str, str],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    slab_bytes: int = SLAB_BYTES,
    pool: BufferPool = DEFAULT_POOL,
) -> Iterator[bytes]:
    """Serialized `SliceChunk` messages whose payloads concatenate to the file.

    Small pieces (the header, small results) are gathered into one frame; large pieces
    are copied once, from the tensor's memory (or a reused slab buffer) into the frame.
    """
    small = bytearray()
    for piece in pieces(payloads, metadata, chunk_bytes=chunk_bytes, slab_bytes=slab_bytes,
                        pool=pool):
        if len(piece) < _COALESCE and len(small) + len(piece) <= chunk_bytes:
            small += piece
            continue
        if small:
            yield encode_chunk(bytes(small))
            small = bytearray()
        yield encode_chunk(piece)
    if small:
        yield encode_chunk(bytes(small))
