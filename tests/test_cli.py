"""The command line and the store's loading rules."""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _output import OutputLines
from safetensors.torch import load_file, save_file

from tensorslice.client import Client, InvalidSelection, TensorNotFound
from tensorslice.core.parse import parse_index
from tensorslice.server import TensorStore
from tensorslice.server._cli import UsageError, build_parser, main, parse_bytes, plan_sources


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0:10, [1,3,5]", (slice(0, 10), [1, 3, 5])),
        ("..., None, -1", (Ellipsis, None, -1)),
        ("::-2", (slice(None, None, -2),)),
        ("[[0, 1], [2, 3]], [True, False]", ([[0, 1], [2, 3]], [True, False])),
        ("", ()),
        ("3", (3,)),
    ],
)
def test_parse_index(text: str, expected: tuple[object, ...]) -> None:
    assert parse_index(text) == expected


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("__import__('os')", "cannot parse index \"__import__('os')\": \"__import__('os')\" is "
                             "not an integer, range, list, ... or None"),
        ("1.5", "cannot parse index '1.5': '1.5' is not an integer, range, list, ... or None"),
        ("0:", None),
    ],
)
def test_parse_index_refuses(text: str, message: str | None) -> None:
    if message is None:
        assert parse_index(text) == (slice(0, None),)
        return
    with pytest.raises(InvalidSelection, match=re.escape(message)):
        parse_index(text)


@pytest.mark.e2e
def test_get_prints_shape_plan_and_writes_file(
    server: str, demo: torch.Tensor, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.safetensors"
    assert main(["get", server, "demo", "0:3, [3, 1], ..., 0", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shape: [3, 2, 6]" in text
    assert "dtype: float32" in text
    assert "plan:" in text and "gather" in text
    assert torch.equal(load_file(str(out))["values"], demo[0:3, [3, 1], ..., 0])


@pytest.mark.e2e
def test_get_unknown_tensor_exits_1(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["get", server, "nope", "0"]) == 1
    assert "TensorNotFound: no tensor named 'nope'" in capsys.readouterr().err


@pytest.mark.e2e
def test_ls(server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls", server]) == 0
    out = capsys.readouterr().out
    assert re.search(r"demo\s+\[16, 12, 6, 5\]\s+float32\s+\S+\s+23040\s+N,C,H,W", out), out


@pytest.mark.unit
def test_store_file_rules(tmp_path: Path) -> None:
    a = torch.arange(12.0).reshape(3, 4)
    save_file({"a": a, "b": a * 2}, str(tmp_path / "multi.safetensors"))
    save_file({"x": a}, str(tmp_path / "one.safetensors"), metadata={"dim_names": "rows,cols"})
    store = TensorStore()
    with pytest.raises(InvalidSelection, match=re.escape("holds 2 tensors (a, b); name one")):
        store.load_file(tmp_path / "multi.safetensors")
    with pytest.raises(TensorNotFound, match="holds no tensor 'c'; it holds: a, b"):
        store.load_file(tmp_path / "multi.safetensors", "c")
    save_file({}, str(tmp_path / "none.safetensors"), metadata={"only": "metadata"})
    with pytest.raises(InvalidSelection, match=r"none\.safetensors holds no tensors$"):
        store.load_file(tmp_path / "none.safetensors")
    e = store.load_file(tmp_path / "multi.safetensors", "b", "bee")
    assert torch.equal(e.tensor, a * 2) and e.meta.name == "bee"
    e = store.load_file(tmp_path / "one.safetensors")
    assert e.meta.name == "x" and e.meta.dim_names == ("rows", "cols")
    with pytest.raises(TensorNotFound, match="no such file"):
        store.load_file(tmp_path / "missing.safetensors")


@pytest.mark.unit
def test_store_dir_names_clashes_by_file(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2), "y": torch.ones(3)}, str(tmp_path / "part1.safetensors"))
    save_file({"x": torch.ones(4)}, str(tmp_path / "part2.safetensors"))
    store = TensorStore()
    store.load_dir(tmp_path)
    names = sorted(e.meta.name for e in store.entries())
    assert names == ["part1/x", "part2/x", "y"]
    assert store.get("part2/x").meta.shape == (4,)


@pytest.mark.e2e
def test_serve_subprocess_demo_and_sigterm(tmp_path: Path) -> None:
    x = torch.randn(40, 3)
    path = tmp_path / "x.safetensors"
    save_file({"x": x}, str(path))
    proc = subprocess.Popen(  # port 0: the server prints the port it bound
        [sys.executable, "-m", "tensorslice.server._cli", "serve", "--port", "0",
         "--tensor", f"x={path}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        address = OutputLines(proc).wait_for(r"serving 1 tensor\(s\) on (\S+)")
        with Client(address, timeout=10) as c:
            assert torch.equal(c.tensor("x")[5:9], x[5:9])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0  # the grace period, on a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.e2e
def test_serve_without_tensors_serves_demo() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorslice.server._cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        # Bounds, not measurements: a loaded machine may take minutes to start a server.
        lines = OutputLines(proc)
        address = lines.wait_for(r"serving 1 tensor\(s\) on (\S+)", timeout=300)
        hint = lines.wait_for(r"(no tensors given: serving a generated demo tensor)",
                              timeout=300)
        assert hint
        with Client(address, timeout=120) as c:
            assert [t.name for t in c.list_tensors()] == ["demo"]
        proc.send_signal(signal.SIGINT)
        lines.wait_for(r"(tensorslice: stopped)", timeout=300)
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------- usage errors


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The command as a person runs it: a process of its own, its exit status and output."""
    return subprocess.run(
        [sys.executable, "-m", "tensorslice.server._cli", *args],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def _assert_usage_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit status 2, one line on stderr that holds every fragment, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("4096", 4096), ("64GiB", 64 << 30), ("64GB", 64 << 30), ("64g", 64 << 30),
     ("1.5K", 1536), ("2 MiB", 2 << 20), ("1T", 1 << 40), ("512b", 512)],
)
def test_byte_sizes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.unit
@pytest.mark.parametrize("text", ["lots", "-1", "1.5", "", "nanG", "infG", "1e3", "5X"])
def test_byte_sizes_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(f"{text!r} is not a byte size")):
        parse_bytes(text)


@pytest.mark.e2e
@pytest.mark.parametrize("option", ["--max-result-bytes", "--max-device-memory"])
def test_bad_byte_size_is_one_line_exit_2(option: str) -> None:
    proc = _cli("serve", option, "lots")
    _assert_usage_error(proc, f"argument {option}: 'lots' is not a byte size",
                        "0 means no limit")


@pytest.mark.unit
def test_zero_device_memory_means_no_budget() -> None:
    assert TensorStore("cpu", max_device_memory=0).max_device_memory is None


@pytest.mark.e2e
def test_bad_options_are_one_line_exit_2(tmp_path: Path) -> None:
    _assert_usage_error(_cli("serve", "--port", "x"), "argument --port: invalid int value: 'x'")
    _assert_usage_error(_cli("serve", "--port", "0", "--tensor", "nonsense"),
                        "--tensor wants NAME=PATH[:KEY]; got 'nonsense'")
    _assert_usage_error(
        _cli("serve", "--port", "0", "--tensor", f"x={tmp_path}/missing.safetensors"),
        "no such file")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    _assert_usage_error(_cli("serve", "--port", "0", "--dir", str(tmp_path)),
                        f"{tmp_path}/bad.safetensors is not a readable safetensors file")
    _assert_usage_error(_cli("get", "127.0.0.1:1", "x", "1.5"),
                        "cannot parse index '1.5'")
    _assert_usage_error(_cli("--log-level", "LOUD", "ls", "127.0.0.1:1"),
                        "'LOUD' is not a log level")


@pytest.mark.e2e
def test_ports_in_use_are_one_line_exit_2() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = str(held.getsockname()[1])
        _assert_usage_error(_cli("serve", "--port", port), f"cannot listen on 127.0.0.1:{port} "
                            "(--port)")
        _assert_usage_error(_cli("serve", "--port", "0", "--bulk-port", port),
                            f"cannot listen on 127.0.0.1:{port} (--bulk-port): "
                            "Address already in use")


@pytest.mark.e2e
def test_wrong_number_of_dim_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"x": torch.zeros(2, 3)}, str(path), metadata={"dim_names": "N,C,H"})
    with pytest.raises(InvalidSelection, match=re.escape(
            f"{path}: dim_names 'N,C,H' names 3 dimensions but tensor 'x' has 2")):
        TensorStore().load_file(path)
    _assert_usage_error(_cli("serve", "--port", "0", "--tensor", f"x={path}"),
                        "names 3 dimensions")


# ---------------------------------------------------------------------------- name clashes


@pytest.mark.e2e
def test_name_clashes_across_sources_are_refused(tmp_path: Path) -> None:
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    d1.mkdir()
    d2.mkdir()
    save_file({"y": torch.zeros(2)}, str(d1 / "a.safetensors"))
    save_file({"y": torch.ones(2), "z": torch.ones(1)}, str(d2 / "b.safetensors"))
    single = tmp_path / "y.safetensors"
    save_file({"v": torch.ones(3)}, str(single))
    with pytest.raises(UsageError, match=re.escape(
            f"two tensors named 'y': --tensor y={single} and --dir {d1} ({d1}/a.safetensors:y)")):
        plan_sources([f"y={single}"], [str(d1)])
    with pytest.raises(UsageError, match=re.escape(
            f"two tensors named 'y': --dir {d1} ({d1}/a.safetensors:y) and --dir {d2} "
            f"({d2}/b.safetensors:y)")):
        plan_sources([], [str(d1), str(d2)])
    with pytest.raises(UsageError, match="two tensors named 'y'"):
        plan_sources([f"y={single}", f"y={d1}/a.safetensors"], [])
    # No clash: every source keeps its name.
    assert [s.name for s in plan_sources([f"w={single}"], [str(d2)])] == ["w", "y", "z"]
    proc = _cli("serve", "--port", "0", "--tensor", f"y={single}", "--dir", str(d1))
    _assert_usage_error(proc, "two tensors named 'y'", "give one another name")


@pytest.mark.unit
def test_name_clash_check_does_not_load(tmp_path: Path) -> None:
    save_file({"y": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    sources = plan_sources([], [str(tmp_path)])
    assert [(s.name, s.path.name, s.key) for s in sources] == [("y", "a.safetensors", "y")]


# ---------------------------------------------------------------------------- the parser


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"tensorslice": parser, **sub.choices}


@pytest.mark.unit
def test_every_option_has_help_and_its_default() -> None:
    for name, parser in _parsers().items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"{name} {action.dest}: no help text"
            default = action.default
            if default not in (None, False, [], argparse.SUPPRESS, ""):
                assert f"default: {default}" in " ".join(parser.format_help().split()), (
                    f"{name} {action.dest}: default {default!r} not in its help")


@pytest.mark.unit
def test_help_has_no_backticks() -> None:
    for name, parser in _parsers().items():
        assert "`" not in parser.format_help(), name


@pytest.mark.unit
def test_log_level_before_or_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["ls", "a:1"]).log_level == "INFO"
    assert parser.parse_args(["--log-level", "debug", "ls", "a:1"]).log_level == "DEBUG"
    assert parser.parse_args(["ls", "a:1", "--log-level", "warning"]).log_level == "WARNING"
    assert parser.parse_args(["serve", "--log-level", "ERROR"]).log_level == "ERROR"


@pytest.mark.e2e
def test_get_output_transfers_once(
    server: str, demo: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls: list[str] = []
    for method in ("slice", "slice_bytes", "slice_many"):
        original = getattr(Client, method)

        def counted(self: Client, *a: object, _m: str = method, _o: object = original,
                    **k: object) -> object:
            calls.append(_m)
            return _o(self, *a, **k)  # type: ignore[operator]

        monkeypatch.setattr(Client, method, counted)
    out = tmp_path / "out.safetensors"
    assert main(["get", server, "demo", "1:3", "-o", str(out)]) == 0
    assert calls == ["slice_bytes"]
    assert torch.equal(load_file(str(out))["values"], demo[1:3])
    assert "shape: [2, 12, 6, 5]" in capsys.readouterr().out
    calls.clear()
    assert main(["get", server, "demo", "1:3"]) == 0
    assert calls == ["slice"]


@pytest.mark.unit
def test_max_connection_age_sets_grpc_options() -> None:
    from tensorslice.server import ServerConfig
    from tensorslice.server._server import server_options

    args = build_parser().parse_args(["serve", "--max-connection-age", "300"])
    assert args.max_connection_age == 300.0
    options = dict(server_options(ServerConfig(max_connection_age=args.max_connection_age)))
    assert options["grpc.max_connection_age_ms"] == 300_000
    assert options["grpc.max_connection_age_grace_ms"] == 30_000
    assert "grpc.max_connection_age_ms" not in dict(server_options(ServerConfig()))


@pytest.mark.unit
@pytest.mark.parametrize("text", ["-1", "soon", "nan", "inf"])
def test_max_connection_age_refuses_bad_durations(text: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-connection-age", text])


@pytest.mark.e2e
def test_max_connection_age_closes_the_connection_and_clients_reconnect(
    store: TensorStore, demo: torch.Tensor,
) -> None:
    import threading

    import grpc

    from tensorslice.server import ServerConfig, create_server

    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(
        max_connection_age=0.5, max_connection_age_grace=0.5))
    srv.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as c:
            assert torch.equal(c.tensor("demo")[0:2], demo[0:2])
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        seen: list[grpc.ChannelConnectivity] = []
        left_ready = threading.Event()

        def watch(state: grpc.ChannelConnectivity) -> None:
            seen.append(state)
            if state != grpc.ChannelConnectivity.READY and (
                    grpc.ChannelConnectivity.READY in seen[:-1]):
                left_ready.set()

        channel.subscribe(watch, try_to_connect=True)
        try:
            # The server's GOAWAY, after half a second, takes the channel out of READY.
            assert left_ready.wait(20), f"the connection was never closed: states {seen}"
        finally:
            channel.unsubscribe(watch)
            channel.close()
        with Client(f"127.0.0.1:{port}", timeout=10) as c:  # and a new one works
            assert torch.equal(c.tensor("demo")[3:5], demo[3:5])
    finally:
        srv.stop(grace=None)
