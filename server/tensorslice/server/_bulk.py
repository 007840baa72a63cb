"""The bulk data plane: large results over a plain TCP connection, beside gRPC.

gRPC Python copies every streamed byte several times (into a `bytes` frame, into a gRPC
slice, out of one on the client, into the result); a socket moves the same bytes with one
copy on each side. For a large result the unary `Fetch` call answers with a ticket (a port,
a one-time random token and the file's size) instead of data; the client connects to that
port, sends the token, and receives the safetensors file, which the server writes with
`sendall` straight from the tensor's memory (or from its reused slab buffers).

Guarantees:

- Bounded tickets: at most `max_tickets` pending, holding at most `max_ticket_bytes` of
  materialised results; an offer beyond either is refused (UNAVAILABLE, retry shortly). A
  ticket not redeemed within `ticket_timeout` seconds expires; what it held is given back.
- Bounded connections: at most `max_connections` open at once, handshaking or sending;
  more are closed on accept. Handshakes need no thread: one thread accepts and reads every
  token through a selector, and a connection must present its whole token within
  `handshake_timeout` seconds of being accepted (not per read), or it is closed. Only a
  connection with a valid token gets a sending thread.
- A reader that takes no data for `send_timeout` seconds is dropped.
- `stop(grace)` issues no more tickets, keeps redeeming the pending ones and lets transfers
  in flight finish, for up to `grace` seconds; then it cuts what is left.
- Bad tokens are counted, logged at debug level, and summarised at most once a minute.
- Tickets come only from calls that passed the gRPC port's authentication, and each is
  redeemed at most once. With an `ssl` context (the server's TLS certificate), every
  connection completes a TLS handshake before its token is read, within the same
  handshake deadline, and the file travels encrypted.

Same-host sessions: on Linux without TLS the plane also listens on the abstract Unix
socket `same_host_socket(port)`, where a connection must present `SESSION_MAGIC` in place
of a token; the server answers `SHM_HELLO` and its `instance` id, and the connection
becomes a session of its own thread (see `_shm`), which redeems tickets into pooled
shared-memory segments and answers whole calls. Sessions are bounded by `max_connections`
apart from the connections above, and count as sending while they serve a request.

Direct requests: a connection that presents `DIRECT_MAGIC` in place of a token carries
whole calls (what a client in a process forked from a gRPC user sends: gRPC cannot be used
there): the ``authorization`` value gRPC calls carry (``<H`` length; empty for none), the
method's name (``<H`` length, ASCII) and its serialized request (``<Q`` length, at most
`MAX_DIRECT_REQUEST_BYTES`), all within the handshake deadline (plus a second per 64 MiB of
request). The service checks the token as its gRPC port does. The answer is ``<BQ``: a
status (0 for OK, else the `Status` number) and a length, then that many bytes: the
response (the safetensors file for `Slice`/`SliceMany`/`Fetch`/`FetchMany`, the serialized
response message for the unary methods) or, on an error, its UTF-8 message. After an
answer the connection may carry the next call, `DIRECT_MAGIC` first again, within
`DIRECT_IDLE_SECONDS` (a DataLoader worker keeps one connection for its epoch); it is closed
after that, or at once by a stopping server. Such a connection counts against
`max_connections` like a transfer, idle or not (over TLS where the plane has TLS); a
stopping server answers UNAVAILABLE.

Uploads: `offer_upload` issues a ticket whose connection is received rather than sent to
(`UploadReceiver`, `tensorslice.server._bulk_upload`); it counts against the same bounds
(`max_tickets` pending, `max_connections` open, `ticket_timeout` to be redeemed, each read
within `send_timeout`), and what it reserved is given back however it ends.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from tensorslice.core.codec import (
    DIRECT_MAGIC,
    INSTANCE_BYTES,
    SESSION_MAGIC,
    SHM_HELLO,
    same_host_socket,
)
from tensorslice.core.errors import InvalidSelection, ServerUnavailable, Status, TensorSliceError
from tensorslice.server._limits import Hold, machine_memory
from tensorslice.server._shm import (
    Redeemed,
    ShmBudget,
    ShmSession,
    default_shm_bytes,
    peer_uid,
    recv_exact,
)

__all__ = ["DIRECT_IDLE_SECONDS", "MAX_DIRECT_REQUEST_BYTES", "TOKEN_BYTES", "BulkServer",
           "DirectAnswer", "DirectHandler", "UploadReceiver"]

log = logging.getLogger("tensorslice.server")

TOKEN_BYTES = 16
_TICK = 0.1  # seconds between checks of deadlines and expiries
_REPORT_EVERY = 60.0
MAX_DIRECT_REQUEST_BYTES = 256 << 20
DIRECT_IDLE_SECONDS = 30.0
"""How long a direct connection waits, idle, for its client's next call."""
_DIRECT_BYTES_PER_SECOND = 64 << 20  # request bytes a direct request's deadline grants
_MAX_ERROR_BYTES = 4096

Pieces = Iterable[bytes | memoryview]
DirectAnswer = tuple[Pieces, int, Callable[[], None]]
"""A direct call's answer: its pieces, their size, and what to call once sent (or not)."""
DirectHandler = Callable[[str, bytes, bytes], DirectAnswer]
"""Runs one direct call: (method, authorization value, serialized request) -> its answer;
raises `TensorSliceError` to answer with its status."""
_SEND_STEP = 1 << 20  # seconds between summaries of refused connections


class UploadReceiver(Protocol):
    """What an upload ticket's connection is given to (`offer_upload`)."""

    def receive(self, sock: socket.socket, timeout: float | None) -> bool:
        """Receive, store and answer on `sock` (blocking; `timeout` bounds each read);
        True when stored. Answers its own errors."""

    def release(self) -> None:
        """Give back what the upload reserved, unless stored (idempotent)."""


class _Transfer:
    def __init__(self, pieces: Iterable[bytes | memoryview], nbytes: int, expires: float,
                 hold: Hold | None, upload: UploadReceiver | None = None) -> None:
        self.pieces = pieces
        self.nbytes = nbytes
        self.expires = expires
        self.hold = hold
        self.upload = upload

    def release(self) -> None:
        if self.hold is not None:
            self.hold.release()
        if self.upload is not None:
            self.upload.release()


class _Handshake:
    def __init__(self, deadline: float, secure: bool) -> None:
        self.token = b""
        self.deadline = deadline
        self.secure = secure  # the TLS handshake is done (or there is none)


class BulkServer:
    """Accepts bulk connections on `host:port`; a connection that presents the token of a
    pending transfer receives that transfer's bytes, anything else is dropped."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 ticket_timeout: float = 15.0, max_tickets: int = 256,
                 max_ticket_bytes: int = 0, max_connections: int = 64,
                 handshake_timeout: float = 5.0, send_timeout: float = 10.0,
                 ssl_context: ssl.SSLContext | None = None, same_host: bool = True,
                 shm_max_bytes: int | None = None, shm_peer_uid: int | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host.strip("[]"), port), family=family,
                                              backlog=128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self.instance = secrets.token_bytes(INSTANCE_BYTES)
        """This plane's instance id (random, made once): announced beside its port and in
        its tickets, and sent in every same-host session's greeting, so that a client uses
        a session only with the server it calls (another server's socket at the same name,
        on this host or in its network namespace, gets no call of it)."""
        self.ticket_timeout = ticket_timeout
        self.max_tickets = max_tickets
        self.max_ticket_bytes = max_ticket_bytes
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.direct: DirectHandler | None = None  # set by the service that answers them
        self.advertised_host = ""
        """The host tickets and announcements name (`ServerConfig.advertise_host`, else
        the bind host where it is one address); "": none, the client uses the host it
        called."""
        self.ssl_context = ssl_context
        """TLS for every connection (the gRPC port's certificate), or None for plain TCP."""
        self._pending: dict[bytes, _Transfer] = {}
        self._held = 0  # materialised bytes of pending tickets
        self._lock = threading.Lock()
        self._handshakes: dict[socket.socket, _Handshake] = {}
        self._sending: set[socket.socket] = set()
        self._idle: set[socket.socket] = set()  # kept direct connections between calls
        self._senders: set[threading.Thread] = set()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._local: socket.socket | None = None
        """The same-host listener (see `same_host_socket`), or None: off, TLS, not Linux,
        or its name taken."""
        self.shm: ShmBudget | None = None
        """The bound and counters of same-host sessions (see `_shm`), or None: none."""
        self._sessions: set[socket.socket] = set()
        self._shm_peer_uid = shm_peer_uid
        if same_host and ssl_context is None and hasattr(os, "memfd_create"):
            self._local = _local_listener(self.port)
            if self._local is not None:
                self._selector.register(self._local, selectors.EVENT_READ)
                self.shm = ShmBudget(
                    default_shm_bytes(machine_memory()) if shm_max_bytes is None
                    else shm_max_bytes, max_sessions=max_connections)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping = False
        self._drain_until = 0.0
        self._thread = threading.Thread(target=self._loop, name="bulk-accept", daemon=True)
        self.sent = 0  # transfers completed (for tests and logs)
        self.refused = 0  # connections closed: over the limit, bad token or too slow
        self.expired = 0  # tickets that expired unredeemed
        self.bytes_sent = 0  # bytes of completed and partial transfers
        self.shared = 0  # transfers completed in same-host segments (part of `sent`)
        self.received = 0  # uploads received and stored
        self._reported = (0.0, 0)

    # ---------------------------------------------------------------- tickets

    def start(self) -> BulkServer:
        self._thread.start()
        return self

    def offer(self, pieces: Iterable[bytes | memoryview], nbytes: int,
              hold: Hold | None = None) -> bytes:
        """Hold a transfer of `nbytes` (produced lazily by `pieces`; `hold` is the memory
        it keeps, which the transfer owns from now on and gives back once it is sent or
        expires); its token. Raises ServerUnavailable, having given `hold` back, when the
        tickets' bounds are reached or the server stops."""
        try:
            return self._offer(pieces, nbytes, hold)
        except BaseException:
            if hold is not None:
                hold.release()
            raise

    def _offer(self, pieces: Iterable[bytes | memoryview], nbytes: int,
               hold: Hold | None) -> bytes:
        held = hold.nbytes if hold is not None else 0
        with self._lock:
            self._check_room(held)
            token = secrets.token_bytes(TOKEN_BYTES)
            self._pending[token] = _Transfer(pieces, nbytes,
                                             time.monotonic() + self.ticket_timeout, hold)
            self._held += held
        return token

    def offer_upload(self, upload: UploadReceiver, nbytes: int) -> bytes:
        """Hold an upload of `nbytes`, which `upload` receives once its token is presented
        (and releases, as it does if the ticket expires or the server stops first); its
        token. Raises ServerUnavailable, having released `upload`, when the tickets'
        bounds are reached or the server stops."""
        try:
            with self._lock:
                self._check_room(0)
                token = secrets.token_bytes(TOKEN_BYTES)
                self._pending[token] = _Transfer((), nbytes,
                                                 time.monotonic() + self.ticket_timeout,
                                                 None, upload)
            return token
        except BaseException:
            upload.release()
            raise

    def check_room(self, held: int) -> None:
        """Raise ServerUnavailable, as `offer` would, where a ticket holding `held` bytes
        would not fit now: a caller may ask before it builds the result."""
        with self._lock:
            self._check_room(held)

    def _check_room(self, held: int) -> None:
        if self._stopping:
            raise ServerUnavailable("server shutting down: no new bulk transfers")
        if len(self._pending) >= self.max_tickets:
            raise ServerUnavailable(
                f"server busy: {len(self._pending)} bulk tickets await redemption, the "
                f"limit of {self.max_tickets} (max_pending_tickets, serve "
                f"--max-pending-tickets); retry shortly"
            )
        if self.max_ticket_bytes and held and self._held + held > self.max_ticket_bytes:
            raise ServerUnavailable(
                f"server busy: bulk tickets hold {self._held} bytes and this result "
                f"{held} more, beyond the limit of {self.max_ticket_bytes} "
                f"(max_ticket_bytes, serve --max-ticket-bytes); retry shortly"
            )

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    @property
    def sending(self) -> int:
        """Transfers sending now."""
        with self._lock:
            return len(self._sending)

    @property
    def sessions(self) -> int:
        """Same-host sessions open now (see `_shm`)."""
        with self._lock:
            return len(self._sessions)

    @property
    def connections(self) -> int:
        """Connections open now: handshaking, sending, or kept between direct calls."""
        with self._lock:
            return len(self._handshakes) + len(self._sending) + len(self._idle)

    def _take(self, token: bytes) -> _Transfer | None:
        with self._lock:
            transfer = self._pending.pop(token, None)
            if transfer is not None and transfer.hold is not None:
                self._held -= transfer.hold.nbytes
            return transfer

    def _expire(self, now: float) -> None:
        with self._lock:
            stale = [t for t, x in self._pending.items() if x.expires < now]
            gone = [self._pending.pop(t) for t in stale]
            self._held -= sum(x.hold.nbytes for x in gone if x.hold is not None)
        for x in gone:
            x.release()
        if gone:
            with self._lock:
                self.expired += len(gone)
            log.warning("%d bulk ticket(s) expired unredeemed after %gs (ticket_timeout)",
                        len(gone), self.ticket_timeout)

    # ---------------------------------------------------------------- stopping

    @property
    def same_host(self) -> bool:
        """Whether clients on this host may receive results as shared segments."""
        return self._local is not None

    def stop(self, grace: float | None = None) -> None:
        """Issue no more tickets; pending ones may still be redeemed and transfers finish
        for `grace` seconds (None or 0: none); then close everything."""
        with self._lock:
            self._stopping = True
            self._drain_until = time.monotonic() + (grace or 0)
            idle = list(self._idle)
        for sock in idle:  # kept direct connections between calls: nothing to finish
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake()
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._close_all()
        with self._lock:
            cut = list(self._sending)
            senders = list(self._senders)
        for sock in cut:  # past the grace period: cut transfers still running
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in senders:
            t.join(timeout=5)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _drained(self, now: float) -> bool:
        with self._lock:
            idle = not self._pending and not self._sending
            return idle or now >= self._drain_until

    def _close_all(self) -> None:
        for sock in list(self._handshakes):
            self._drop(sock)
        try:
            self._selector.close()
        except (OSError, ValueError):
            pass
        self._listener.close()
        if self._local is not None:
            self._local.close()
        with self._lock:
            sessions = list(self._sessions)
        for sock in sessions:  # wakes each session's thread, which frees its segments
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wake_r.close()
        self._wake_w.close()
        with self._lock:
            gone = list(self._pending.values())
            self._pending.clear()
            self._held = 0
        for x in gone:
            x.release()

    # ---------------------------------------------------------------- the loop

    def _loop(self) -> None:
        try:
            while True:
                now = time.monotonic()
                with self._lock:
                    stopping = self._stopping
                if stopping and self._drained(now):
                    return
                for key, _ in self._selector.select(_TICK):
                    sock = key.fileobj
                    if sock is self._listener or sock is self._local:
                        assert isinstance(sock, socket.socket)
                        self._accept(sock)
                    elif sock is self._wake_r:
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                    else:
                        assert isinstance(sock, socket.socket)
                        self._read_token(sock)
                now = time.monotonic()
                for sock, h in list(self._handshakes.items()):
                    if now > h.deadline:
                        self._refuse(sock, f"no whole token within {self.handshake_timeout}s")
                self._expire(now)
                self._report(now)
        except Exception:
            log.exception("bulk data plane failed")
        finally:
            self._close_all()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: try again later
                log.warning("bulk data plane cannot accept: %s", exc)
                return
            with self._lock:
                full = (len(self._handshakes) + len(self._sending) + len(self._idle)
                        >= self.max_connections)
            if full:
                self.refused += 1
                log.debug("bulk connection refused: %d open, the limit "
                          "(max_bulk_connections)", self.max_connections)
                sock.close()
                continue
            sock.setblocking(False)
            if self.ssl_context is not None and listener is self._listener:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                        do_handshake_on_connect=False)
                except (OSError, ValueError) as exc:
                    self._refuse(sock, f"TLS setup failed: {exc}")
                    continue
            with self._lock:
                self._handshakes[sock] = _Handshake(time.monotonic() + self.handshake_timeout,
                                                    secure=self.ssl_context is None)
            self._selector.register(sock, selectors.EVENT_READ)

    def _read_token(self, sock: socket.socket) -> None:
        h = self._handshakes.get(sock)
        if h is None:
            return
        if not h.secure:
            assert isinstance(sock, ssl.SSLSocket)
            try:
                sock.do_handshake()
            except ssl.SSLWantReadError:
                self._selector.modify(sock, selectors.EVENT_READ)
                return
            except ssl.SSLWantWriteError:
                self._selector.modify(sock, selectors.EVENT_WRITE)
                return
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                self._refuse(sock, f"TLS handshake failed: {exc}")
                return
            h.secure = True
            self._selector.modify(sock, selectors.EVENT_READ)
        while len(h.token) < TOKEN_BYTES:
            try:
                part = sock.recv(TOKEN_BYTES - len(h.token))
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:  # a TLS renegotiation wants to write first
                self._selector.modify(sock, selectors.EVENT_WRITE)
                return
            except OSError as exc:
                self._refuse(sock, f"read failed: {exc}")
                return
            if not part:
                self._refuse(sock, "closed before sending a whole token")
                return
            h.token += part
        if sock.family == socket.AF_UNIX:
            if h.token == SESSION_MAGIC and self.shm is not None:
                self._start_session(sock, self.shm)
            else:
                self._refuse(sock, "not a same-host session")
            return
        if h.token == DIRECT_MAGIC and self.direct is not None:
            self._hand_over(sock, self._serve_direct, (sock, self.direct, h.deadline))
            return
        transfer = self._take(h.token)
        if transfer is None:
            self._refuse(sock, "unknown or expired token")
            return
        if transfer.upload is not None:
            self._hand_over(sock, self._receive, (sock, transfer, transfer.upload))
            return
        self._hand_over(sock, self._send, (sock, transfer))

    def _hand_over(self, sock: socket.socket, target: Callable[..., None],
                   args: tuple[object, ...]) -> None:
        """From the handshake loop to a thread of its own (counted as sending)."""
        self._selector.unregister(sock)
        thread = threading.Thread(target=target, args=args, name="bulk-send", daemon=True)
        with self._lock:
            del self._handshakes[sock]
            self._sending.add(sock)
            self._senders.add(thread)
        thread.start()

    def _drop(self, sock: socket.socket) -> None:
        try:
            self._selector.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        with self._lock:
            self._handshakes.pop(sock, None)
        sock.close()

    def _refuse(self, sock: socket.socket, why: str) -> None:
        self.refused += 1
        log.debug("bulk connection dropped: %s", why)
        self._drop(sock)

    def _report(self, now: float) -> None:
        last, count = self._reported
        if self.refused > count and now - last >= _REPORT_EVERY:
            log.warning("bulk data plane: %d connection(s) refused or dropped since the "
                        "last report (over max_bulk_connections, bad tokens or too slow)",
                        self.refused - count)
            self._reported = (now, self.refused)

    # ---------------------------------------------------------------- sending

    def _send(self, sock: socket.socket, transfer: _Transfer) -> None:
        try:
            with sock:
                sock.setblocking(True)
                self._send_pieces(sock, transfer.pieces, transfer.nbytes)
        except OSError as exc:
            log.info("bulk transfer dropped: %s", exc)
        except Exception:
            log.exception("bulk transfer failed")
        finally:
            self._done(sock, transfer)

    def _receive(self, sock: socket.socket, transfer: _Transfer, upload: UploadReceiver
                 ) -> None:
        """An upload's connection: `upload` receives, stores and answers."""
        try:
            with sock:
                sock.setblocking(True)
                if upload.receive(sock, self.send_timeout or None):
                    with self._lock:
                        self.received += 1
        except Exception:
            log.exception("bulk upload failed")
        finally:
            self._done(sock, transfer)

    def _done(self, sock: socket.socket, transfer: _Transfer) -> None:
        """A transfer's connection is finished, either way: its memory and slot come back."""
        transfer.release()
        with self._lock:
            self._sending.discard(sock)
            self._senders.discard(threading.current_thread())
        self._wake()

    def _send_pieces(self, sock: socket.socket, pieces: Pieces, nbytes: int) -> None:
        # The timeout bounds each `sendall` of at most _SEND_STEP bytes: a reader that
        # stops is dropped, a slow one that keeps reading is not.
        sock.settimeout(self.send_timeout or None)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sent = 0
        for piece in pieces:
            view = memoryview(piece)
            for at in range(0, len(view), _SEND_STEP):
                sock.sendall(view[at : at + _SEND_STEP])
            sent += len(view)
            with self._lock:
                self.bytes_sent += len(view)
        if sent != nbytes:
            raise RuntimeError(f"sent {sent} of {nbytes} bytes")
        with self._lock:
            self.sent += 1

    # ---------------------------------------------------------------- same-host sessions

    def _start_session(self, sock: socket.socket, budget: ShmBudget) -> None:
        """From the handshake loop to a session thread of its own (see `_shm`); refused
        (the client then uses TCP) beyond `max_sessions` or from a peer of another user
        where the server checks (`shm_peer_uid`)."""
        try:
            foreign = (self._shm_peer_uid is not None
                       and peer_uid(sock) != self._shm_peer_uid)
        except OSError:
            foreign = True
        if foreign:
            self._refuse(sock, "same-host session from a peer of another user")
            return
        if not budget.open_session():
            self._refuse(sock, f"same-host sessions at their limit of {budget.max_sessions}")
            return
        self._selector.unregister(sock)
        thread = threading.Thread(target=self._session, args=(sock, budget),
                                  name="bulk-session", daemon=True)
        with self._lock:
            del self._handshakes[sock]
            self._sessions.add(sock)
            self._senders.add(thread)
        thread.start()

    def _session(self, sock: socket.socket, budget: ShmBudget) -> None:
        def busy(on: bool) -> None:
            with self._lock:
                if on:
                    self._sending.add(sock)
                else:
                    self._sending.discard(sock)

        try:
            with sock:
                sock.setblocking(True)
                sock.settimeout(self.handshake_timeout)
                sock.sendall(SHM_HELLO + self.instance)
                ShmSession(sock, budget, self._redeem, busy, self._count_sent,
                           self.handshake_timeout, self.send_timeout,
                           call=self._session_call if self.direct is not None else None).run()
        except (OSError, ConnectionError) as exc:
            log.info("same-host session closed: %s", exc)
        except Exception:
            log.exception("same-host session failed")
        finally:
            budget.close_session()
            with self._lock:
                self._sessions.discard(sock)
                self._sending.discard(sock)
                self._senders.discard(threading.current_thread())
            self._wake()

    def _session_call(self, method: str, auth: bytes, request: bytes) -> Redeemed:
        """A whole call over a session (a forked client's), as a direct request's."""
        with self._lock:
            stopping = self._stopping
        if stopping or self.direct is None:
            raise ServerUnavailable("the server is shutting down; retry shortly")
        return self.direct(method, auth, request)

    def _redeem(self, token: bytes) -> Redeemed | None:
        transfer = self._take(token)
        if transfer is None:
            return None
        if transfer.upload is not None:  # an upload's token: uploads come over TCP only
            transfer.release()
            return None
        return transfer.pieces, transfer.nbytes, transfer.release

    def _count_sent(self, nbytes: int, shared: bool) -> None:
        with self._lock:
            self.bytes_sent += nbytes
            self.sent += 1
            self.shared += shared

    # ---------------------------------------------------------------- direct requests

    def _serve_direct(self, sock: socket.socket, handler: DirectHandler, deadline: float
                      ) -> None:
        """Direct calls on one connection, one after another (see the module's docstring):
        after each answer the connection waits, idle, for the client's next request."""
        try:
            with sock:
                sock.setblocking(True)
                while self._direct_call(sock, handler, deadline):
                    if not self._next_direct(sock):
                        return
                    deadline = time.monotonic() + self.handshake_timeout
        except (OSError, ConnectionError) as exc:
            log.info("direct request dropped: %s", exc)
        except Exception:
            log.exception("direct request failed")
        finally:
            with self._lock:
                self._sending.discard(sock)
                self._idle.discard(sock)
                self._senders.discard(threading.current_thread())
            self._wake()

    def _next_direct(self, sock: socket.socket) -> bool:
        """Wait, idle (not counted as sending: a stopping server closes it at once), at most
        `DIRECT_IDLE_SECONDS` for the next direct request on `sock`: True once its
        `DIRECT_MAGIC` has arrived; False where the client closed, went quiet, sent
        anything else, or the server is stopping."""
        with self._lock:
            if self._stopping:
                return False
            self._sending.discard(sock)
            self._idle.add(sock)
        try:
            sock.settimeout(DIRECT_IDLE_SECONDS)
            first = sock.recv(len(DIRECT_MAGIC))
            if not first:
                return False
            magic = first + recv_exact(sock, len(DIRECT_MAGIC) - len(first),
                                        time.monotonic() + self.handshake_timeout)
        except (OSError, ConnectionError):  # the idle time out, or the connection cut
            return False
        with self._lock:
            self._idle.discard(sock)
            self._sending.add(sock)
            stopping = self._stopping
        if magic != DIRECT_MAGIC:
            self.refused += 1
            log.debug("bulk connection dropped: a kept direct connection sent no request")
            return False
        return not stopping

    def _direct_call(self, sock: socket.socket, handler: DirectHandler, deadline: float
                     ) -> bool:
        """One direct call; errors are answered, not raised. Whether the connection may
        carry another (its answer went out whole)."""
        release: Callable[[], None] = _nothing
        read = False  # the whole request: the next one may follow on the connection
        try:
            try:
                (auth_len,) = struct.unpack("<H", recv_exact(sock, 2, deadline))
                auth = recv_exact(sock, auth_len, deadline)
                (name_len,) = struct.unpack("<H", recv_exact(sock, 2, deadline))
                method = recv_exact(sock, name_len, deadline).decode("ascii", "replace")
                (req_len,) = struct.unpack("<Q", recv_exact(sock, 8, deadline))
                if req_len > MAX_DIRECT_REQUEST_BYTES:
                    raise InvalidSelection(
                        f"request of {req_len} bytes exceeds the limit of "
                        f"{MAX_DIRECT_REQUEST_BYTES} bytes"
                    )
                with self._lock:
                    stopping = self._stopping
                if stopping:
                    raise ServerUnavailable("the server is shutting down; retry shortly")
                request = recv_exact(sock, req_len,
                                      deadline + req_len / _DIRECT_BYTES_PER_SECOND)
                read = True
                pieces, nbytes, release = handler(method, auth, request)
            except TensorSliceError as exc:
                _answer_error(sock, exc.status, exc.message)
                return read
            except (OSError, ConnectionError):
                raise
            except Exception:
                log.exception("internal error while serving a direct request")
                _answer_error(sock, Status.INTERNAL,
                              "internal error; the server log has the details")
                return read
            self._send_pieces(sock, itertools.chain((struct.pack("<BQ", 0, nbytes),),
                                                    pieces), 9 + nbytes)
            return True
        finally:
            release()


def _nothing() -> None:
    pass


def _local_listener(port: int) -> socket.socket | None:
    """The same-host listener of the plane on TCP `port`, or None where its name is taken
    (another server's, in this network namespace)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(same_host_socket(port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        log.warning("no same-host transfers: cannot listen on %r: %s",
                    same_host_socket(port), exc)
        return None
    sock.setblocking(False)
    return sock


def _answer_error(sock: socket.socket, status: Status, message: str) -> None:
    data = message.encode("utf-8", "replace")[:_MAX_ERROR_BYTES]
    sock.sendall(struct.pack("<BQ", status.value, len(data)) + data)


