"""GPU check: the device path measured against its own hardware, as ratios in one run.

    python3 -m bench.gpu [--budget 80] [--reps 7] [--json PATH]
                         [--tests-rc N --tests-summary TEXT]      (what scripts/gpu-check passes)

Rows with a goal (medians of `--reps` after a warm-up; CUDA events for device-only work,
`torch.cuda.synchronize()` before host timers otherwise):

- gather: the planner's row gather of 64 of 256 samples x 128 of 512 channels of a
  (256, 512, 32, 32) float32 tensor on the device, against a device-to-device copy of the
  same bytes (goal >= 0.5x);
- d2h: a 1 GiB slice through the staging path (`host_chunks` over the device tensor, each
  chunk touched), against one plain `copy_` of the same bytes into pinned memory
  (goal >= 0.8x);
- e2e: a 256 MiB slice pulled by a client into a torch tensor from a server holding the
  tensor on the GPU, against the same from a server holding it on the CPU (goal >= 0.9x).

Other rows are for information. With no CUDA device it prints "no CUDA device: nothing to
check" and exits 0. The table goes to the JSON file too: `$OUT/gpu-check.json` when OUT is
set, else `bench/results/gpu-check.json`. Exit status: 1 when a section raised (or the tests
that `--tests-rc` reports failed), else 0; a missed goal shows in the table, not the status.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MiB = 1 << 20
GiB = 1 << 30


@dataclass
class Row:
    section: str
    figure: str
    value: float | None  # GB/s unless `unit` says otherwise
    baseline: str = ""
    baseline_value: float | None = None
    ratio: float | None = None
    goal: float | None = None  # ratio >= goal
    unit: str = "GB/s"
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.goal is None or self.ratio is None:
            return None
        return self.ratio >= self.goal


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class Bench:
    def __init__(self, reps: int, deadline: float, device: str = "cuda") -> None:
        import torch

        self.torch = torch
        self.reps = reps
        self.deadline = deadline
        self.dev = torch.device(device)
        self.cuda = self.dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def device_time(self, fn: Callable[[], object], inner: int = 10) -> float:
        """Median seconds per call, CUDA events around `inner` calls, after a warm-up."""
        torch = self.torch
        if not self.cuda:
            return self.host_time(lambda: [fn() for _ in range(inner)]) / inner
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(self.reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        return _median(times)

    def host_time(self, fn: Callable[[], object], reps: int | None = None) -> float:
        """Median seconds per call, host clock, synchronized before and after, after a warm-up."""
        fn()
        times = []
        for _ in range(reps or self.reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return _median(times)


# ---------------------------------------------------------------------------- sections


def bench_gather(b: Bench) -> list[Row]:
    torch = b.torch
    from tensorslice.core.selection import Combine, Indices, Selection
    from tensorslice.server._execute import _row_source, execute
    from tensorslice.server._model import Mode, TensorMeta
    from tensorslice.server._payload import BufferPool
    from tensorslice.server._plan import plan
    from tensorslice.server._stream import SLAB_BYTES

    dev = b.dev
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 512, 32, 32, device=dev)
    bi = torch.randperm(256, generator=g)[:64].sort().values
    ci = torch.randperm(512, generator=g)[:128].sort().values
    meta = TensorMeta("x", tuple(x.shape), x.dtype, str(x.device))
    p = plan(meta, Selection((Indices(bi), Indices(ci)), Combine.OUTER))
    assert p.mode is Mode.ROWS, p.mode
    src, flat = _row_source(p, x)
    out = torch.empty(flat.numel(), src.shape[1], dtype=x.dtype, device=dev)
    nbytes = out.numel() * out.element_size()

    def gather() -> None:
        torch.index_select(src, 0, flat, out=out)

    gather()
    ref = x[bi.to(dev)][:, ci.to(dev)]
    assert torch.equal(out.view(ref.shape), ref), "row gather differs from x[b][:, c]"
    copy_src = x.view(-1)[: out.numel()]
    copy_dst = torch.empty_like(copy_src)
    t_gather = b.device_time(gather, inner=20)
    t_copy = b.device_time(lambda: copy_dst.copy_(copy_src), inner=20)
    rows = [Row("gather", "planner row gather, 64x128 of (256,512,32,32) f32 (32 MiB)",
                _gbps(nbytes, t_gather), "device-to-device copy_ of the same bytes",
                _gbps(nbytes, t_copy), t_copy / t_gather, 0.5,
                note=f"{t_gather * 1e6:.0f} us vs {t_copy * 1e6:.0f} us")]

    # As served: the payload writes 4 MiB slabs into one reused device buffer.
    payload = execute(p, x)[0]
    pool = BufferPool()

    def served() -> None:
        for _ in payload.slabs(SLAB_BYTES, pool):
            pass

    t_served = b.host_time(served)
    rows.append(Row("gather", "payload slabs as served (4 MiB each, incl. Python)",
                    _gbps(nbytes, t_served), "device-to-device copy_",
                    _gbps(nbytes, t_copy), t_copy / t_served))
    bd, cd = bi.to(dev), ci.to(dev)
    t_article = b.device_time(lambda: x[bd][:, cd], inner=5)
    rows.append(Row("gather", "article's x[b][:, c] on the device (for reference)",
                    _gbps(nbytes, t_article), "planner row gather",
                    _gbps(nbytes, t_gather), t_gather / t_article))
    return rows


def bench_d2h(b: Bench) -> list[Row]:
    torch = b.torch
    from tensorslice.server._payload import BufferPool, ContiguousPayload
    from tensorslice.server._staging import PinnedPool, host_chunks, stage_bytes_for
    from tensorslice.server._stream import CHUNK_BYTES, SLAB_BYTES, frames

    dev = b.dev
    n = GiB
    base = torch.randn((n + 64 * MiB) // 4, device=dev)  # a 1 GiB slice of a larger tensor
    view = base[16 * MiB // 4 : 16 * MiB // 4 + n // 4]
    payload = ContiguousPayload("values", view)
    pinned = torch.empty(n, dtype=torch.uint8, pin_memory=b.cuda)
    src_bytes = view.view(torch.uint8)

    def plain() -> None:
        pinned.copy_(src_bytes)

    def staged(pool: PinnedPool | None = None) -> int:
        total = 0
        chunk = CHUNK_BYTES if pool is None else min(CHUNK_BYTES, pool.nbytes)
        for mv in host_chunks(payload.slabs(SLAB_BYTES, BufferPool()), chunk, pool=pool):
            total += len(mv)
            _ = mv[0]  # touch it
        return total

    assert staged() == n
    # correctness on a sample: the first and last chunk's bytes
    chunks = host_chunks(payload.slabs(SLAB_BYTES, BufferPool()), CHUNK_BYTES)
    first = bytes(next(chunks))
    chunks.close()
    assert first == view[: CHUNK_BYTES // 4].cpu().numpy().tobytes()

    t_plain = b.host_time(plain)
    t_staged = b.host_time(staged)
    stage = stage_bytes_for(CHUNK_BYTES)
    rows = [Row("d2h", f"1 GiB slice through staging ({stage // MiB} MiB pinned x3, "
                f"{CHUNK_BYTES // MiB} MiB chunks)", _gbps(n, t_staged),
                "one pinned copy_ of the same bytes", _gbps(n, t_plain), t_plain / t_staged, 0.8,
                note=f"{t_staged * 1e3:.1f} ms vs {t_plain * 1e3:.1f} ms")]
    for size in (1 * MiB, 32 * MiB):
        if b.left() < 20:
            break
        pool = PinnedPool(size)
        t = b.host_time(functools.partial(staged, pool), reps=max(3, b.reps // 2))
        rows.append(Row("d2h", f"  staging buffers of {size // MiB} MiB (for comparison)",
                        _gbps(n, t), "one pinned copy_", _gbps(n, t_plain), t_plain / t))
    if b.left() > 20:
        t_pageable = b.host_time(lambda: view.cpu(), reps=3)
        rows.append(Row("d2h", "  pageable .cpu() of the slice (for comparison)",
                        _gbps(n, t_pageable), "one pinned copy_", _gbps(n, t_plain),
                        t_plain / t_pageable))
    if b.left() > 20:
        def framed() -> None:
            for _ in frames([payload], {}):
                pass

        t_frames = b.host_time(framed, reps=3)
        rows.append(Row("d2h", "  frames() of the slice: staging + gRPC framing copy",
                        _gbps(n, t_frames), "one pinned copy_", _gbps(n, t_plain),
                        t_plain / t_frames))
    return rows


def bench_e2e(b: Bench) -> list[Row]:
    torch = b.torch
    from tensorslice.client import Client
    from tensorslice.server import ServerConfig, TensorStore, create_server

    x = torch.randn(320, 64, 32, 32)  # 320 MiB; the slice [0:256] is 256 MiB
    k = 256
    nbytes = k * x[0].numel() * 4
    clients: dict[str, Client] = {}  # "cpu", then "gpu"
    servers = []
    try:
        for role, device in (("cpu", "cpu"), ("gpu", str(b.dev))):
            store = TensorStore(device)
            store.add("x", x)
            srv, port = create_server(store, "127.0.0.1:0", ServerConfig())
            srv.start()
            servers.append(srv)
            clients[role] = Client(f"127.0.0.1:{port}", timeout=120)
        got = clients["gpu"].tensor("x")[0:k]
        assert torch.equal(got, x[0:k]), "GPU server returned different bytes"
        del got
        times: dict[str, float] = {}
        for role, c in clients.items():
            remote = c.tensor("x")
            times[role] = b.host_time(functools.partial(remote.__getitem__, slice(0, k)))
        gpu, cpu = times["gpu"], times["cpu"]
        rows = [Row("e2e", "256 MiB slice remote[0:256] from the GPU server",
                    _gbps(nbytes, gpu), "the same from the CPU server",
                    _gbps(nbytes, cpu), cpu / gpu, 0.9,
                    note=f"{gpu * 1e3:.0f} ms vs {cpu * 1e3:.0f} ms")]
        if b.left() > 15:
            bi = list(range(0, 320, 2))
            ci = list(range(0, 64, 2))
            gbytes = len(bi) * len(ci) * 32 * 32 * 4
            tg: dict[str, float] = {}
            for role, c in clients.items():
                remote = c.tensor("x")
                tg[role] = b.host_time(functools.partial(remote.oindex.__getitem__, (bi, ci)),
                                         reps=max(3, b.reps // 2))
            rows.append(Row("e2e", f"  gather oindex[160 of 320, 32 of 64] "
                            f"({gbytes // MiB} MiB) from the GPU server",
                            _gbps(gbytes, tg["gpu"]), "the same from the CPU server",
                            _gbps(gbytes, tg["cpu"]), tg["cpu"] / tg["gpu"]))
        return rows
    finally:
        for c in clients.values():
            c.close()
        for srv in servers:
            srv.stop(grace=None)


SECTIONS: list[tuple[str, Callable[[Bench], list[Row]], float]] = [
    # name, function, seconds it needs at least
    ("gather", bench_gather, 10),
    ("d2h", bench_d2h, 15),
    ("e2e", bench_e2e, 15),
]


# ---------------------------------------------------------------------------- report


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def table(rows: list[Row]) -> str:
    head = ("section", "figure", "value", "baseline", "base", "ratio", "goal", "met")
    lines = [head]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "MISSED")
        lines.append((r.section, r.figure, f"{_fmt(r.value)} {r.unit}" if r.value is not None
                      else "—", r.baseline, _fmt(r.baseline_value), f"{_fmt(r.ratio)}x"
                      if r.ratio is not None else "—",
                      f">={r.goal:g}x" if r.goal is not None else "", met))
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    notes = [f"  {r.figure.strip()}: {r.note}" for r in rows if r.note]
    return "\n".join(out + (["notes:", *notes] if notes else []))


def _json_path(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    out = os.environ.get("OUT")
    if out:
        return Path(out) / "gpu-check.json"
    return Path(__file__).resolve().parent / "results" / "gpu-check.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budget", type=float, default=80.0, help="seconds for the benchmark")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    ap.add_argument("--tests-rc", type=int, default=None, help="exit status of the test step")
    ap.add_argument("--tests-summary", default="", help="the test step's summary line")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run every section on the CPU (checks the script; numbers meaningless)")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    path = _json_path(args.json)
    report: dict[str, Any] = {"host": platform.node(), "python": platform.python_version()}
    if args.tests_rc is not None:
        report["tests"] = {"rc": args.tests_rc, "summary": args.tests_summary}

    try:
        import torch
    except Exception as exc:
        print(f"bench.gpu: torch does not import: {exc}", flush=True)
        return 1
    report["torch"] = torch.__version__
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("no CUDA device: nothing to check", flush=True)
        report["cuda"] = False
        _write(path, report)
        return 0 if not args.tests_rc else 1
    card = "CPU (dry run)" if args.cpu_dry_run else torch.cuda.get_device_name()
    report.update(cuda=not args.cpu_dry_run, dry_run=args.cpu_dry_run, card=card,
                  cuda_version=torch.version.cuda)
    print(f"bench.gpu: {card}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"budget {args.budget:.0f} s", flush=True)

    b = Bench(args.reps, t0 + args.budget, "cpu" if args.cpu_dry_run else "cuda")
    rows: list[Row] = []
    errors: list[str] = []
    for name, fn, need in SECTIONS:
        if b.left() < need:
            rows.append(Row(name, "skipped: out of time budget", None))
            errors.append(f"{name}: skipped (budget)")
            continue
        s0 = time.monotonic()
        try:
            got = fn(b)
            rows.extend(got)
            print(f"bench.gpu: {name} done in {time.monotonic() - s0:.1f} s", flush=True)
        except Exception as exc:  # one failure must not stop the rest
            traceback.print_exc()
            rows.append(Row(name, f"FAILED: {type(exc).__name__}: {exc}"[:200], None))
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
        finally:
            if b.cuda:
                torch.cuda.empty_cache()

    report["rows"] = [asdict(r) | {"met": r.met} for r in rows]
    report["errors"] = errors
    report["seconds"] = round(time.monotonic() - t0, 1)
    _write(path, report)
    print(flush=True)
    print(f"GPU check on {card} (torch {torch.__version__}), {report['seconds']} s; "
          f"JSON: {path}")
    if args.tests_rc is not None:
        status = "passed" if args.tests_rc == 0 else f"FAILED (rc {args.tests_rc})"
        print(f"tests: {status}: {args.tests_summary}")
    print(table(rows), flush=True)
    failed = bool(errors) or bool(args.tests_rc)
    return 1 if failed else 0


def _write(path: Path, report: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        print(f"bench.gpu: could not write {path}: {exc}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
