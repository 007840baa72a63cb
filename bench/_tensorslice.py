"""The one place that knows the tensorslice API; everything else calls these functions."""

from __future__ import annotations

import multiprocessing.connection
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from bench._common import HOST, Child, gbps, median
from bench._payload import check_pattern, pattern_tensor
from bench._rss import control_loop
from tensorslice.client import Client

# --- the server side ----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A served tensor, built inside the server process (never pickled across processes).
    Its flat element ``i`` is ``i % 65521`` (see ``bench._payload.pattern_tensor``)."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        for d in self.shape:
            n *= d
        return n


def _build_server(tensors: dict[str, torch.Tensor], tls: tuple[str, str] | None = None,
                  max_result_bytes: int | None = None) -> tuple[Any, int]:
    """Create and start a tensorslice server on 127.0.0.1, any free port: (server, port).
    Default settings, except `max_result_bytes` where given (the 4 GiB row: the default
    limit is an eighth of the machine's memory)."""
    from tensorslice.server import ServerConfig, TensorStore, TlsFiles, create_server

    store = TensorStore()
    for name, tensor in tensors.items():
        store.add(name, tensor)
    config = ServerConfig(tls=None if tls is None else TlsFiles(*tls),
                          max_result_bytes=max_result_bytes)
    server, port = create_server(store, f"{HOST}:0", config)
    server.start()
    return server, int(port)


def _server_main(ctrl: multiprocessing.connection.Connection, specs: dict[str, TensorSpec],
                 tls: tuple[str, str] | None = None,
                 max_result_bytes: int | None = None) -> None:
    from tensorslice.server._hostmem import return_large_frees

    return_large_frees()  # as `tensorslice serve` does
    try:
        tensors = {
            name: pattern_tensor(s.shape, getattr(torch, s.dtype)) for name, s in specs.items()
        }
        server, port = _build_server(tensors, tls, max_result_bytes)
    except Exception as e:
        ctrl.send(RuntimeError(f"{e!r}\n{traceback.format_exc()}"))
        return
    ctrl.send(port)
    control_loop(ctrl)
    server.stop(None)


def start_tensorslice_server(
    specs: dict[str, TensorSpec], tls: tuple[str, str] | None = None,
    max_result_bytes: int | None = None,
) -> tuple[Child, int]:
    """Start a server process serving ``specs`` (over TLS with ``tls``, a certificate and
    key file); returns (process handle, port). The handle answers ``("rss_reset",)`` /
    ``("rss_peak",)`` and stops on close."""
    child = Child(_server_main, specs, tls, max_result_bytes)
    return child, int(child.ready)


def _planner_gather(x: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> Iterator[torch.Tensor]:
    """The server's own path for ``oindex[b, c]``: plan the selection, then produce the
    payload slab by slab into the server's reused buffers (what the service streams)."""
    from tensorslice.core.selection import Combine, Indices, Selection
    from tensorslice.server import TensorMeta, execute, plan
    from tensorslice.server._payload import BufferPool
    from tensorslice.server._stream import SLAB_BYTES

    meta = TensorMeta("g", tuple(x.shape), x.dtype)
    p = plan(meta, Selection((Indices(b), Indices(c)), Combine.OUTER))
    pool = _POOL.setdefault("pool", BufferPool())
    for payload in execute(p, x):
        yield from payload.slabs(SLAB_BYTES, pool)


_POOL: dict[str, Any] = {}




def server_gather(
    x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, sink: torch.Tensor | None = None
) -> int:
    """The service's gather of samples ``b`` × channels ``c`` done on the server, in-process:
    the server's planner, producing the slabs it would send. Returns the bytes
    produced; with ``sink`` (contiguous, the result's size) the bytes are also copied there,
    for checking only (the timed calls pass no sink, as the server sends the slabs as is)."""
    done = 0
    flat = sink.view(-1).view(torch.uint8) if sink is not None else None
    for slab in _planner_gather(x, b, c):
        n = slab.numel() * slab.element_size()
        if flat is not None:
            flat[done : done + n] = slab.reshape(-1).view(torch.uint8)
        done += n
    return done


# --- the client side ----------------------------------------------------------------------


def connect(port: int, ca: str | None = None, same_host: bool = False) -> Any:
    """An open client (``Client`` is a context manager; call ``close`` via ``__exit__``);
    TLS trusting the CA file `ca` where given; large results take the TCP bulk plane unless
    `same_host` asks for the shared-memory path."""
    c = Client(f"{HOST}:{port}", tls=ca if ca is not None else False, same_host=same_host)
    c.__enter__()
    return c


def disconnect(c: Any) -> None:
    c.__exit__(None, None, None)


def slice_throughput(port: int, name: str, rows: int, row_elems: int, reps: int,
                     ca: str | None = None, same_host: bool = False) -> float:
    """Median GB/s of ``t[0:rows]`` end to end (a torch.Tensor in this process); over TLS
    trusting `ca` where given; as a same-host shared segment with `same_host` (checked:
    the client counts the results so carried)."""
    c = connect(port, ca, same_host)
    try:
        t = c.tensor(name)
        y = t[0:rows]
        if not isinstance(y, torch.Tensor) or tuple(y.shape[:1]) != (rows,):
            shape = getattr(y, "shape", "")
            raise AssertionError(f"t[0:{rows}] returned {type(y).__name__} {shape}")
        check_pattern(y)
        nbytes = y.numel() * y.element_size()
        del y
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            y = t[0:rows]
            times.append(time.perf_counter() - t0)
            del y
        if same_host and c.transports["shared_memory"] != reps + 1:
            raise AssertionError(f"same-host results: {c.transports}")
    finally:
        disconnect(c)
    return gbps(nbytes, median(times))


def upload_throughput(port: int, rows: int, row_elems: int, reps: int) -> float:
    """Median GB/s of ``put(name, x, replace=True)`` of a (rows, row_elems) float32 tensor,
    end to end (acknowledged by the server), checked by reading a few rows back."""
    c = connect(port)
    try:
        x = torch.arange(rows * row_elems, dtype=torch.float32).reshape(rows, row_elems)
        c.put("upload", x, replace=True)
        back = c.tensor("upload")[rows - 2 : rows]
        if not torch.equal(back, x[rows - 2 : rows]):
            raise AssertionError("the uploaded tensor does not read back as sent")
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            c.put("upload", x, replace=True)
            times.append(time.perf_counter() - t0)
        c.drop("upload")
    finally:
        disconnect(c)
    return gbps(rows * row_elems * 4, median(times))


def gather_throughput(
    port: int, name: str, b: torch.Tensor, c_idx: torch.Tensor, want: torch.Tensor, reps: int
) -> float:
    """Median GB/s of ``t.oindex[b, c]`` end to end; checked once against ``want``."""
    c = connect(port)
    try:
        t = c.tensor(name)
        bl, cl = b.tolist(), c_idx.tolist()
        y = t.oindex[bl, cl]
        if not torch.equal(y, want):
            raise AssertionError("t.oindex[b, c] disagrees with x[b][:, c]")
        nbytes = want.numel() * want.element_size()
        del y
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            y = t.oindex[bl, cl]
            times.append(time.perf_counter() - t0)
            del y
    finally:
        disconnect(c)
    return gbps(nbytes, median(times))


def small_slice_figures(
    port: int, name: str, count: int, max_seconds: float, rounds: int,
    peer: Any, threads: int = 8,
) -> dict[str, float]:
    """Medians over `rounds` of: the p50 seconds and the QPS (``threads`` threads sharing
    one client) of 4 KiB ``t[1:2]``, the same read again and again (the server's answer
    cache and the handle's kept request serve it), over TCP (``p50``, ``qps``) and from
    a client on the same host with same-host sessions on (``same_p50``, ``same_qps``:
    checked to be carried by a session); the p50 of ``t[i:i+1]``, a different row each
    call (neither helps: the tensor has more 4 KiB rows than the calls read); and the p50
    and QPS of `peer` (the raw unary call over TCP), measured in the same rounds,
    interleaved, so that all see the same machine."""
    import itertools
    import statistics

    from bench._grpc_raw import latency_p50, qps

    c = connect(port)
    near = connect(port, same_host=True)
    try:
        t = c.tensor(name)
        y = t[1:2]
        if y.numel() * y.element_size() != 4096:
            raise AssertionError(f"t[1:2] is {y.numel() * y.element_size()} bytes, not 4096")
        check_pattern(y, flat_start=y.numel())
        t_near = near.tensor(name)
        check_pattern(t_near[1:2], flat_start=y.numel())
        if near.last_transport != "session" or c.last_transport != "inline":
            raise AssertionError(f"4 KiB carried {near.last_transport!r} on the same-host "
                                 f"client, {c.last_transport!r} over TCP")
        rows = itertools.count(2)
        if len(t) < rounds * (count + 60):
            raise AssertionError(f"{name} has {len(t)} rows: too few for the fresh reads")

        def call() -> object:
            return t[1:2]

        def call_near() -> object:
            return t_near[1:2]

        def fresh() -> object:
            i = next(rows)
            return t[i : i + 1]

        out: dict[str, list[float]] = {k: [] for k in (
            "peer_p50", "p50", "same_p50", "fresh_p50", "peer_qps", "qps", "same_qps")}
        for _ in range(rounds):
            out["peer_p50"].append(latency_p50(peer, count, max_seconds))
            out["p50"].append(latency_p50(call, count, max_seconds))
            out["same_p50"].append(latency_p50(call_near, count, max_seconds))
            out["fresh_p50"].append(latency_p50(fresh, count, max_seconds))
            out["peer_qps"].append(qps(peer, threads, count * 4, max_seconds))
            out["qps"].append(qps(call, threads, count * 4, max_seconds))
            out["same_qps"].append(qps(call_near, threads, count * 4, max_seconds))
        if near.transports["inline"] or not near.transports["session"]:
            raise AssertionError(f"the same-host client's results: {near.transports}")
    finally:
        disconnect(c)
        disconnect(near)
    return {k: statistics.median(v) for k, v in out.items()}


def huge_slice_works(port: int, name: str, rows: int) -> tuple[bool, str]:
    """Whether ``t[0:rows]`` (4 GiB) arrives whole and correct."""
    c = connect(port)
    try:
        t0 = time.perf_counter()
        y = c.tensor(name)[0:rows]
        dt = time.perf_counter() - t0
        check_pattern(y)
        return True, f"{y.numel() * y.element_size() / 2**30:.2f} GiB in {dt:.1f} s"
    except Exception as e:
        return False, repr(e)[:200]
    finally:
        disconnect(c)


# RSS client hooks (see bench._rss.ClientSpec): the served tensor "x" has 1 MiB rows.
ROW_BYTES = 1 << 20


def rss_setup(port: int, nbytes: int) -> tuple[Any, Any, int]:
    c = connect(port)
    t = c.tensor("x")
    t[0:1]
    return c, t, nbytes // ROW_BYTES


def rss_receive(state: tuple[Any, Any, int]) -> None:
    _, t, rows = state
    check_pattern(t[0:rows])
