"""Replicas: one client over several servers of the same rows (gRPC's round_robin), retries
that move to another replica, bulk tickets that name the replica holding the result, and
`serve --rows` (a shard of a file's rows)."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from tensorslice.client import AsyncClient, Client, _base
from tensorslice.client._base import (
    CallDirect,
    CallStream,
    CallUnary,
    Flow,
    ReceiveBulk,
    channel_options,
    make_selection,
)
from tensorslice.client._client import channel_target
from tensorslice.core.endpoint import (
    READ_METHODS,
    balanced,
    check_replica,
    host_of,
    literal_target,
    replicas_of,
)
from tensorslice.core.errors import SelectionOutOfRange, ServerUnavailable
from tensorslice.core.selection import selection_to_proto
from tensorslice.server import ServerConfig, TensorStore, create_server
from tensorslice.server._cli import build_parser, parse_rows
from tensorslice.server._server import advertised_host
from tensorslice.v1 import tensorslice_pb2 as pb

X = torch.arange(12, dtype=torch.float32).reshape(3, 4)
FILE = safetensors.torch.save({"values": X})


# ---------------------------------------------------------------------------- addresses


@pytest.mark.unit
@pytest.mark.parametrize(("address", "replicas", "spread"), [
    ("127.0.0.1:50051", ("127.0.0.1:50051",), False),
    ("ipv4:127.0.0.1:1,127.0.0.1:2", ("127.0.0.1:1", "127.0.0.1:2"), True),
    ("ipv6:[::1]:1,[::1]:2", ("[::1]:1", "[::1]:2"), True),
    ("ipv4:127.0.0.1:1", ("ipv4:127.0.0.1:1",), False),
    ("dns:///tensorslice-s0.default.svc:50051", ("dns:///tensorslice-s0.default.svc:50051",),
     True),
    (["h1:1", "h2:2"], ("h1:1", "h2:2"), True),
    (["h1:1"], ("h1:1",), False),
])
def test_replicas_and_balancing_of_every_target_form(
        address: Any, replicas: tuple[str, ...], spread: bool) -> None:
    assert replicas_of(address) == replicas
    assert balanced(address) is spread


@pytest.mark.unit
def test_host_of_a_list_target_is_its_first_host() -> None:
    assert host_of("ipv4:10.0.0.1:1,10.0.0.2:1") == "10.0.0.1"
    assert host_of("ipv6:[fe80::1]:1,[fe80::2]:1") == "fe80::1"


@pytest.mark.unit
def test_a_list_of_ip_literals_is_one_target_names_are_resolved() -> None:
    assert literal_target(["127.0.0.1:1", "10.0.0.2:2"]) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    assert literal_target(["[::1]:1", "[::2]:2"]) == "ipv6:[::1]:1,[::2]:2"
    assert literal_target(["127.0.0.1:1", "[::1]:2"]) is None  # two families
    assert literal_target(["localhost:1"]) is None
    assert channel_target(("127.0.0.1:7", "localhost:8")) in (
        "ipv4:127.0.0.1:7,127.0.0.1:8", )
    assert channel_target("dns:///x:1") == "dns:///x:1"


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["dns:///x:1", "unix:/tmp/s", "x", "x:port", ":1"])
def test_a_listed_address_must_be_host_and_port(bad: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{bad!r} cannot be one of a client's")):
        check_replica(bad)
    with pytest.raises(ValueError, match="cannot be one of a client's addresses"):
        Client(["127.0.0.1:1", bad])


@pytest.mark.unit
def test_an_empty_list_is_refused_and_one_address_is_that_address() -> None:
    with pytest.raises(ValueError, match=re.escape("a client needs one address or a list")):
        Client([])
    c = Client(["127.0.0.1:5"])
    assert c.address == "127.0.0.1:5" and not c.balanced and repr(c) == "Client('127.0.0.1:5')"
    assert repr(Client(["127.0.0.1:5", "127.0.0.1:6"])) == (
        "Client(['127.0.0.1:5', '127.0.0.1:6'])")


@pytest.mark.unit
def test_channel_balances_and_retries_only_reads() -> None:
    options = dict(channel_options(3, round_robin=True))
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    names = {n["method"] for n in config["methodConfig"][0]["name"]}
    assert names == set(READ_METHODS)
    assert {"Fetch", "FetchMany", "Slice", "DescribeTensor"} <= names
    assert not names & {"Put", "Append", "Drop"}  # a retried write could apply twice
    assert "loadBalancingConfig" not in json.loads(
        dict(channel_options(3))["grpc.service_config"])
    assert "grpc.service_config" not in dict(channel_options(0))
    assert json.loads(dict(channel_options(0, round_robin=True))["grpc.service_config"]) == {
        "loadBalancingConfig": [{"round_robin": {}}]}


@pytest.mark.unit
@pytest.mark.parametrize(("bind", "advertise", "named"), [
    ("127.0.0.1", None, "127.0.0.1"), ("0.0.0.0", None, ""), ("::", None, ""),
    ("0.0.0.0", "10.1.2.3", "10.1.2.3"), ("127.0.0.1", "node7", "node7"),
])
def test_advertised_host(bind: str, advertise: str | None, named: str) -> None:
    assert advertised_host(bind, advertise) == named


# ---------------------------------------------------------------------------- flows


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    c = _Clock()
    monkeypatch.setattr(_base, "_clock", c)
    return c


def _flow(client: Client) -> Flow[Any]:
    return client._flow(client._op_slice("x", (slice(None),)), 7.0)


def _ticket(host: str = "") -> bytes:
    t = pb.BulkTicket(port=4242, token=b"t" * 16, nbytes=len(FILE), host=host)
    return pb.SliceChunk(ticket=t).SerializeToString()


@pytest.mark.unit
def test_the_ticket_names_the_host_to_collect_from(clock: _Clock) -> None:
    client = Client(["127.0.0.1:1", "localhost:2"])
    assert client._bulk_host is None and client._bulk_ok  # several hosts: tickets say which
    flow = _flow(client)
    next(flow)
    step = flow.send(_ticket("10.9.8.7"))
    assert isinstance(step, ReceiveBulk) and (step.host, step.port) == ("10.9.8.7", 4242)


@pytest.mark.unit
def test_a_ticket_without_host_from_replicas_on_several_hosts_is_streamed(
        clock: _Clock) -> None:
    client = Client(["127.0.0.1:1", "localhost:2"])
    flow = _flow(client)
    next(flow)
    step = flow.send(_ticket())
    assert isinstance(step, CallStream)  # no guess at which replica holds the result
    step.sink.feed(memoryview(FILE))
    with pytest.raises(StopIteration) as done:
        flow.send(None)
    assert torch.equal(done.value.value["values"], X)
    assert client._bulk_ok is False
    one = Client("ipv4:127.0.0.1:1,127.0.0.1:2")  # one host: its tickets need not say
    flow = _flow(one)
    next(flow)
    step = flow.send(_ticket())
    assert isinstance(step, ReceiveBulk) and step.host == "127.0.0.1"


@pytest.mark.unit
def test_a_replica_lost_mid_transfer_is_asked_again(clock: _Clock) -> None:
    client = Client(["127.0.0.1:1", "127.0.0.1:2"], retries=2)
    flow = _flow(client)
    next(flow)
    for _ in range(2):  # the transfer fails: Fetch again (round_robin: another replica)
        step = flow.send(_ticket("127.0.0.1"))
        assert isinstance(step, ReceiveBulk)
        step = flow.throw(ServerUnavailable("bulk transfer failed: reset"))
        assert isinstance(step, CallUnary) and step.path.endswith("/Fetch")
    step = flow.send(_ticket("127.0.0.1"))
    with pytest.raises(ServerUnavailable):  # retries spent
        flow.throw(ServerUnavailable("bulk transfer failed: reset"))
    single = Client("127.0.0.1:1")  # one server: nothing else to ask
    flow = _flow(single)
    next(flow)
    flow.send(_ticket("127.0.0.1"))
    with pytest.raises(ServerUnavailable):
        flow.throw(ServerUnavailable("bulk transfer failed: reset"))


@pytest.mark.unit
def test_a_forked_client_moves_to_the_next_data_plane(
        clock: _Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorslice.client._base as base

    monkeypatch.setattr(base, "forked_from_grpc", lambda: True)
    client = Client(["127.0.0.1:1", "127.0.0.1:2"])
    client._data_planes = [("127.0.0.1", 11, socket.AF_INET, ("127.0.0.1", 11)),
                           ("127.0.0.1", 12, socket.AF_INET, ("127.0.0.1", 12))]
    flow = client._flow(client._op_describe("x"), 7.0)
    step = next(flow)
    assert isinstance(step, CallDirect) and step.sockaddr == ("127.0.0.1", 11)
    step = flow.throw(ServerUnavailable("data plane 127.0.0.1:11 unreachable"))
    assert isinstance(step, CallDirect) and step.sockaddr == ("127.0.0.1", 12)
    info = pb.TensorInfo(name="x", shape=[3], dtype="float32")
    with pytest.raises(StopIteration) as done:
        flow.send(info.SerializeToString())
    assert done.value.value.name == "x"
    flow = client._flow(client._op_describe("x"), 7.0)
    step = next(flow)  # the next call starts on the next plane: calls spread
    assert step.sockaddr == ("127.0.0.1", 12)
    flow.throw(ServerUnavailable("gone"))
    with pytest.raises(ServerUnavailable, match="both gone"):
        flow.throw(ServerUnavailable("both gone"))


# ---------------------------------------------------------------------------- servers


def _replica(value: float, **config: Any) -> tuple[Any, str]:
    """A server whose tensor 'x' (64, 4096) float32 holds `value` everywhere: a result
    says which replica produced it."""
    store = TensorStore(device="cpu")
    store.add("x", torch.full((64, 4096), value))
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(**config))
    srv.start()
    return srv, f"127.0.0.1:{port}"


@pytest.fixture()
def pair() -> Iterator[list[tuple[Any, str]]]:
    servers = [_replica(0.0), _replica(1.0)]
    yield servers
    for srv, _ in servers:
        srv.stop(grace=None)


def _who(c: Client, n: int) -> list[int]:
    x = c.tensor("x")  # (one call: calls are spread one by one, whatever their method)
    return [int(x[i % 64, 0].item()) for i in range(n)]


@pytest.mark.e2e
@pytest.mark.parametrize("form", ["list", "ipv4"])
def test_calls_spread_over_replicas(pair: list[tuple[Any, str]], form: str) -> None:
    addrs = [a for _, a in pair]
    target: Any = addrs if form == "list" else "ipv4:" + ",".join(addrs)
    with Client(target, timeout=30) as c:
        c.describe("x")
        who = _who(c, 40)
    assert 10 <= who.count(0) <= 30 and who.count(0) + who.count(1) == 40, who


@pytest.mark.e2e
def test_pick_first_sends_every_call_to_one_replica(pair: list[tuple[Any, str]]) -> None:
    """gRPC's default policy, for the record: without round_robin, one server gets all."""
    target = "ipv4:" + ",".join(a for _, a in pair)
    request = selection_to_proto("x", make_selection(0))
    seen = set()
    with grpc.insecure_channel(target, options=channel_options(3)) as ch:
        fetch = ch.unary_unary("/tensorslice.v1.TensorSlice/Fetch",
                               request_serializer=pb.SliceRequest.SerializeToString)
        for _ in range(20):
            frame = fetch(request, timeout=30)
            data = pb.SliceChunk.FromString(frame).data
            seen.add(int(safetensors.torch.load(data)["values"][0].item()))
    assert len(seen) == 1


@pytest.mark.e2e
def test_retries_move_to_the_live_replica(pair: list[tuple[Any, str]]) -> None:
    with Client([a for _, a in pair], timeout=30) as c:
        assert set(_who(c, 8)) == {0, 1}  # connected to both
        pair[0][0].stop(grace=None)
        who = _who(c, 30)  # every call answered, by the one left
    assert who == [1] * 30


@pytest.mark.e2e
def test_async_client_spreads_and_survives_a_replica(pair: list[tuple[Any, str]]) -> None:
    import asyncio

    async def run() -> list[int]:
        async with AsyncClient([a for _, a in pair], timeout=30) as c:
            x = await c.tensor("x")
            first = [int((await x[i, 0]).item()) for i in range(8)]
            pair[1][0].stop(grace=None)
            return first + [int((await x[i, 0]).item()) for i in range(10)]

    who = asyncio.run(run())
    assert set(who[:8]) == {0, 1} and who[8:] == [0] * 10


@pytest.mark.e2e
def test_bulk_tickets_name_the_replica_that_holds_the_result(
        pair: list[tuple[Any, str]]) -> None:
    (srv0, a0), (srv1, a1) = pair
    port1 = a1.rsplit(":", 1)[1]
    # Two host spellings: the client cannot tell which host a ticket's port is on, so
    # only the ticket's own host (127.0.0.1, the bind host) makes bulk transfers work.
    with Client([a0, f"localhost:{port1}"], timeout=30, same_host=False) as c:
        assert c._bulk_host is None
        x = c.tensor("x")
        big = [x[0:32] for _ in range(6)]  # 512 KiB each: inline
        large = [x.fetch() for _ in range(6)]  # 1 MiB and a header: a bulk ticket
        assert c.transports["bulk"] == 6 and c.transports["stream"] == 0
    assert {float(t[0, 0]) for t in big} == {0.0, 1.0}
    for t in large:
        assert t.shape == (64, 4096) and bool((t == t[0, 0]).all())
    assert {float(t[0, 0]) for t in large} == {0.0, 1.0}
    assert srv0.bulk.sent >= 1 and srv1.bulk.sent >= 1
    with grpc.insecure_channel(a0) as ch:
        fetch = ch.unary_unary("/tensorslice.v1.TensorSlice/Fetch",
                               request_serializer=pb.SliceRequest.SerializeToString)
        frame = fetch(pb.SliceRequest(tensor="x", bulk=True), timeout=30)
    ticket = pb.SliceChunk.FromString(frame).ticket
    assert ticket.host == "127.0.0.1" and ticket.port == srv0.bulk.port


@pytest.mark.e2e
def test_advertise_host_is_announced_and_learned_per_replica() -> None:
    servers = [_replica(0.0, advertise_host="localhost"), _replica(1.0)]
    try:
        with Client([a for _, a in servers], timeout=30) as c:
            c.list_tensors()  # a list client learns every replica's data plane
            planes = {(h, p) for h, p, _, _ in c._data_planes}
        assert planes == {("localhost", servers[0][0].bulk.port),
                          ("127.0.0.1", servers[1][0].bulk.port)}
    finally:
        for srv, _ in servers:
            srv.stop(grace=None)


# ---------------------------------------------------------------------------- --rows


@pytest.fixture()
def rows_file(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    t = torch.randn(50, 3, 4, 5)
    path = tmp_path / "t.safetensors"
    save_file({"acts": t}, str(path))
    return path, t


@pytest.mark.unit
@pytest.mark.parametrize("slab", [1 << 20, 16, 300])  # whole, one run, rows of slabs
def test_rows_load_only_those_rows(rows_file: tuple[Path, torch.Tensor], slab: int,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorslice.server._store as store_mod

    monkeypatch.setattr(store_mod, "_LOAD_SLAB_BYTES", slab)
    path, t = rows_file
    store = TensorStore(device="cpu")
    entry = store.load_file(path, rows=(7, 31))
    assert torch.equal(entry.tensor, t[7:31])
    assert entry.source.endswith("t.safetensors:acts rows 7:31")
    empty = TensorStore(device="cpu").load_file(path, rows=(50, 50))
    assert empty.tensor.shape == (0, 3, 4, 5)


@pytest.mark.unit
def test_rows_beyond_the_tensor_are_refused_naming_it(
        rows_file: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    path, _ = rows_file
    store = TensorStore(device="cpu")
    with pytest.raises(SelectionOutOfRange, match=re.escape(
            f"rows 40:60 of tensor 'a' ({path}) are out of range for dimension 0 of "
            f"size 50")):
        store.load_file(path, name="a", rows=(40, 60))
    assert len(store) == 0 and store.device_memory_used == 0
    scalar = tmp_path / "s.safetensors"
    save_file({"s": torch.tensor(1.0)}, str(scalar))
    with pytest.raises(Exception, match=re.escape("a 0-d tensor has no dimension 0")):
        store.load_file(scalar, rows=(0, 1))


@pytest.mark.unit
@pytest.mark.parametrize(("text", "message"), [
    ("5", "'5' is not a row range: START:STOP"), ("a:b", "'a:b' is not a row range"),
    ("-1:4", "'-1:4' is not a row range"), ("9:4", "START 9 is beyond STOP 4"),
])
def test_rows_option_refuses(text: str, message: str) -> None:
    import argparse

    assert parse_rows("0:10") == (0, 10)
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        parse_rows(text)


@pytest.mark.unit
def test_serve_parses_rows_and_advertise_host() -> None:
    args = build_parser().parse_args(["serve", "--rows", "10:20", "--advertise-host", "h"])
    assert args.rows == (10, 20) and args.advertise_host == "h"


@pytest.mark.unit
@pytest.mark.gpu
@pytest.mark.parametrize("slab", [1 << 20, 300])
def test_rows_load_straight_onto_the_device(rows_file: tuple[Path, torch.Tensor], slab: int,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import tensorslice.server._store as store_mod

    monkeypatch.setattr(store_mod, "_LOAD_SLAB_BYTES", slab)
    path, t = rows_file
    store = TensorStore(device="cuda")
    entry = store.load_file(path, rows=(7, 31))
    assert entry.tensor.device.type == "cuda"
    assert torch.equal(entry.tensor.cpu(), t[7:31])
    assert store.device_memory_used == t[7:31].numel() * 4
