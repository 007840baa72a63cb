"""The tensorslice command: serve, ls, get, health, demo.

Exit status: 0 on success; 2 for a usage or start-up error (a bad option, a file that is
missing, two tensors of one name, a port in use), with a one-line message and no
traceback; 1 when the server answers `ls` or `get` with an error, or `health` finds it
not SERVING.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

# Each command imports what it needs when it runs: `tensorslice health`, a container's
# HEALTHCHECK, must not pay for importing torch.
from tensorslice.core.errors import TensorSliceError

if TYPE_CHECKING:
    from tensorslice.server._auth import TlsFiles
    from tensorslice.server._server import TensorSliceServer
    from tensorslice.server._store import TensorStore

log = logging.getLogger("tensorslice.server")

DESCRIPTION = """\
Serve tensors held in memory and fetch slices of them.

  tensorslice serve --tensor acts=/data/acts.safetensors    serve one file
  tensorslice ls 127.0.0.1:50051                            list what a server holds
  tensorslice get 127.0.0.1:50051 acts '0:10, [1, 3]'       fetch one slice
  tensorslice demo                                          a server and a client in one run
"""

BYTE_SIZES = """\
BYTES is a number of bytes, optionally followed by K, M, G or T, with or without B or
iB; every suffix is binary (1K = 1KB = 1KiB = 1024 bytes, 1GB = 1GiB); 0 means no limit."""

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_BYTE_SIZE = re.compile(r"(\d+(\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?")


class UsageError(Exception):
    """A command line or start-up error: printed as one line, exit status 2."""


def parse_bytes(text: str) -> int:
    """A byte size (see `BYTE_SIZES`): ``"64GiB"``, ``"1.5G"``, ``"4096"``, ``"0"``."""
    m = _BYTE_SIZE.fullmatch(text.strip().lower())
    if m is None or (not m.group(3) and "." in m.group(1)):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte size: a whole number of bytes, or a number with K, M, G "
            f"or T (binary: 1GB = 1GiB = 1073741824), e.g. 64GiB; 0 means no limit"
        )
    number, unit = m.group(1), m.group(3)
    return int(float(number) * _UNITS[unit]) if unit else int(number)


def _index(text: str) -> tuple[object, ...]:
    from tensorslice.core.parse import parse_index

    try:
        return parse_index(text)
    except TensorSliceError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds(text: str) -> float:
    """A duration in seconds, 0 or more (``"300"``, ``"0.5"``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: a number of seconds, 0 or more, e.g. 300")
    return value


def parse_rows(text: str) -> tuple[int, int]:
    """A row range ``START:STOP`` of dimension 0 (``0 <= START <= STOP``)."""
    start, sep, stop = text.partition(":")
    if not (sep and start.strip().isdigit() and stop.strip().isdigit()):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a row range: START:STOP, two whole numbers, e.g. 0:1000")
    rows = int(start), int(stop)
    if rows[0] > rows[1]:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a row range: START {rows[0]} is beyond STOP {rows[1]}")
    return rows


def _log_level(text: str) -> str:
    level = text.upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a log level (DEBUG, INFO, WARNING, ERROR or CRITICAL)"
        )
    return level


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``tensorslice serve: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One tensor to load: its name, file and key, and the option that asked for it."""

    name: str
    path: Path
    key: str | None
    option: str

    def describe(self) -> str:
        where = f"{self.path}:{self.key}" if self.key else str(self.path)
        return self.option if self.option.endswith(where) else f"{self.option} ({where})"


def _split_tensor_arg(arg: str) -> tuple[str, Path, str | None]:
    """NAME=PATH[:KEY]; a PATH that exists as a file is taken whole (it may hold ':')."""
    name, sep, rest = arg.partition("=")
    if not sep or not name or not rest:
        raise UsageError(f"--tensor wants NAME=PATH[:KEY]; got {arg!r}")
    if Path(rest).is_file() or ":" not in rest:
        return name, Path(rest), None
    path, _, key = rest.rpartition(":")
    return name, Path(path), key or None


def plan_sources(tensors: Sequence[str], dirs: Sequence[str]) -> list[Source]:
    """Every tensor the options name, in load order. Two of one name are refused, naming
    both sources (within one directory the `FILESTEM/KEY` rule applies first)."""
    from tensorslice.server._store import TensorStore

    sources = []
    for arg in tensors:
        name, path, key = _split_tensor_arg(arg)
        sources.append(Source(name, path, key, f"--tensor {arg}"))
    for d in dirs:
        for name, path, key in TensorStore.dir_sources(d):
            sources.append(Source(name, path, key, f"--dir {d}"))
    seen: dict[str, Source] = {}
    for s in sources:
        first = seen.setdefault(s.name, s)
        if first is not s:
            raise UsageError(
                f"two tensors named {s.name!r}: {first.describe()} and {s.describe()}; "
                f"give one another name with --tensor NAME=PATH:KEY"
            )
    return sources


def load(store: TensorStore, sources: Sequence[Source], *, progress: bool = True,
         rows: tuple[int, int] | None = None) -> None:
    """Load every source into `store` (only `rows` of dimension 0 of each, where given);
    with none, the generated demo tensor."""
    from tensorslice.server._store import DEMO_DIM_NAMES, DEMO_NAME, demo_tensor

    for s in sources:
        store.load_file(s.path, s.key, s.name, progress=progress, rows=rows)
    if len(store) == 0:
        store.add(DEMO_NAME, demo_tensor(), dim_names=DEMO_DIM_NAMES, source="generated demo")


# ---------------------------------------------------------------------------- commands


def _check_free(host: str, port: int, option: str) -> None:
    """Refuse a port that cannot be bound, before anything is loaded (and before gRPC's own
    bind, whose failure says less)."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        socket.create_server((host.strip("[]"), port), family=family).close()
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {host}:{port} ({option}): {exc.strerror or exc}"
        ) from None


def _security(args: argparse.Namespace) -> tuple[str | None, TlsFiles | None]:
    """The token and TLS files of `serve`, checked before anything loads."""
    from tensorslice.server._auth import StartupError, TlsFiles, read_token

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


def _start(
    args: argparse.Namespace,
) -> tuple[TensorSliceServer, int, TensorStore, str | None, TlsFiles | None]:
    """The server of `serve`, its ports bound, then its tensors loaded (not yet started):
    a port in use fails at once, before any file is read."""
    from tensorslice.server._config import ServerConfig
    from tensorslice.server._server import AddressInUse, create_server
    from tensorslice.server._store import TensorStore

    sources = plan_sources(args.tensor, args.dir)
    token, tls = _security(args)
    write_token = None
    if args.write_token_file is not None:
        from tensorslice.server._auth import read_token

        write_token = read_token(args.write_token_file)
        if token is None:
            raise UsageError("--write-token-file needs a read token too (--token-file or "
                             "$TENSORSLICE_TOKEN): reads would otherwise need none")
    _check_free(args.host, args.port, "--port")
    if not args.no_bulk:
        _check_free(args.host, args.bulk_port, "--bulk-port")
    store = TensorStore(device=args.device, max_device_memory=args.max_device_memory,
                        max_memory=args.max_memory)
    if args.data_dir is not None:
        from tensorslice.server._persist import DataDir

        store.persist = DataDir(args.data_dir)
    config = ServerConfig(
        max_result_bytes=args.max_result_bytes,
        max_calls=args.max_calls,
        call_wait=args.call_wait,
        send_timeout=args.send_timeout,
        max_materialized_bytes=args.max_materialized_bytes,
        max_request_bytes=args.max_request_bytes,
        bulk=not args.no_bulk,
        bulk_port=args.bulk_port,
        ticket_timeout=args.ticket_timeout,
        max_pending_tickets=args.max_pending_tickets,
        max_ticket_bytes=args.max_ticket_bytes,
        max_bulk_connections=args.max_bulk_connections,
        handshake_timeout=args.handshake_timeout,
        token=token,
        tls=tls,
        metrics_port=args.metrics_port,
        reflection=not args.no_reflection,
        read_only=args.read_only,
        write_token=write_token,
        unix_socket=args.unix,
        max_connection_age=args.max_connection_age,
        advertise_host=args.advertise_host,
    )
    try:
        server, port = create_server(store, f"{args.host}:{args.port}", config)
    except AddressInUse as exc:  # taken between the check and the bind
        raise UsageError(str(exc)) from None
    if store.persist is not None:
        store.restore()
    if args.rows is not None and not sources:
        raise UsageError("--rows takes rows of the files --tensor and --dir name; none given")
    load(store, sources, progress=not args.no_progress, rows=args.rows)
    return server, port, store, token, tls


def cmd_serve(args: argparse.Namespace) -> int:
    from tensorslice.server._auth import StartupError
    from tensorslice.server._hostmem import return_large_frees
    from tensorslice.server._server import AddressInUse
    from tensorslice.server._store import DEMO_NAME

    return_large_frees()  # the process is the server's: its freed memory goes back
    try:
        server, port, store, token, tls = _start(args)
        server.start()
    except (TensorSliceError, StartupError, AddressInUse) as exc:
        # a file, a key, a device, a budget, a token or TLS file, a port
        raise UsageError(str(exc)) from None
    # Before the first line is printed: whoever reads it may signal at once.
    stop = threading.Event()

    def _on_signal(signum: int, frame: object) -> None:
        print(f"tensorslice: {signal.Signals(signum).name} received, shutting down", flush=True)
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    address = f"{args.host}:{port}"
    security = ", ".join(w for w in ("TLS" if tls else "plaintext",
                                     "mutual TLS" if tls and tls.client_ca else "",
                                     "token required" if token else "no token") if w)
    print(f"tensorslice serving {len(store)} tensor(s) on {address} ({store.device}; "
          f"{security})", flush=True)
    if args.unix is not None:
        print(f"  also on unix:{args.unix}", flush=True)
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
    stop.wait()
    server.stop(grace=5).wait()
    print("tensorslice: stopped", flush=True)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from tensorslice.client import Client
    from tensorslice.core.codec import dtype_name

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
    from tensorslice.client import Client, Combine
    from tensorslice.core.codec import dtype_name
    from tensorslice.core.selection import Selection, outer_selectors, selectors_from_index

    index = args.index
    combine = Combine.OUTER if args.oindex else Combine.VECTORIZED
    sels = outer_selectors(index) if args.oindex else selectors_from_index(index)
    selection = Selection(sels, combine, args.dtype, 0)
    with Client(args.address, timeout=args.timeout) as c:
        plan = c.explain(args.name, selection)
        if args.output:  # one transfer: the file is written, and its tensor read from it
            from safetensors.torch import load

            data = c.slice_bytes(args.name, index, combine=combine, dtype=args.dtype)
            Path(args.output).write_bytes(data)
            values = load(data)["values"]
        else:
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
    import grpc

    from tensorslice.server._probe import health_status

    try:
        status = health_status(args.address, args.service, args.timeout)
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"tensorslice health: {args.address}: {code.name}: {details}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a TLS file named in the environment is missing
        print(f"tensorslice health: {exc}", file=sys.stderr)
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


_CLUSTER_SETS = ("--port", "--bulk-port", "--rows", "--unix")
"""serve options the cluster sets for each server itself."""


def cmd_cluster(args: argparse.Namespace) -> int:
    from tensorslice.server._cluster import ClusterError, launch

    passed = list(getattr(args, "serve_args", []))
    owned = [a for a in passed if a.split("=", 1)[0] in _CLUSTER_SETS]
    if owned:
        raise UsageError(f"{', '.join(owned)}: the cluster sets these for each server "
                         f"(--base-port, --rows-split)")
    # Every other option goes to each server as it is: checked here, before any starts.
    build_parser().parse_args(["serve", *passed])
    try:
        return launch(args, passed)
    except ClusterError as exc:
        if exc.status == 2:
            raise UsageError(str(exc)) from None
        print(f"tensorslice cluster: {exc}", file=sys.stderr, flush=True)
        return exc.status


def _cuts(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of row numbers, e.g. 1000,2500") from None


def cmd_demo(args: argparse.Namespace) -> int:
    from tensorslice.server._demo import run_demo

    return run_demo(quick=args.quick)


# ---------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``tensorslice`` command (its help is the reference)."""
    log_help = "DEBUG, INFO, WARNING or ERROR (default: INFO); before or after the command"
    parser = _Parser(prog="tensorslice", description=DESCRIPTION,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", type=_log_level, default="INFO", metavar="LEVEL",
                        help=log_help)
    common = _Parser(add_help=False)
    common.add_argument("--log-level", type=_log_level, default=argparse.SUPPRESS, metavar="LEVEL",
                        help=log_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # No abbreviations: `--token VALUE` must not pass for `--token-file`.
    s = sub.add_parser("serve", help="serve tensors", parents=[common], epilog=BYTE_SIZES,
                       description="Serve tensors of safetensors files over gRPC.",
                       allow_abbrev=False)
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on, for gRPC and the bulk data plane "
                        "(default: %(default)s; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=50051,
                   help="gRPC port (default: %(default)s; 0: a free one)")
    s.add_argument("--unix", default=None, metavar="PATH",
                   help="also listen for gRPC on this Unix domain socket (clients on this "
                        "host: unix:PATH; large results still use the bulk data plane, "
                        "reached on loopback)")
    s.add_argument("--advertise-host", default=None, metavar="HOST",
                   help="the host bulk tickets name, where clients reach this server "
                        "(replicas behind one name need it) (default: the --host where "
                        "it is one address; none for 0.0.0.0 or ::, and clients use the host "
                        "they called)")
    s.add_argument("--tensor", action="append", default=[], metavar="NAME=PATH[:KEY]",
                   help="serve one tensor of a safetensors file as NAME; KEY names it in a "
                        "file of several (repeatable)")
    s.add_argument("--dir", action="append", default=[], metavar="DIR",
                   help="serve every tensor of every .safetensors file in DIR, named by its "
                        "key, or FILESTEM/KEY for a key in several files (repeatable)")
    s.add_argument("--rows", type=parse_rows, default=None, metavar="START:STOP",
                   help="load only rows [START, STOP) of dimension 0 of each tensor of "
                        "--tensor and --dir (one shard of a tensor split by rows) "
                        "(default: every row)")
    s.add_argument("--device", default="cpu", metavar="cpu|cuda|cuda:N",
                   help="where the tensors live (default: %(default)s)")
    s.add_argument("--max-device-memory", type=parse_bytes, default=None, metavar="BYTES",
                   help="budget for the tensors on the device; a load beyond it is refused "
                        "(default: on cuda what is free minus max(1GiB, 10%%); "
                        "on cpu no limit)")
    s.add_argument("--max-memory", type=parse_bytes, default=None, metavar="BYTES",
                   help="host budget for the tensors of a cpu server, old versions still "
                        "being read included; an upload or append beyond it is refused "
                        "with RESOURCE_EXHAUSTED (default: half of the memory; 0: none)")
    s.add_argument("--data-dir", default=None, metavar="DIR",
                   help="keep uploaded tensors in DIR: every acknowledged put, append and "
                        "drop is on disk before the call returns, and a restart with the "
                        "same DIR serves them again")
    s.add_argument("--read-only", action="store_true",
                   help="refuse put, append and drop with PERMISSION_DENIED")
    s.add_argument("--write-token-file", default=None, metavar="PATH",
                   help="writes (put, append, drop) need the token this file holds; reads "
                        "take it or the read token (needs --token-file)")
    s.add_argument("--max-result-bytes", type=parse_bytes, default=None, metavar="BYTES",
                   help="refuse larger results with RESOURCE_EXHAUSTED (default: an eighth "
                        "of the memory)")
    s.add_argument("--max-calls", type=int, default=None, metavar="N",
                   help="calls served at once; more are refused with UNAVAILABLE (health "
                        "checks not counted) (default: 4 per CPU, at least 8)")
    s.add_argument("--call-wait", type=float, default=2.0, metavar="SECONDS",
                   help="a call beyond --max-calls waits this long for a slot (at most "
                        "--max-calls calls wait), then is refused (default: %(default)s)")
    s.add_argument("--send-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="cancel a stream (or drop a bulk transfer) whose reader stops this "
                        "long (default: %(default)s)")
    s.add_argument("--max-materialized-bytes", type=parse_bytes, default=None, metavar="BYTES",
                   help="bytes all calls may hold in memory at once (gathers, thresholds, "
                        "pending tickets) (default: a quarter of the memory)")
    s.add_argument("--max-request-bytes", type=parse_bytes, default=None, metavar="BYTES",
                   help="largest request message (default: 64MiB, less on small machines)")
    s.add_argument("--bulk-port", type=int, default=0, metavar="PORT",
                   help="TCP port of the bulk data plane for results over 1 MiB "
                        "(default: %(default)s: a free one)")
    s.add_argument("--no-bulk", action="store_true",
                   help="no bulk data plane: large results stream over gRPC")
    s.add_argument("--ticket-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="a bulk ticket not redeemed this long expires (default: %(default)s)")
    s.add_argument("--max-pending-tickets", type=int, default=256, metavar="N",
                   help="bulk tickets awaiting redemption at once (default: %(default)s)")
    s.add_argument("--max-ticket-bytes", type=parse_bytes, default=None, metavar="BYTES",
                   help="materialised bytes pending tickets may hold (default: a sixteenth "
                        "of the memory)")
    s.add_argument("--max-bulk-connections", type=int, default=64, metavar="N",
                   help="bulk connections open at once; more are closed (default: %(default)s)")
    s.add_argument("--handshake-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time a bulk connection has to present its whole token "
                        "(default: %(default)s)")
    s.add_argument("--max-connection-age", type=_seconds, default=0.0, metavar="SECONDS",
                   help="ask each client to reconnect after this long (gRPC GOAWAY; calls "
                        "running then get 30 s more), so that clients of a load-balanced "
                        "name find new replicas (default: %(default)s: never)")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bars while files of 64 MiB or more load")
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
    s.set_defaults(fn=cmd_serve)

    ls = sub.add_parser("ls", help="list the tensors a server holds", parents=[common],
                        description="List the tensors a server holds.")
    ls.add_argument("address", help="the server, HOST:PORT")
    ls.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                    help="deadline of the call (default: %(default)s)")
    ls.set_defaults(fn=cmd_ls)

    g = sub.add_parser("get", help="fetch a slice and summarize it", parents=[common],
                       description="Fetch one slice; print its shape, dtype, plan and a "
                                   "summary of its values.")
    g.add_argument("address", help="the server, HOST:PORT")
    g.add_argument("name", help="the tensor's name")
    g.add_argument("index", nargs="?", default="", type=_index,
                   help="a NumPy-style index: ranges, ints, lists, nested lists, bools, ..., "
                        "None, e.g. '0:10, [1, 3], ...' (default: the whole tensor)")
    g.add_argument("-o", "--output", metavar="FILE",
                   help="also write the result as a safetensors file")
    g.add_argument("--oindex", action="store_true",
                   help="combine index lists orthogonally (x[b][:, c]) instead of like PyTorch")
    g.add_argument("--dtype", default=None,
                   help="have the server cast the result, e.g. float16 (default: as stored)")
    g.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="deadline of each call (default: %(default)s)")
    g.set_defaults(fn=cmd_get)

    h = sub.add_parser("health", help="exit 0 when the server is SERVING, 1 otherwise",
                       parents=[common],
                       description="Ask a server's health service; exit 0 when it answers "
                                   "SERVING, 1 otherwise.")
    h.add_argument("address", help="the server, HOST:PORT")
    h.add_argument("--service", default="",
                   help="the health service name: '' (the default) for the server, or "
                        "tensorslice.v1.TensorSlice")
    h.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="deadline of the call (default: %(default)s)")
    h.set_defaults(fn=cmd_health)

    c = sub.add_parser(
        "cluster", help="start shards x replicas of serve on this host", parents=[common],
        allow_abbrev=False,
        description="Start --shards x --replicas serve processes on this host, "
                    "the tensors' rows split over the shards; write the cluster spec once "
                    "every server is healthy. Other serve options go to every server.")
    c.add_argument("--shards", type=int, required=True, metavar="N",
                   help="shards: the rows of dimension 0 are split over them")
    c.add_argument("--replicas", type=int, default=1, metavar="R",
                   help="servers per shard, each holding the shard's rows "
                        "(default: %(default)s)")
    c.add_argument("--tensor", action="append", default=[], metavar="NAME=PATH[:KEY]",
                   help="a tensor to split (repeatable; all of one length along dimension 0)")
    c.add_argument("--dir", action="append", default=[], metavar="DIR",
                   help="every tensor of every .safetensors file in DIR (repeatable)")
    c.add_argument("--spec-out", required=True, metavar="FILE",
                   help="write the cluster spec (JSON) here once every server is healthy")
    c.add_argument("--rows-split", type=_cuts, default=[], metavar="C1,C2,...",
                   help="cut the rows at these row numbers (shards - 1 of them, increasing) "
                        "instead of evenly")
    c.add_argument("--host", default="127.0.0.1",
                   help="address every server listens on (default: %(default)s)")
    c.add_argument("--base-port", type=int, default=0, metavar="P",
                   help="server k (shard-major) takes gRPC port P+2k and bulk port P+2k+1 "
                        "(default: %(default)s: free ports)")
    c.add_argument("--startup-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="every server must be healthy within this (default: %(default)s)")
    c.set_defaults(fn=cmd_cluster)

    d = sub.add_parser("demo", help="a server and a client in one process", parents=[common],
                       description="A server and a client in one process: the three slicing "
                                   "patterns, their plans and timings.")
    d.add_argument("--quick", action="store_true", help="a smaller tensor")
    d.set_defaults(fn=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "cluster":
            parser.parse_args(argv)  # the usual error: unrecognized arguments
        args.serve_args = extra
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except UsageError as exc:
        print(f"tensorslice {args.command}: {exc}", file=sys.stderr)
        return 2
    except TensorSliceError as exc:
        print(f"tensorslice {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
