"""Server settings, with explicit defaults."""

from __future__ import annotations

from tensorslice.server._stream import CHUNK_BYTES, SLAB_BYTES

__all__ = ["ServerConfig"]


class ServerConfig:
    """Server settings, with explicit defaults."""

    def __init__(
        self,
        *,
        max_result_bytes: int = 64 << 30,
        chunk_bytes: int = CHUNK_BYTES,
        slab_bytes: int = SLAB_BYTES,
        max_workers: int = 16,
        unary_max_bytes: int = 1 << 20,
        bulk: bool = True,
        bulk_port: int = 0,
        ticket_timeout: float = 60.0,
    ) -> None:
        self.max_result_bytes = max_result_bytes
        self.chunk_bytes = chunk_bytes
        self.slab_bytes = slab_bytes
        self.max_workers = max_workers
        self.unary_max_bytes = unary_max_bytes
        """Largest result `Fetch` returns inline, in one response message."""
        self.bulk = bulk
        """Run the bulk data plane (a TCP listener on the gRPC host) for large results."""
        self.bulk_port = bulk_port
        """Its port; 0 picks a free one (clients learn it from their tickets)."""
        self.ticket_timeout = ticket_timeout
