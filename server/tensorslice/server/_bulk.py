"""The bulk data plane: large results over a plain TCP connection, beside gRPC.

gRPC Python copies every streamed byte several times (into a `bytes` frame, into a gRPC
slice, out of one on the client, into the result); a socket moves the same bytes with one
copy on each side. For a large result the unary `Fetch` call answers with a ticket (a port,
a one-time random token and the file's size) instead of data; the client connects to that
port, sends the token, and receives the safetensors file, which the server writes with
`sendall` straight from the tensor's memory (or from its reused slab buffers). A ticket not
redeemed within `ticket_timeout` seconds expires and its result is dropped.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterable

__all__ = ["TOKEN_BYTES", "BulkServer"]

log = logging.getLogger("tensorslice.server")

TOKEN_BYTES = 16


class _Transfer:
    def __init__(self, pieces: Iterable[bytes | memoryview], nbytes: int, expires: float
                 ) -> None:
        self.pieces = pieces
        self.nbytes = nbytes
        self.expires = expires


class BulkServer:
    """Accepts bulk connections on `host:port`; a connection that presents the token of a
    pending transfer receives that transfer's bytes, anything else is dropped."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 ticket_timeout: float = 60.0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host.strip("[]"), port), family=family)
        self._listener.settimeout(0.5)
        self.port: int = self._listener.getsockname()[1]
        self.ticket_timeout = ticket_timeout
        self._pending: dict[bytes, _Transfer] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="bulk-accept",
                                        daemon=True)
        self.sent = 0  # transfers completed (for tests and logs)

    def start(self) -> BulkServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            self._pending.clear()

    def offer(self, pieces: Iterable[bytes | memoryview], nbytes: int) -> bytes:
        """Hold a transfer of `nbytes` (produced lazily by `pieces`); its token."""
        token = secrets.token_bytes(TOKEN_BYTES)
        with self._lock:
            self._pending[token] = _Transfer(pieces, nbytes,
                                             time.monotonic() + self.ticket_timeout)
        return token

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._lock:
            stale = [t for t, x in self._pending.items() if x.expires < now]
            for t in stale:
                del self._pending[t]
        if stale:
            log.warning("%d bulk ticket(s) expired unredeemed", len(stale))

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            self._expire()
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.05)
                continue
            threading.Thread(target=self._serve, args=(sock,), name="bulk-send",
                             daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        with sock:
            try:
                sock.settimeout(10)
                token = b""
                while len(token) < TOKEN_BYTES:
                    part = sock.recv(TOKEN_BYTES - len(token))
                    if not part:
                        raise ConnectionError("closed before sending a token")
                    token += part
                with self._lock:
                    transfer = self._pending.pop(token, None)
                if transfer is None:
                    raise ConnectionError("unknown or expired token")
                sock.settimeout(self.ticket_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sent = 0
                for piece in transfer.pieces:
                    sock.sendall(piece)
                    sent += len(piece)
                if sent != transfer.nbytes:
                    raise RuntimeError(f"sent {sent} of {transfer.nbytes} bytes")
                self.sent += 1
            except (OSError, ConnectionError) as exc:
                log.info("bulk connection dropped: %s", exc)
            except Exception:
                log.exception("bulk transfer failed")
