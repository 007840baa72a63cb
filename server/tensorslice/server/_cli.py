"""The `tensorslice` command: serve, ls, get, health, demo."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from tensorslice.client import Client, Combine, TensorSliceError
from tensorslice.core.codec import dtype_name
from tensorslice.core.parse import parse_index
from tensorslice.core.selection import Selection, outer_selectors, selectors_from_index
from tensorslice.server._auth import StartupError, TlsFiles, read_token
from tensorslice.server._config import ServerConfig
from tensorslice.server._server import AddressInUse, create_server
from tensorslice.server._store import DEMO_DIM_NAMES, DEMO_NAME, TensorStore, demo_tensor

log = logging.getLogger("tensorslice.server")


def _parse_bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _bytes_or_none(text: str | None) -> int | None:
    return None if text is None else _parse_bytes(text)


def _split_tensor_arg(arg: str) -> tuple[str, Path, str | None]:
    """NAME=PATH[:KEY]; a PATH that exists as a file is taken whole (it may hold ':')."""
    name, sep, rest = arg.partition("=")
    if not sep or not name or not rest:
        raise SystemExit(f"--tensor wants NAME=PATH[:KEY]; got {arg!r}")
    if Path(rest).is_file() or ":" not in rest:
        return name, Path(rest), None
    path, _, key = rest.rpartition(":")
    return name, Path(path), key or None


def build_store(args: argparse.Namespace) -> TensorStore:
    budget = None if args.max_device_memory is None else _parse_bytes(args.max_device_memory)
    store = TensorStore(device=args.device, max_device_memory=budget)
    progress = not args.no_progress
    for arg in args.tensor or []:
        name, path, key = _split_tensor_arg(arg)
        store.load_file(path, key, name, progress=progress)
    for d in args.dir or []:
        store.load_dir(d, progress=progress)
    if len(store) == 0:
        store.add(DEMO_NAME, demo_tensor(), dim_names=DEMO_DIM_NAMES, source="generated demo")
    return store


def _security(args: argparse.Namespace) -> tuple[str | None, TlsFiles | None]:
    """The token and TLS files of `serve`, checked before anything loads."""
    token = read_token(args.token_file)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise StartupError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise StartupError("--tls-client-ca needs --tls-cert and --tls-key")
    tls = None
    if args.tls_cert is not None:
        tls = TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca)
        tls.load()  # every file readable and usable, or exit now
    return token, tls


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        token, tls = _security(args)
        store = build_store(args)
    except (TensorSliceError, StartupError) as exc:
        print(f"tensorslice: {exc}", file=sys.stderr)
        return 2
    config = ServerConfig(
        max_result_bytes=_bytes_or_none(args.max_result_bytes),
        max_calls=args.max_calls,
        call_wait=args.call_wait,
        send_timeout=args.send_timeout,
        max_materialized_bytes=_bytes_or_none(args.max_materialized_bytes),
        max_request_bytes=_bytes_or_none(args.max_request_bytes),
        bulk=not args.no_bulk,
        bulk_port=args.bulk_port,
        ticket_timeout=args.ticket_timeout,
        max_pending_tickets=args.max_pending_tickets,
        max_ticket_bytes=_bytes_or_none(args.max_ticket_bytes),
        max_bulk_connections=args.max_bulk_connections,
        handshake_timeout=args.handshake_timeout,
        token=token,
        tls=tls,
        metrics_port=args.metrics_port,
        reflection=not args.no_reflection,
    )
    try:
        server, port = create_server(store, f"{args.host}:{args.port}", config)
        server.start()
    except (AddressInUse, StartupError) as exc:
        print(f"tensorslice: {exc}", file=sys.stderr)
        return 2
    address = f"{args.host}:{port}"
    security = ", ".join(w for w in ("TLS" if tls else "plaintext",
                                     "mutual TLS" if tls and tls.client_ca else "",
                                     "token required" if token else "no token") if w)
    print(f"tensorslice serving {len(store)} tensor(s) on {address} ({store.device}; "
          f"{security})", flush=True)
    if server.bulk is not None:
        print(f"  bulk data plane on port {server.bulk.port}{' (TLS)' if tls else ''}",
              flush=True)
    if server.metrics_port is not None:
        print(f"  metrics on http://{args.host}:{server.metrics_port}/metrics", flush=True)
    if store.max_device_memory is not None:
        print(f"  device memory: {store.device_memory_used} of {store.max_device_memory} "
              f"bytes used", flush=True)
    for e in store.entries():
        print(f"  {e.meta.name}: {list(e.meta.shape)} {e.meta.dtype} ({e.source})", flush=True)
    if [e.meta.name for e in store.entries()] == [DEMO_NAME]:
        print(f"no tensors given: serving a generated demo tensor. Try:\n"
              f"  tensorslice ls {address}\n"
              f"  tensorslice get {address} {DEMO_NAME} '0:2, [1, 3], ..., 0'", flush=True)
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        print(f"tensorslice: {signal.Signals(signum).name} received, shutting down", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    stop.wait()
    server.stop(grace=5).wait()
    print("tensorslice: stopped", flush=True)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    with Client(args.address, timeout=args.timeout) as c:
        infos = c.list_tensors()
    rows = [("NAME", "SHAPE", "DTYPE", "DEVICE", "BYTES", "DIMS")]
    for i in infos:
        rows.append((i.name, str(list(i.shape)), dtype_name(i.dtype), i.device,
                     str(i.nbytes), ",".join(i.dim_names) or "-"))
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    index = parse_index(args.index)
    combine = Combine.OUTER if args.oindex else Combine.VECTORIZED
    sels = outer_selectors(index) if args.oindex else selectors_from_index(index)
    selection = Selection(sels, combine, args.dtype, 0)
    with Client(args.address, timeout=args.timeout) as c:
        plan = c.explain(args.name, selection)
        if args.output:
            data = c.slice_bytes(args.name, index, combine=combine, dtype=args.dtype)
            Path(args.output).write_bytes(data)
        values = c.slice(args.name, selection)["values"]
    print(f"shape: {list(values.shape)}")
    print(f"dtype: {dtype_name(values.dtype)}")
    print(f"plan:  {plan}")
    if values.numel():
        v = values.double()
        print(f"summary: min {v.min().item():.6g}  max {v.max().item():.6g}  "
              f"mean {v.mean().item():.6g}  elements {values.numel()}")
    if args.output:
        print(f"wrote {args.output}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """Exit 0 only when the server answers SERVING (for HEALTHCHECK and probes)."""
    try:
        with Client(args.address, timeout=args.timeout, retries=0) as c:
            status = c.health(args.service)
    except (TensorSliceError, ValueError) as exc:
        print(f"tensorslice: {args.address}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from tensorslice.server._demo import run_demo

    return run_demo(quick=args.quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tensorslice", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    # No abbreviations: `--token VALUE` must not pass for `--token-file`.
    s = sub.add_parser("serve", help="serve tensors", allow_abbrev=False)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=50051)
    s.add_argument("--tensor", action="append", metavar="NAME=PATH[:KEY]",
                   help="serve one tensor of a safetensors file (repeatable)")
    s.add_argument("--dir", action="append", metavar="DIR",
                   help="serve every tensor of every .safetensors file in DIR")
    s.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    s.add_argument("--max-device-memory", default=None, metavar="BYTES",
                   help="refuse loads beyond this many bytes on the device (RESOURCE_EXHAUSTED);"
                        " default on cuda: what is free minus max(1GiB, 10%%); cpu: no limit")
    s.add_argument("--max-result-bytes", default=None, metavar="BYTES",
                   help="refuse larger results (RESOURCE_EXHAUSTED); default an eighth of "
                        "the memory")
    s.add_argument("--max-calls", type=int, default=None, metavar="N",
                   help="calls served at once; more are refused with UNAVAILABLE (health "
                        "checks not counted); default 4 per CPU, at least 8")
    s.add_argument("--call-wait", type=float, default=2.0, metavar="SECONDS",
                   help="a call beyond --max-calls waits this long for a slot (at most "
                        "--max-calls calls wait), then is refused; default 2")
    s.add_argument("--send-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="cancel a stream (or drop a bulk transfer) whose reader stops this "
                        "long; default 10")
    s.add_argument("--max-materialized-bytes", default=None, metavar="BYTES",
                   help="bytes all calls may hold in memory at once (gathers, thresholds, "
                        "pending tickets); default a quarter of the memory")
    s.add_argument("--max-request-bytes", default=None, metavar="BYTES",
                   help="largest request message; default 64MiB (less on small machines)")
    s.add_argument("--bulk-port", type=int, default=0,
                   help="TCP port of the bulk data plane for large results (0: a free one)")
    s.add_argument("--no-bulk", action="store_true",
                   help="no bulk data plane: large results stream over gRPC only")
    s.add_argument("--ticket-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="a bulk ticket not redeemed this long expires; default 15")
    s.add_argument("--max-pending-tickets", type=int, default=256, metavar="N",
                   help="bulk tickets awaiting redemption at once; default 256")
    s.add_argument("--max-ticket-bytes", default=None, metavar="BYTES",
                   help="materialised bytes pending tickets may hold; default a sixteenth "
                        "of the memory")
    s.add_argument("--max-bulk-connections", type=int, default=64, metavar="N",
                   help="bulk connections open at once; more are closed; default 64")
    s.add_argument("--handshake-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time a bulk connection has to present its whole token; default 5")
    s.add_argument("--token-file", default=os.environ.get("TENSORSLICE_TOKEN_FILE"),
                   metavar="PATH",
                   help="require the bearer token this file holds on every call but health "
                        "checks (default: $TENSORSLICE_TOKEN_FILE, else the token in "
                        "$TENSORSLICE_TOKEN, else none)")
    s.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="serve TLS (gRPC and bulk) with this certificate chain")
    s.add_argument("--tls-key", default=None, metavar="PEM", help="the certificate's key")
    s.add_argument("--tls-client-ca", default=None, metavar="PEM",
                   help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0: a free port)")
    s.add_argument("--no-reflection", action="store_true",
                   help="do not serve gRPC server reflection")
    s.add_argument("--no-progress", action="store_true", help="no progress bars while loading")
    s.set_defaults(fn=cmd_serve)

    ls = sub.add_parser("ls", help="list the tensors a server holds")
    ls.add_argument("address")
    ls.add_argument("--timeout", type=float, default=30.0)
    ls.set_defaults(fn=cmd_ls)

    g = sub.add_parser("get", help="fetch a slice: tensorslice get ADDR NAME '0:10, [1, 3]'")
    g.add_argument("address")
    g.add_argument("name")
    g.add_argument("index", nargs="?", default="",
                   help="NumPy-style index, e.g. '0:10, [1,3], ...'")
    g.add_argument("-o", "--output", help="write the result as a safetensors file")
    g.add_argument("--oindex", action="store_true",
                   help="combine index lists orthogonally (x[b][:, c]) instead of like PyTorch")
    g.add_argument("--dtype", default=None, help="cast the result, e.g. float16")
    g.add_argument("--timeout", type=float, default=60.0)
    g.set_defaults(fn=cmd_get)

    h = sub.add_parser("health", help="exit 0 when the server is SERVING, 1 otherwise")
    h.add_argument("address")
    h.add_argument("--service", default="",
                   help="the health service name: '' (default) for the server, or "
                        "tensorslice.v1.TensorSlice")
    h.add_argument("--timeout", type=float, default=5.0)
    h.set_defaults(fn=cmd_health)

    d = sub.add_parser("demo", help="run a server and a client in one process")
    d.add_argument("--quick", action="store_true", help="a smaller tensor")
    d.set_defaults(fn=cmd_demo)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except TensorSliceError as exc:
        print(f"tensorslice: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
