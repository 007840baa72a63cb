"""Run the benchmark groups and print one table (also written as JSON).

    python -m bench [--quick] [--only NAME[,NAME]] [--reps N] [--json PATH]

Groups: memcpy, socket, grpc, flight, gather, rss, tensorslice, small, tls, upload,
dataloader, recording, scaling (aliases: peers = the first six, service = the last seven;
small: the 4 KiB figures over TCP and from a same-host client, each round against the raw
unary call in the same stretch).
Servers run in
spawned children on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench import _flight, _gather, _grpc_raw, _rss, _socket, _tensorslice
from bench._common import Figures, GiB, Goal, MiB, Row, gbps, machine_info, time_per_call
from bench._payload import PATTERN_MOD, make_payload

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


@dataclass(frozen=True)
class Config:
    quick: bool
    reps: int
    stream_bytes: int  # the contiguous-slice size (256 MiB)
    gather_bytes: int  # what the 64 × 128 gather moves (32 MiB)
    rss_bytes: int  # the RSS measurements (1 GiB)
    huge_bytes: int  # the "a 4 GiB slice works" check; 0 skips it
    lat_count: int  # bound on calls per latency / QPS measurement
    lat_seconds: float  # bound on seconds per latency / QPS measurement

    @staticmethod
    def make(quick: bool, reps: int | None) -> Config:
        if quick:
            return Config(True, reps or 3, 32 * MiB, 32 * MiB, 64 * MiB, 0, 300, 1.0)
        return Config(False, reps or 5, 256 * MiB, 32 * MiB, 1 * GiB, 4 * GiB, 2000, 5.0)


def size(n: int) -> str:
    return f"{n // GiB} GiB" if n >= GiB and n % GiB == 0 else f"{n // MiB} MiB"


# --- peer groups ------------------------------------------------------------------------------


def group_memcpy(cfg: Config, figs: Figures) -> list[Row]:
    n = cfg.stream_bytes
    src = torch.from_numpy(make_payload(n))
    dst = torch.empty_like(src)
    v = gbps(n, time_per_call(lambda: dst.copy_(src), cfg.reps))
    figs.values["memcpy"] = v
    return [Row(f"memcpy dst.copy_(src) {size(n)}", v, "GB/s")]


def group_socket(cfg: Config, figs: Figures) -> list[Row]:
    n = cfg.stream_bytes
    v = _socket.throughput(n, cfg.reps)
    figs.values["socket"] = v
    return [Row(f"raw TCP socket {size(n)} → tensor", v, "GB/s", "memcpy", figs.get("memcpy"))]


def group_grpc(cfg: Config, figs: Figures) -> list[Row]:
    n = cfg.stream_bytes
    per_chunk = _grpc_raw.stream_throughput(n, cfg.reps)
    best = max(per_chunk, key=lambda k: per_chunk[k])
    figs.values["grpc_stream"] = per_chunk[best]
    figs.info["grpc_stream_per_chunk_gbps"] = {size(k): v for k, v in per_chunk.items()}
    note = ", ".join(f"{size(k)}: {v:.2f}" for k, v in per_chunk.items())
    p50, qps = _grpc_raw.unary_figures(cfg.lat_count, cfg.lat_seconds)
    figs.values["grpc_unary_p50"] = p50
    figs.values["grpc_unary_qps"] = qps
    return [
        Row(
            f"raw gRPC stream {size(n)} → tensor (best chunk {size(best)})",
            per_chunk[best],
            "GB/s",
            "raw socket",
            figs.get("socket"),
            note=note,
        ),
        Row("raw gRPC unary 4 KiB p50 latency", p50, "s"),
        Row("raw gRPC unary 4 KiB QPS, 8 threads", qps, "/s"),
    ]


def group_flight(cfg: Config, figs: Figures) -> list[Row]:
    rows: list[Row] = []
    for n, key in ((cfg.stream_bytes, "flight_best"), (cfg.gather_bytes, "flight_best_gather")):
        if key == "flight_best_gather" and n == cfg.stream_bytes and "flight_best" in figs.values:
            figs.values[key] = figs.values["flight_best"]
            figs.info[key + "_batch"] = figs.info["flight_best_batch"]
            continue
        per_batch = _flight.throughput(n, cfg.reps)
        best = max(per_batch, key=lambda k: per_batch[k])
        figs.values[key] = per_batch[best]
        figs.info[key + "_batch"] = _flight.batch_label(best)
        figs.info[key + "_per_batch_gbps"] = {
            _flight.batch_label(k): v for k, v in per_batch.items()
        }
        rows.append(
            Row(
                f"Flight DoGet {size(n)} → tensor (best batch {_flight.batch_label(best)})",
                per_batch[best],
                "GB/s",
                "raw socket" if n == cfg.stream_bytes else "—",
                figs.get("socket") if n == cfg.stream_bytes else None,
                note=", ".join(f"{_flight.batch_label(k)}: {v:.2f}" for k, v in per_batch.items()),
            )
        )
    return rows


def group_gather(cfg: Config, figs: Figures) -> list[Row]:
    x = _gather.make_tensor()
    stand_in = " (planner)"
    m = _gather.measure(x, *_gather.MAIN, cfg.reps, full=True)
    label = f"{m.samples}×{m.channels} of {tuple(x.shape)} f32, {size(m.nbytes)}"
    assert m.advanced is not None and m.memcpy is not None and m.server is not None
    g = {k: gbps(m.nbytes, getattr(m, k)) for k in ("article", "advanced", "row", "memcpy")}
    figs.info["gather_main_seconds"] = asdict(m)
    rows = [
        Row(f"gather article x[b][:, c], {label}", g["article"], "GB/s"),
        Row("gather x[b[:, None], c]", g["advanced"], "GB/s", "article", g["article"]),
        Row("gather row index_select(out=)", g["row"], "GB/s", "article", g["article"]),
        Row(f"memcpy of the result {size(m.nbytes)}", g["memcpy"], "GB/s"),
    ]
    server = gbps(m.nbytes, m.server)
    rows += [
        Row(
            f"server gather in-process{stand_in}",
            server,
            "GB/s",
            "article x[b][:, c]",
            g["article"],
            goal=Goal(">=", 10),
            group="service",
        ),
        Row(
            f"server gather in-process{stand_in}",
            server,
            "GB/s",
            "memcpy",
            g["memcpy"],
            goal=Goal(">=", 0.5),
            group="service",
        ),
    ]
    for s, c in _gather.SHAPES:
        t = m if (s, c) == _gather.MAIN else _gather.measure(x, s, c, cfg.reps)
        assert t.server is not None
        rows.append(
            Row(
                f"server gather {s}×{c} ({t.nbytes // 1024} KiB){stand_in}",
                t.server,
                "s",
                "article",
                t.article,
                ratio=t.article / t.server,
                goal=Goal(">=", 1.0),
                note=f"row gather {t.row * 1e6:.1f} µs",
                group="service",
            )
        )
    return rows


def group_rss(cfg: Config, figs: Figures) -> list[Row]:
    n = cfg.rss_bytes
    rows: list[Row] = []
    peers: list[tuple[str, Callable[[int], tuple[object, int]], str]] = [
        ("raw gRPC (2 MiB chunks)", _grpc_raw.start_server, "bench._grpc_raw"),
        ("Flight (4 MiB batches)", _flight.start_server, "bench._flight"),
        ("raw socket", _socket.start_server, "bench._socket"),
    ]
    for name, start, mod in peers:
        server, port = start(n)
        with server:  # type: ignore[attr-defined]
            spec = _rss.ClientSpec(f"{mod}:rss_setup", f"{mod}:rss_receive")
            r = _rss.measure_transfer(server, port, spec, n)  # type: ignore[arg-type]
        rows += _rss_rows(name, r, goals=False)
    return rows


def _rss_rows(name: str, r: _rss.RssResult, goals: bool) -> list[Row]:
    exact = "" if r.exact else "peak not resettable: approximate"
    res = r.nbytes / MiB
    return [
        Row(
            f"{name} client peak RSS growth, {size(r.nbytes)}",
            r.client_growth / MiB,
            "MiB",
            "result bytes",
            res,
            goal=Goal("<=", 1.25) if goals else None,
            note=exact,
            group="service" if goals else "",
        ),
        Row(
            f"{name} server peak RSS growth, {size(r.nbytes)}",
            r.server_growth / MiB,
            "MiB",
            "result bytes",
            res,
            goal=Goal("<=", 0.25) if goals else None,
            note=exact,
            group="service" if goals else "",
        ),
    ]


# --- the service ------------------------------------------------------------------------------

ROW_ELEMS = 262144  # 1 MiB float32 rows in the served tensor "x"


def _service_rows(cfg: Config, figs: Figures) -> list[Row]:
    """The service figures with their peers; values are filled in by :func:`group_tensorslice`."""
    v = figs.get
    n, g = cfg.stream_bytes, cfg.gather_bytes
    fb = figs.info.get("flight_best_batch", "best batch")
    fg = figs.info.get("flight_best_gather_batch", "best batch")
    rows = [
        Row(f"{size(n)} slice → tensor", v("ts_slice"), "GB/s", f"Flight ({fb})",
            v("flight_best"), goal=Goal(">=", 1.3)),
        Row(f"{size(n)} slice → tensor", v("ts_slice"), "GB/s", "raw socket", v("socket"),
            goal=Goal(">=", 0.65)),
        Row(f"{size(n)} slice → tensor, same host", v("ts_slice_same_host"), "GB/s",
            f"Flight ({fb})", v("flight_best"), goal=Goal(">=", 5.0)),
        Row(f"{size(n)} slice → tensor, same host", v("ts_slice_same_host"), "GB/s",
            f"memcpy {size(n)}", v("memcpy"), goal=Goal(">=", 0.5)),
        Row(f"{size(n)} slice → tensor, same host", v("ts_slice_same_host"), "GB/s",
            "the TCP bulk plane", v("ts_slice"), goal=Goal(">=", 1.0)),
        Row(f"gather 64×128 {size(g)} → tensor", v("ts_gather"), "GB/s",
            f"Flight {size(g)} ({fg})", v("flight_best_gather"), goal=Goal(">=", 1.0)),
    ]  # fmt: skip
    res = cfg.rss_bytes / MiB
    rows += [
        Row(f"client peak RSS growth, {size(cfg.rss_bytes)} slice", v("ts_rss_client"), "MiB",
            "result bytes", res, goal=Goal("<=", 1.25)),
        Row(f"server peak RSS growth, {size(cfg.rss_bytes)} slice", v("ts_rss_server"), "MiB",
            "result bytes", res, goal=Goal("<=", 0.25)),
    ]  # fmt: skip
    if cfg.huge_bytes:
        rows.append(
            Row(f"a {size(cfg.huge_bytes)} slice works", v("ts_huge"), "bool", goal=Goal("yes"),
                note=str(figs.info.get("ts_huge", "")))
        )  # fmt: skip
    else:
        rows.append(Row("a 4 GiB slice works", None, "bool", note="skipped in --quick"))
    for r in rows:
        r.group = "service"
        if r.peer_value is None and r.peer != "—":
            r.note = r.note or "peer not measured in this run: add its group to --only"
    return rows


def group_tensorslice(cfg: Config, figs: Figures) -> list[Row]:
    ts = _tensorslice
    errors: list[str] = []

    def attempt(what: str, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as e:
            errors.append(f"{what}: {e!r}")
            traceback.print_exc()

    rows_stream = cfg.stream_bytes // (ROW_ELEMS * 4)
    specs = {
        "x": ts.TensorSpec((rows_stream, ROW_ELEMS)),
        "g": ts.TensorSpec(_gather.SHAPE),
    }

    def main_figures() -> None:
        server, port = ts.start_tensorslice_server(specs)
        with server:
            figs.values["ts_slice"] = ts.slice_throughput(
                port, "x", rows_stream, ROW_ELEMS, cfg.reps
            )
            figs.values["ts_slice_same_host"] = ts.slice_throughput(
                port, "x", rows_stream, ROW_ELEMS, cfg.reps, same_host=True
            )
            b, c = _gather.pick(*_gather.MAIN)
            want = _expected_gather(b, c)
            figs.values["ts_gather"] = ts.gather_throughput(port, "g", b, c, want, cfg.reps)

    def rss_figures() -> None:
        server, port = ts.start_tensorslice_server(
            {"x": ts.TensorSpec((cfg.rss_bytes // ts.ROW_BYTES, ROW_ELEMS))}
        )
        with server:
            spec = _rss.ClientSpec("bench._tensorslice:rss_setup", "bench._tensorslice:rss_receive")
            r = _rss.measure_transfer(server, port, spec, cfg.rss_bytes)
        figs.values["ts_rss_client"] = r.client_growth / MiB
        figs.values["ts_rss_server"] = r.server_growth / MiB

    def huge_figure() -> None:
        rows = cfg.huge_bytes // ts.ROW_BYTES
        server, port = ts.start_tensorslice_server({"x": ts.TensorSpec((rows, ROW_ELEMS))},
                                                   max_result_bytes=2 * cfg.huge_bytes)
        with server:
            ok, note = ts.huge_slice_works(port, "x", rows)
        figs.values["ts_huge"] = float(ok)
        figs.info["ts_huge"] = note

    attempt("slice/gather", main_figures)
    attempt("rss", rss_figures)
    if cfg.huge_bytes:
        attempt("4 GiB", huge_figure)
    rows = _service_rows(cfg, figs)
    if errors:
        figs.info["tensorslice_errors"] = errors
        for r in rows:
            if r.value is None:
                r.note = r.note or "failed: see tensorslice_errors in the JSON"
    return rows


def _expected_gather(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """x[b][:, c] of the served pattern tensor, computed from the pattern (no 512 MiB copy)."""
    _, ch, h, w = _gather.SHAPE
    rows = (b[:, None] * ch + c[None, :]).flatten()
    idx = rows[:, None] * (h * w) + torch.arange(h * w)[None, :]
    vals = idx.remainder_(PATTERN_MOD).to(torch.float32)
    return vals.view(b.numel(), c.numel(), h, w)


def group_small(cfg: Config, figs: Figures) -> list[Row]:
    """4 KiB reads against the raw unary call, interleaved round by round (both see the
    same machine): the same read repeated, a different row each call, and QPS."""
    ts = _tensorslice
    server, port = ts.start_tensorslice_server(
        {"s": ts.TensorSpec((16384, 1024))})  # 4 KiB rows, more than the calls read
    raw, raw_port = _grpc_raw.start_server(_grpc_raw.UNARY_BYTES)
    with server, raw:
        peer = _grpc_raw.RawClient(raw_port)
        try:
            m = ts.small_slice_figures(port, "s", cfg.lat_count, cfg.lat_seconds, cfg.reps,
                                       peer.unary)
        finally:
            peer.close()
    rows = [
        Row("4 KiB slice p50 latency", m["p50"], "s", "raw gRPC unary 4 KiB, interleaved",
            m["peer_p50"], goal=Goal("<=", 1.3)),
        Row("4 KiB slice p50 latency, a different row each call", m["fresh_p50"], "s",
            "raw gRPC unary 4 KiB, interleaved", m["peer_p50"],
            note="no answer cache, no kept request: every call parsed and planned"),
        Row("small-slice QPS, 8 threads", m["qps"], "/s", "raw gRPC unary QPS, interleaved",
            m["peer_qps"], goal=Goal(">=", 0.7)),
        Row("4 KiB slice p50 latency, same host (session)", m["same_p50"], "s",
            "raw gRPC unary 4 KiB over TCP, interleaved", m["peer_p50"], goal=Goal("<=", 1.0),
            note="the same read, a client on the server's host: calls over a same-host session"),
        Row("small-slice QPS, 8 threads, same host (session)", m["same_qps"], "/s",
            "raw gRPC unary QPS over TCP, interleaved", m["peer_qps"], goal=Goal(">=", 1.0)),
    ]  # fmt: skip
    for r in rows:
        r.group = "service"
    return rows


def group_tls(cfg: Config, figs: Figures) -> list[Row]:
    """The contiguous slice over TLS (gRPC and the bulk data plane encrypted) beside the
    same slice in plaintext, in the same run."""
    import tempfile

    from tests.certs import make_certs

    ts = _tensorslice
    rows = cfg.stream_bytes // (ROW_ELEMS * 4)
    specs = {"x": ts.TensorSpec((rows, ROW_ELEMS))}
    with tempfile.TemporaryDirectory() as tmp:
        certs = make_certs(Path(tmp))
        plain, port = ts.start_tensorslice_server(specs)
        with plain:
            figs.values["ts_slice_plain"] = ts.slice_throughput(port, "x", rows, ROW_ELEMS,
                                                                cfg.reps)
        tls, port = ts.start_tensorslice_server(
            specs, (str(certs.server_cert), str(certs.server_key)))
        with tls:
            figs.values["ts_slice_tls"] = ts.slice_throughput(
                port, "x", rows, ROW_ELEMS, cfg.reps, ca=str(certs.ca))
    return [Row(f"{size(cfg.stream_bytes)} slice → tensor, TLS (gRPC + bulk)",
                figs.values["ts_slice_tls"], "GB/s", "the same in plaintext",
                figs.values["ts_slice_plain"], group="service")]


def group_upload(cfg: Config, figs: Figures) -> list[Row]:
    """A put of the contiguous-slice size beside the download of the same size, on the same
    server in the same run (issue goal: upload >= 0.8x download)."""
    ts = _tensorslice
    rows = cfg.stream_bytes // (ROW_ELEMS * 4)
    server, port = ts.start_tensorslice_server({"x": ts.TensorSpec((rows, ROW_ELEMS))})
    with server:
        figs.values["ts_download"] = ts.slice_throughput(port, "x", rows, ROW_ELEMS, cfg.reps)
        figs.values["ts_upload"] = ts.upload_throughput(port, rows, ROW_ELEMS, cfg.reps)
    return [Row(f"{size(cfg.stream_bytes)} put (upload, bulk data plane) → acknowledged",
                figs.values["ts_upload"], "GB/s", "the same size downloaded (slice)",
                figs.values["ts_download"], goal=Goal(">=", 0.8), group="service")]


def group_recording(cfg: Config, figs: Figures) -> list[Row]:
    from bench import recording

    return [
        Row(d["figure"], d["value"], "s", d["peer"], d["peer_value"], "s", note=d["note"],
            group="service")
        for d in recording.run(cfg.quick)
    ]


def group_dataloader(cfg: Config, figs: Figures) -> list[Row]:
    from bench import dataloader

    return [
        Row(d["figure"], d["value"], "samples/s", d["peer"], d["peer_value"], "samples/s",
            goal=Goal(">=", dataloader.GOAL), group="service")
        for d in dataloader.run(cfg.quick)
    ]


def group_scaling(cfg: Config, figs: Figures) -> list[Row]:
    from bench import scaling

    return [
        Row(d["figure"], d["value"], d["unit"], d["peer"], d["peer_value"], d["unit"],
            goal=Goal(">=", 1.0), group="scaling")
        for d in scaling.run(cfg.quick)
    ]


GROUPS: dict[str, Callable[[Config, Figures], list[Row]]] = {
    "memcpy": group_memcpy,
    "socket": group_socket,
    "grpc": group_grpc,
    "flight": group_flight,
    "gather": group_gather,
    "rss": group_rss,
    "tensorslice": group_tensorslice,
    "small": group_small,
    "tls": group_tls,
    "upload": group_upload,
    "dataloader": group_dataloader,
    "recording": group_recording,
    "scaling": group_scaling,
}
_SERVICE_GROUPS = ("tensorslice", "small", "tls", "upload", "dataloader", "recording",
                   "scaling")
ALIASES = {"peers": [g for g in GROUPS if g not in _SERVICE_GROUPS],
           "service": list(_SERVICE_GROUPS)}


# --- output -----------------------------------------------------------------------------------


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "—"
    if unit == "s":
        return f"{v * 1e6:.0f} µs" if v < 0.1 else f"{v:.2f} s"
    if unit == "GB/s":
        return f"{v:.2f} GB/s"
    if unit == "/s":
        return f"{v:,.0f}/s"
    if unit == "MiB":
        return f"{v:,.0f} MiB"
    if unit == "bool":
        return "yes" if v else "no"
    return f"{v:g} {unit}"


def render(rows: list[Row], machine: dict[str, object], cfg: Config) -> str:
    head = ["figure", "value", "peer", "peer value", "ratio", "goal", "met"]
    notes: dict[str, int] = {}
    body = []
    for r in rows:
        mark = ""
        if r.note:
            mark = f" [{notes.setdefault(r.note, len(notes) + 1)}]"
        met = r.met
        body.append(
            [
                r.figure + mark,
                fmt(r.value, r.unit),
                r.peer,
                fmt(r.peer_value, r.peer_unit or r.unit),
                f"{r.ratio:.2f}×" if r.ratio is not None else "—",
                str(r.goal) if r.goal else "—",
                "—" if met is None else ("yes" if met else "no"),
            ]
        )
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    rule = "-+-".join("-" * w for w in widths)

    def line(cells: list[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, widths, strict=True)):
            out.append(cell.ljust(w) if i in (0, 2, 5) else cell.rjust(w))
        return " | ".join(out).rstrip()

    m = machine
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, {m.get('mem_gib', '?')} GiB; python "
        f"{m['python']}, torch {m['torch']}, grpcio {m['grpcio']}, pyarrow {m['pyarrow']}",
        f"mode: {'quick' if cfg.quick else 'full'}, medians of {cfg.reps} repetitions; "
        "servers in separate processes on 127.0.0.1",
        "",
        line(head),
        rule,
    ]
    prev = None
    for r, cells in zip(rows, body, strict=True):
        if prev is not None and r.group != prev:
            lines.append(rule)
        prev = r.group
        lines.append(line(cells))
    if notes:
        lines.append("")
        lines += [f"[{i}] {note}" for note, i in notes.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench", description=__doc__.split("\n")[0] if __doc__ else ""
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, few reps (smoke run)")
    ap.add_argument("--only", default="", help="groups to run: " + ",".join([*GROUPS, *ALIASES]))
    ap.add_argument("--reps", type=int, default=None, help="repetitions per figure (median)")
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"default {DEFAULT_JSON}")
    args = ap.parse_args(argv)

    names: list[str] = []
    for name in filter(None, (s.strip() for s in args.only.split(","))):
        if name in ALIASES:
            names += ALIASES[name]
        elif name in GROUPS:
            names.append(name)
        else:
            ap.error(f"unknown group {name!r}; choose from {', '.join([*GROUPS, *ALIASES])}")
    selected = [g for g in GROUPS if g in names] if names else list(GROUPS)
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be at least 1")

    cfg = Config.make(args.quick, args.reps)
    machine = machine_info()
    figs = Figures()
    rows: list[Row] = []
    timings: dict[str, float] = {}
    for name in selected:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            rows += GROUPS[name](cfg, figs)
        except Exception as e:
            traceback.print_exc()
            rows.append(Row(f"{name}: FAILED", None, "", note=repr(e)[:200], group=name))
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"[bench] {name} done in {timings[name]} s", file=sys.stderr, flush=True)

    print(render(rows, machine, cfg))
    result = {
        "machine": machine,
        "config": asdict(cfg),
        "groups": selected,
        "group_seconds": timings,
        "rows": [r.to_json() for r in rows],
        "values": figs.values,
        "info": figs.info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"\nJSON: {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
