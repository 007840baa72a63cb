"""Authentication and TLS: the bearer token, TLS and mutual TLS on the gRPC port and the
bulk data plane, the client's settings from arguments and the environment, and the clear
answers to what goes wrong (wrong token, mismatched TLS, missing files, ports in use)."""

from __future__ import annotations

import pickle
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from certs import Certs, make_certs

from tensorslice.client import (
    AsyncClient,
    Client,
    ServerUnavailable,
    TlsConfig,
    Unauthenticated,
)
from tensorslice.core.credentials import resolve_tls, resolve_token
from tensorslice.server import (
    AddressInUse,
    ServerConfig,
    StartupError,
    TensorStore,
    TlsFiles,
    create_server,
)
from tensorslice.server._auth import read_token
from tensorslice.server._bulk import TOKEN_BYTES
from tensorslice.server._cli import main
from tensorslice.v1 import tensorslice_pb2 as pb

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-token_for.tests"
X = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(3))  # 2 MiB: bulk
LIST = "/tensorslice.v1.TensorSlice/ListTensors"
FETCH = "/tensorslice.v1.TensorSlice/Fetch"
SLICE = "/tensorslice.v1.TensorSlice/Slice"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _start(**config: Any) -> tuple[Any, str]:
    store = TensorStore(device="cpu")
    store.add("x", X)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(**config))
    srv.start()
    return srv, f"127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TENSORSLICE_TOKEN", "TENSORSLICE_TOKEN_FILE", "TENSORSLICE_TLS",
                 "TENSORSLICE_TLS_CA", "TENSORSLICE_TLS_CERT", "TENSORSLICE_TLS_KEY",
                 "TENSORSLICE_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def token_server() -> Iterator[tuple[Any, str]]:
    srv, address = _start(token=TOKEN, unary_max_bytes=1024)
    yield srv, address
    srv.stop(grace=None)


@pytest.fixture(scope="module")
def tls_server(certs: Certs) -> Iterator[tuple[Any, str]]:
    srv, address = _start(token=TOKEN, unary_max_bytes=1024,
                          tls=TlsFiles(str(certs.server_cert), str(certs.server_key)))
    yield srv, address
    srv.stop(grace=None)


# ---------------------------------------------------------------------------- token


def test_calls_without_the_token_are_refused(token_server: tuple[Any, str]) -> None:
    _, address = token_server
    with Client(address, timeout=10) as c, pytest.raises(Unauthenticated, match="no credentials"):
        c.list_tensors()
    with Client(address, timeout=10, token="wrong") as c, pytest.raises(
        Unauthenticated, match="invalid token"
    ):
        c.slice("x", (slice(0, 1),))
    with Client(address, timeout=10, token=TOKEN + "x") as c, pytest.raises(Unauthenticated):
        c.list_tensors()


def test_streaming_calls_are_refused_too(token_server: tuple[Any, str]) -> None:
    _, address = token_server
    request = pb.SliceRequest(tensor="x").SerializeToString()
    with grpc.insecure_channel(address) as ch:
        stream = ch.unary_stream(SLICE)(request, timeout=10)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_the_right_token_works_and_health_needs_none(token_server: tuple[Any, str]) -> None:
    _, address = token_server
    with Client(address, timeout=10, token=TOKEN) as c:
        assert [i.name for i in c.list_tensors()] == ["x"]
        assert torch.equal(c.tensor("x")[0:40], X[0:40])  # 1.25 MiB: over the bulk plane
        assert torch.equal(c.tensor("x")[[3, 1], :, 2], X[[3, 1], :, 2])
    with Client(address, timeout=10) as c:
        assert c.health() == "SERVING"
        assert c.health("tensorslice.v1.TensorSlice") == "SERVING"


def test_no_ticket_without_the_token(token_server: tuple[Any, str]) -> None:
    srv, address = token_server
    request = pb.SliceRequest(tensor="x", bulk=True).SerializeToString()
    with grpc.insecure_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary(FETCH)(request, timeout=10)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert srv.bulk.pending == 0


def test_async_client_sends_the_token(token_server: tuple[Any, str]) -> None:
    import asyncio

    _, address = token_server

    async def run() -> torch.Tensor:
        async with AsyncClient(address, timeout=10, token=TOKEN) as c:
            return await (await c.tensor("x"))[0:40]

    assert torch.equal(asyncio.run(run()), X[0:40])


def test_token_from_the_environment_and_kept_by_pickle(
    token_server: tuple[Any, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _, address = token_server
    monkeypatch.setenv("TENSORSLICE_TOKEN", TOKEN)
    c = Client(address, timeout=10)
    assert c.list_tensors()[0].name == "x"
    monkeypatch.delenv("TENSORSLICE_TOKEN")
    clone = pickle.loads(pickle.dumps(c))  # what a spawned DataLoader worker receives
    c.close()
    with clone:
        assert torch.equal(clone.tensor("x")[0:40], X[0:40])
    file = tmp_path / "token"
    file.write_text(TOKEN + "\n")
    assert resolve_token(None, {"TENSORSLICE_TOKEN_FILE": str(file)}) == TOKEN
    assert resolve_token(None, {}) is None
    with pytest.raises(ValueError, match="nothing-here"):
        resolve_token(None, {"TENSORSLICE_TOKEN_FILE": str(tmp_path / "nothing-here")})


def test_server_token_sources(tmp_path: Path) -> None:
    file = tmp_path / "token"
    file.write_text(f"  {TOKEN}\n")
    assert read_token(str(file), {}) == TOKEN
    assert read_token(None, {"TENSORSLICE_TOKEN": TOKEN}) == TOKEN
    assert read_token(None, {}) is None
    file.write_text("\n")
    with pytest.raises(StartupError, match=f"token file {file} is empty"):
        read_token(str(file), {})
    with pytest.raises(StartupError, match=str(tmp_path / "missing")):
        read_token(str(tmp_path / "missing"), {})
    assert "s3cret" not in repr(ServerConfig(token=TOKEN))


# ---------------------------------------------------------------------------- TLS


def test_tls_end_to_end_bulk_included(tls_server: tuple[Any, str], certs: Certs) -> None:
    srv, address = tls_server
    sent = srv.bulk.sent
    with Client(address, timeout=10, token=TOKEN, tls=str(certs.ca)) as c:
        assert torch.equal(c.tensor("x")[0:40], X[0:40])  # bulk, over TLS
        assert torch.equal(c.tensor("x")[:, [1, 5]], X[:, [1, 5]])
        assert c.health() == "SERVING"
    assert srv.bulk.sent == sent + 2


def test_tls_settings_from_the_environment(
    tls_server: tuple[Any, str], certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, address = tls_server
    monkeypatch.setenv("TENSORSLICE_TOKEN", TOKEN)
    monkeypatch.setenv("TENSORSLICE_TLS_CA", str(certs.ca))
    with Client(address, timeout=10) as c:
        assert c.tls == TlsConfig(ca=str(certs.ca))
        assert torch.equal(c.tensor("x")[0:40], X[0:40])
    monkeypatch.setenv("TENSORSLICE_TLS_SERVER_NAME", "localhost")
    with Client(address, timeout=10) as c:
        assert torch.equal(c.tensor("x")[0:40], X[0:40])
    assert resolve_tls(None, {"TENSORSLICE_TLS": "1"}) == TlsConfig()
    assert resolve_tls(None, {}) is None
    assert resolve_tls(False, {"TENSORSLICE_TLS_CA": str(certs.ca)}) is None
    with pytest.raises(ValueError, match=r"nope\.pem"):
        Client(address, tls="/nowhere/nope.pem")


def test_plaintext_client_against_tls_server(tls_server: tuple[Any, str]) -> None:
    _, address = tls_server
    with Client(address, timeout=5, retries=0, token=TOKEN) as c, pytest.raises(
        ServerUnavailable, match="this client speaks plaintext: if the server uses TLS"
    ):
        c.list_tensors()


def test_tls_client_against_plaintext_server(
    token_server: tuple[Any, str], certs: Certs
) -> None:
    _, address = token_server
    with Client(address, timeout=5, retries=0, token=TOKEN, tls=str(certs.ca)) as c, \
            pytest.raises(ServerUnavailable, match="the server may be plaintext"):
        c.list_tensors()


def test_a_certificate_from_another_ca_is_refused(
    tls_server: tuple[Any, str], certs: Certs
) -> None:
    _, address = tls_server
    with Client(address, timeout=5, retries=0, token=TOKEN, tls=str(certs.other_ca)) as c, \
            pytest.raises(ServerUnavailable):
        c.list_tensors()


def _ticket(address: str, metadata: Any, credentials: grpc.ChannelCredentials) -> pb.BulkTicket:
    request = pb.SliceRequest(tensor="x", bulk=True).SerializeToString()
    with grpc.secure_channel(address, credentials) as ch:
        frame = ch.unary_unary(FETCH)(request, timeout=10, metadata=metadata)
    chunk = pb.SliceChunk.FromString(frame)
    assert chunk.HasField("ticket")
    return chunk.ticket


def _redeem(port: int, token: bytes, context: ssl.SSLContext | None) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        s = raw if context is None else context.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(token)
        out = bytearray()
        while True:
            try:
                part = s.recv(1 << 20)
            except (ConnectionResetError, ssl.SSLError):
                return bytes(out)
            if not part:
                return bytes(out)
            out += part


def test_tls_bulk_plane_is_no_hole(tls_server: tuple[Any, str], certs: Certs) -> None:
    _, address = tls_server
    creds = grpc.ssl_channel_credentials(certs.ca.read_bytes())
    ticket = _ticket(address, (("authorization", f"Bearer {TOKEN}"),), creds)
    assert len(ticket.token) == TOKEN_BYTES
    # The token in clear gets nothing: the listener speaks TLS only (at most a TLS alert
    # record, content type 21, comes back before it closes: never a byte of the file).
    clear = _redeem(ticket.port, ticket.token, None)
    assert clear == b"" or (clear[:1] == b"\x15" and len(clear) <= 7), clear
    context = ssl.create_default_context(cafile=str(certs.ca))
    data = _redeem(ticket.port, ticket.token, context)
    assert len(data) == ticket.nbytes
    assert _redeem(ticket.port, ticket.token, context) == b""  # one-time


def test_expired_ticket_is_refused(certs: Certs) -> None:
    srv, address = _start(token=TOKEN, unary_max_bytes=1024, ticket_timeout=0.2,
                          tls=TlsFiles(str(certs.server_cert), str(certs.server_key)))
    try:
        creds = grpc.ssl_channel_credentials(certs.ca.read_bytes())
        ticket = _ticket(address, (("authorization", f"Bearer {TOKEN}"),), creds)
        deadline = time.monotonic() + 10
        while srv.bulk.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert srv.bulk.pending == 0 and srv.bulk.expired == 1
        context = ssl.create_default_context(cafile=str(certs.ca))
        assert _redeem(ticket.port, ticket.token, context) == b""
    finally:
        srv.stop(grace=None)


def test_mutual_tls(certs: Certs) -> None:
    srv, address = _start(unary_max_bytes=1024, tls=TlsFiles(
        str(certs.server_cert), str(certs.server_key), str(certs.ca)))
    try:
        with Client(address, timeout=5, retries=0, tls=str(certs.ca)) as c, pytest.raises(
            ServerUnavailable
        ):
            c.list_tensors()
        tls = TlsConfig(ca=str(certs.ca), cert=str(certs.client_cert),
                        key=str(certs.client_key))
        with Client(address, timeout=10, tls=tls) as c:
            assert torch.equal(c.tensor("x")[0:40], X[0:40])  # the bulk plane checks too
        assert srv.bulk.sent == 1
        with pytest.raises(ValueError, match="needs its key"):
            TlsConfig(ca=str(certs.ca), cert=str(certs.client_cert))
    finally:
        srv.stop(grace=None)


def test_unusable_tls_files_are_startup_errors(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=str(tmp_path / "missing.pem")):
        TlsFiles(str(tmp_path / "missing.pem"), str(certs.server_key)).load()
    with pytest.raises(StartupError, match="do not form a usable pair"):
        TlsFiles(str(certs.server_cert), str(certs.client_key)).load()


# ---------------------------------------------------------------------------- serve


def test_serve_exits_2_naming_a_missing_file(
    certs: Certs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-cert.pem"
    argv = ["serve", "--port", "0", "--tls-cert", str(missing), "--tls-key",
            str(certs.server_key)]
    assert main(argv) == 2
    assert str(missing) in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--token-file", str(tmp_path / "tok")]) == 2
    assert str(tmp_path / "tok") in capsys.readouterr().err
    assert main(["serve", "--port", "0", "--tls-cert", str(certs.server_cert)]) == 2
    assert "--tls-key" in capsys.readouterr().err


def test_the_token_is_no_command_line_argument() -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--token", TOKEN])
    assert info.value.code == 2


def test_port_in_use_is_address_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = TensorStore(device="cpu")
        store.add("x", X[:1])
        with pytest.raises(AddressInUse, match=f"127.0.0.1:{port} \\(metrics\\)"):
            srv, _ = create_server(store, "127.0.0.1:0", ServerConfig(metrics_port=port))
            try:
                srv.start()
            finally:
                srv.stop(grace=None)
        assert main(["serve", "--port", str(port), "--no-progress"]) == 2


def test_health_command(tls_server: tuple[Any, str], certs: Certs,
                        monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture[str]) -> None:
    srv, address = tls_server
    assert main(["health", address, "--timeout", "5"]) == 1  # plaintext against TLS
    assert f"{address}: UNAVAILABLE" in capsys.readouterr().err
    monkeypatch.setenv("TENSORSLICE_TLS_CA", str(certs.ca))
    assert main(["health", address]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    srv.health.set("tensorslice.v1.TensorSlice", 2)  # NOT_SERVING
    try:
        assert main(["health", address, "--service", "tensorslice.v1.TensorSlice"]) == 1
        assert capsys.readouterr().out.strip() == "NOT_SERVING"
    finally:
        srv.health.set("tensorslice.v1.TensorSlice", 1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert main(["health", f"127.0.0.1:{free}", "--timeout", "2"]) == 1


def test_health_command_imports_no_torch() -> None:
    # A container's HEALTHCHECK runs it every few seconds; it must start quickly.
    code = ("import sys; from tensorslice.server._cli import main; "
            "import tensorslice.server._probe; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.strip() == "False"


def test_direct_calls_on_the_tls_data_plane(tls_server: tuple[Any, str], certs: Certs) -> None:
    # What a client forked from a gRPC user sends: the same token, over the same TLS.
    from tensorslice.client._base import CallDirect
    from tensorslice.client._client import call_direct
    from tensorslice.core.codec import DIRECT_MAGIC

    srv, _ = tls_server
    port = srv.bulk.port
    step = CallDirect(socket.AF_INET, ("127.0.0.1", port), "DescribeTensor",
                      pb.DescribeTensorRequest(name="x"), None, 10)
    context = ssl.create_default_context(cafile=str(certs.ca))
    auth = (("authorization", f"Bearer {TOKEN}"),)
    assert pb.TensorInfo.FromString(call_direct(step, auth, context, "127.0.0.1")).name == "x"
    with pytest.raises(Unauthenticated, match="no credentials"):
        call_direct(step, None, context, "127.0.0.1")
    # The same call in clear gets nothing: the listener speaks TLS only.
    assert _redeem(port, DIRECT_MAGIC, None) == b""
    with pytest.raises(ServerUnavailable):
        call_direct(step, auth, None, None)
