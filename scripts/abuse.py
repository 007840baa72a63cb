"""Two hostile scenarios against a real `tensorslice serve` on 127.0.0.1, with the server's
memory and the answers normal callers get (see `scripts/abuse --help`).

- mask: one request carrying a mask too large for the tensor (60 MB): the server's
  high-water RSS before and after.
- tickets: N `Fetch` calls asking for the bulk plane, for a VECTORIZED two-list gather
  built whole (16 MiB each), never redeemed; the server's RSS before, at its peak and
  after the tickets expire, and how many were refused.
- stalled: S `Slice` streams of a 256 MiB tensor that read one message and stop; then,
  for a while, a health check and a small `Fetch` (no retries) twice a second, and a
  `Client` call (with its retries): what each got, and when.

Bounded in count and time; extra arguments after `--` go to `tensorslice serve`.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import save_file

from tensorslice.client import Client, TensorSliceError
from tensorslice.v1 import tensorslice_pb2 as pb

SERVICE = "/tensorslice.v1.TensorSlice"


def _serialize(msg: pb.SliceRequest) -> bytes:
    return msg.SerializeToString()


def rss(pid: int, field: str = "VmRSS") -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) << 10 if m else 0


def reset_peak(pid: int) -> None:
    """Start the process's high-water RSS afresh (Linux: clear_refs 5), where allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        pass


def mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def start(path: Path, extra: list[str], pythonpath: str | None
          ) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath:  # another tensorslice for the server (an older one, to compare)
        env["PYTHONPATH"] = pythonpath
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorslice.server._cli", "--log-level", "ERROR", "serve",
         "--port", "0", "--no-progress", "--tensor", f"x={path}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.search(r"serving \d+ tensor\(s\) on (\S+)", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise SystemExit("the server did not start")


def gather(n: int) -> pb.SliceRequest:
    rows = pb.Indices(values=list(range(n)), shape=[n, 1])
    cols = pb.Indices(values=list(range(n)), shape=[1, n])
    return pb.SliceRequest(tensor="x", combine=pb.VECTORIZED, bulk=True,
                           selectors=[pb.Selector(indices=rows), pb.Selector(indices=cols)])


def code_of(exc: grpc.RpcError) -> str:
    err: Any = exc
    return str(err.code().name)


def tickets(proc: subprocess.Popen[str], address: str, count: int, expire: float) -> None:
    reset_peak(proc.pid)
    before = rss(proc.pid)
    outcomes: Counter[str] = Counter()
    peak = before
    with grpc.insecure_channel(address) as ch:
        fetch = ch.unary_unary(f"{SERVICE}/Fetch", request_serializer=_serialize,
                               response_deserializer=pb.SliceChunk.FromString)
        req = gather(2048)
        t0 = time.monotonic()
        for _ in range(count):
            try:
                chunk = fetch(req, timeout=30)
                outcomes["ticket" if chunk.HasField("ticket") else "inline"] += 1
            except grpc.RpcError as exc:
                outcomes[code_of(exc)] += 1
            peak = max(peak, rss(proc.pid))
        took = time.monotonic() - t0
    print(f"tickets: {count} unredeemed Fetch(bulk) of a 16 MiB gather in {took:.1f} s: "
          f"{dict(outcomes)}")
    print(f"  server RSS before {mib(before)}, peak {mib(peak)} "
          f"(+{mib(peak - before)}), high-water {mib(rss(proc.pid, 'VmHWM'))}")
    time.sleep(expire + 1)
    print(f"  after {expire + 1:g} s (tickets expired): RSS {mib(rss(proc.pid))}")


def stalled(proc: subprocess.Popen[str], address: str, streams: int, watch: float) -> None:
    channels = [grpc.insecure_channel(address) for _ in range(streams)]
    # All at once, as a crowd would: then each reads its first message and stops.
    slice_ = [ch.unary_stream(f"{SERVICE}/Slice", request_serializer=_serialize,
                              response_deserializer=None) for ch in channels]
    started: list[Any] = [s(pb.SliceRequest(tensor="x"), timeout=300) for s in slice_]
    calls: list[Any] = []
    for call in started:
        try:
            next(call)
            calls.append(call)
        except grpc.RpcError as exc:
            calls.append(code_of(exc))
    refused = [c for c in calls if isinstance(c, str)]
    print(f"stalled: {streams} Slice streams of 256 MiB read one message and stop "
          f"({streams - len(refused)} started, refused: {Counter(refused) or 0})")
    small = pb.SliceRequest(tensor="x", selectors=[pb.Selector(index=pb.Index(index=3))])
    health: Counter[str] = Counter()
    fetches: list[tuple[float, str]] = []
    with grpc.insecure_channel(address) as ch, Client(address, timeout=30) as client:
        check = health_pb2_grpc.HealthStub(ch).Check
        fetch = ch.unary_unary(f"{SERVICE}/Fetch", request_serializer=_serialize,
                               response_deserializer=None)
        t0 = time.monotonic()
        while time.monotonic() - t0 < watch:
            try:
                r = check(health_pb2.HealthCheckRequest(), timeout=2)
                health["SERVING" if r.status == health_pb2.HealthCheckResponse.SERVING
                       else "other"] += 1
            except grpc.RpcError as exc:
                health[code_of(exc)] += 1
            start_at = time.monotonic() - t0
            try:
                fetch(small, timeout=5)
                fetches.append((start_at, "OK"))
            except grpc.RpcError as exc:
                fetches.append((start_at, code_of(exc)))
            time.sleep(0.5)
        t = time.monotonic()
        try:
            client.tensor("x")[3]
            via_client = f"OK in {time.monotonic() - t:.1f} s"
        except TensorSliceError as exc:
            via_client = f"{type(exc).__name__}: {exc}"
    print(f"  health checks over {watch:g} s: {dict(health)}")
    first_ok = next((t for t, c in fetches if c == "OK"), None)
    print(f"  small Fetch (no retries): {dict(Counter(c for _, c in fetches))}; first OK at "
          f"{'never' if first_ok is None else f'{first_ok:.1f} s'}")
    print(f"  Client (with retries) afterwards: {via_client}")
    for ch in channels:
        ch.close()


def mask(proc: subprocess.Popen[str], address: str, nbytes: int) -> None:
    """One request with a mask of `nbytes` values that does not fit the tensor."""
    req = pb.SliceRequest(tensor="x", selectors=[pb.Selector(mask=pb.Mask(values=bytes(nbytes)))])
    reset_peak(proc.pid)
    before = rss(proc.pid, "VmHWM")
    with grpc.insecure_channel(address, options=[
            ("grpc.max_send_message_length", -1)]) as ch:
        fetch = ch.unary_unary(f"{SERVICE}/Fetch", request_serializer=_serialize,
                               response_deserializer=None)
        try:
            fetch(req, timeout=60)
            outcome = "OK"
        except grpc.RpcError as exc:
            err: Any = exc
            outcome = f"{code_of(exc)}: {err.details()[:90]}"
    print(f"mask: one request with a {mib(nbytes)} mask: {outcome}")
    print(f"  server high-water RSS {mib(before)} -> {mib(rss(proc.pid, 'VmHWM'))}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tickets", type=int, default=400)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--mask-bytes", type=int, default=60 << 20)
    ap.add_argument("--watch", type=float, default=15.0, help="seconds to watch (stalled)")
    ap.add_argument("--pythonpath", help="PYTHONPATH for the server (compare versions)")
    ap.add_argument("serve_args", nargs="*", help="after --: extra `tensorslice serve` flags")
    args = ap.parse_args()
    expire = 15.0
    if "--ticket-timeout" in args.serve_args:
        expire = float(args.serve_args[args.serve_args.index("--ticket-timeout") + 1])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.safetensors"
        save_file({"x": torch.randn(8192, 8192)}, str(path))  # 256 MiB
        for scenario in ("mask", "tickets", "stalled"):
            proc, address = start(path, args.serve_args, args.pythonpath)
            try:
                if scenario == "mask":
                    mask(proc, address, args.mask_bytes)
                elif scenario == "tickets":
                    tickets(proc, address, args.tickets, expire)
                else:
                    stalled(proc, address, args.streams, args.watch)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
