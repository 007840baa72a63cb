"""A result's payloads as the frames of a `Slice` response: one safetensors file."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from tensorslice.client._wire import encode_chunk, safetensors_header
from tensorslice.server._payload import DEFAULT_POOL, BufferPool, Payload
from tensorslice.server._staging import host_chunks

__all__ = ["CHUNK_BYTES", "SLAB_BYTES", "frames"]

CHUNK_BYTES = 1 << 20
"""Payload bytes per `SliceChunk` (see README, "Chunk size")."""
SLAB_BYTES = 4 << 20
"""Bytes a strided copy or a row gather writes per step into its reused buffer."""
_COALESCE = 64 << 10  # pieces smaller than this share a frame with their neighbours


def frames(
    payloads: Sequence[Payload],
    metadata: Mapping[str, str],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    slab_bytes: int = SLAB_BYTES,
    pool: BufferPool = DEFAULT_POOL,
) -> Iterator[bytes]:
    """Serialized `SliceChunk` messages whose payloads concatenate to one safetensors file.

    Tensors are written largest item size first, so every tensor starts 8-byte aligned.
    Small pieces (the header, small results) are gathered into one frame; large pieces
    are copied once, from the tensor's memory (or a reused slab buffer) into the frame.
    """
    ordered = sorted(payloads, key=lambda p: -p.dtype.itemsize)
    header, _ = safetensors_header(((p.name, p.dtype, p.shape) for p in ordered), metadata)
    small = bytearray(header)
    for p in ordered:
        for piece in host_chunks(p.slabs(slab_bytes, pool), chunk_bytes):
            if len(piece) < _COALESCE and len(small) + len(piece) <= chunk_bytes:
                small += piece
                continue
            if small:
                yield encode_chunk(bytes(small))
                small = bytearray()
            yield encode_chunk(piece)
    if small:
        yield encode_chunk(bytes(small))
