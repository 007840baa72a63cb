"""What an operator sees: the Prometheus endpoint (scraped and parsed as Prometheus does)
and gRPC server reflection (what ``grpcurl list`` / ``describe`` use)."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import safetensors.torch
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from tensorslice.client import Client, Unauthenticated
from tensorslice.server import ServerConfig, TensorStore, create_server

pytestmark = pytest.mark.e2e

TOKEN = "metrics-test-token"
X = torch.randn(64, 32, 16, 16, generator=torch.Generator().manual_seed(5))  # 2 MiB


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[Any, str]]:
    store = TensorStore(device="cpu")
    store.add("x", X)
    store.add("y", torch.arange(10))
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(
        token=TOKEN, metrics_port=0, unary_max_bytes=1 << 20))
    srv.start()
    yield srv, f"127.0.0.1:{port}"
    srv.stop(grace=None).wait(10)


def _scrape(srv: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{srv.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _calls(m: dict[Any, float], method: str, code: str) -> float:
    key = ("tensorslice_grpc_server_handled_total",
           (("grpc_code", code), ("grpc_method", method),
            ("grpc_service", "tensorslice.v1.TensorSlice")))
    return m.get(key, 0.0)


def test_metrics_count_calls_bytes_and_state(served: tuple[Any, str]) -> None:
    srv, address = served
    before = _scrape(srv)
    # over gRPC and TCP (a same-host session's calls: tests/test_same_host_calls.py)
    with Client(address, timeout=10, token=TOKEN, same_host=False) as c:
        x = c.tensor("x")
        x[0:1]  # 32 KiB: inline
        x[0:1]  # the same request: an answer-cache hit
        x[0:40]  # 1.25 MiB: bulk
        c.slice_bytes("y", ())
    with Client(address, timeout=10) as c, pytest.raises(Unauthenticated):
        c.list_tensors()
    stream = grpc.insecure_channel(address).unary_stream("/tensorslice.v1.TensorSlice/Slice")
    from tensorslice.v1 import tensorslice_pb2 as pb

    frames = list(stream(pb.SliceRequest(tensor="y").SerializeToString(), timeout=10,
                         metadata=(("authorization", f"Bearer {TOKEN}"),)))
    after = _scrape(srv)

    assert _calls(after, "Fetch", "OK") - _calls(before, "Fetch", "OK") == 4
    assert _calls(after, "ListTensors", "UNAUTHENTICATED") == 1
    assert _calls(after, "Slice", "OK") == 1
    assert after[("tensorslice_grpc_server_handling_seconds_count",
                  (("grpc_method", "Fetch"), ("grpc_service", "tensorslice.v1.TensorSlice")))] \
        >= 4
    sent = {t: after[("tensorslice_sent_bytes_total", (("transport", t),))]
            for t in ("inline", "bulk", "stream")}
    assert sent["inline"] >= 2 * 32 * 16 * 16 * 4
    assert sent["bulk"] >= 40 * 32 * 16 * 16 * 4
    assert sent["stream"] == sum(len(f) for f in frames)
    assert after[("tensorslice_tensors", (("device", "cpu"),))] == 2
    assert after[("tensorslice_tensor_bytes", (("device", "cpu"),))] == X.nbytes + 80
    assert after[("tensorslice_device_memory_used_bytes", (("device", "cpu"),))] == X.nbytes + 80
    assert after[("tensorslice_answer_cache_hits_total", ())] >= 1
    assert after[("tensorslice_plan_cache_misses_total", ())] >= 3
    assert after[("tensorslice_bulk_tickets_pending", ())] == 0
    assert after[("tensorslice_bulk_tickets_expired_total", ())] == 0
    assert after[("tensorslice_results_in_flight", ())] == 0
    assert after[("tensorslice_calls_in_progress", ())] == 0
    assert ("tensorslice_materialized_bytes_limit", ()) in after


def test_expired_tickets_are_counted() -> None:
    store = TensorStore(device="cpu")
    store.add("x", X)
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig(
        metrics_port=0, unary_max_bytes=1024, ticket_timeout=0.1))
    srv.start()
    try:
        from tensorslice.v1 import tensorslice_pb2 as pb

        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            ch.unary_unary("/tensorslice.v1.TensorSlice/Fetch")(
                pb.SliceRequest(tensor="x", bulk=True).SerializeToString(), timeout=10)
        assert _scrape(srv)[("tensorslice_bulk_tickets_pending", ())] == 1
        deadline = time.monotonic() + 10
        while srv.bulk.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        m = _scrape(srv)
        assert m[("tensorslice_bulk_tickets_pending", ())] == 0
        assert m[("tensorslice_bulk_tickets_expired_total", ())] == 1
    finally:
        srv.stop(grace=None)


def test_reflection_lists_and_describes_the_service() -> None:
    store = TensorStore(device="cpu")
    store.add("y", torch.arange(10))
    srv, port = create_server(store, "127.0.0.1:0", ServerConfig())
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = db.get_services()
            assert "tensorslice.v1.TensorSlice" in services
            assert "grpc.health.v1.Health" in services
            from google.protobuf.descriptor_pool import DescriptorPool

            pool = DescriptorPool(db)
            service = pool.FindServiceByName("tensorslice.v1.TensorSlice")
            assert {"Slice", "Fetch", "ListTensors"} <= {m.name for m in service.methods}
            request = pool.FindMessageTypeByName("tensorslice.v1.SliceRequest")
            assert "tensor" in request.fields_by_name
    finally:
        srv.stop(grace=None)


def test_reflection_needs_the_token_where_calls_do(served: tuple[Any, str]) -> None:
    _, address = served
    with grpc.insecure_channel(address) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        with pytest.raises(grpc.RpcError) as info:
            db.get_services()
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_no_metrics_endpoint_by_default() -> None:
    store = TensorStore(device="cpu")
    store.add("y", torch.arange(10))
    srv, _ = create_server(store, "127.0.0.1:0", ServerConfig())
    srv.start()
    try:
        assert srv.metrics_port is None and srv.service.metrics is None
    finally:
        srv.stop(grace=None)


def test_direct_calls_are_counted_as_grpc_calls(served: tuple[Any, str]) -> None:
    """Calls over the data plane (what clients forked from a gRPC user make) are counted and
    timed under the same names as the same calls over gRPC."""
    import socket

    from grpc_health.v1 import health_pb2

    from tensorslice.client import SelectionOutOfRange
    from tensorslice.client._base import CallDirect
    from tensorslice.client._client import call_direct
    from tensorslice.v1 import tensorslice_pb2 as pb

    srv, _ = served
    where = (socket.AF_INET, ("127.0.0.1", srv.bulk.port))
    auth = (("authorization", f"Bearer {TOKEN}"),)

    def direct(method: str, request: Any, metadata: Any = auth) -> bytes:
        return call_direct(CallDirect(*where, method, request, None, 10), metadata)

    before = _scrape(srv)
    for _ in range(3):
        data = direct("Fetch", pb.SliceRequest(tensor="y"))
        assert torch.equal(safetensors.torch.load(data)["values"], torch.arange(10))
    direct("DescribeTensor", pb.DescribeTensorRequest(name="x"))
    with pytest.raises(Unauthenticated):
        direct("Fetch", pb.SliceRequest(tensor="y"), None)
    out_of_range = pb.SliceRequest(tensor="y", selectors=[pb.Selector(index=pb.Index(index=99))])
    with pytest.raises(SelectionOutOfRange):
        direct("Fetch", out_of_range)
    reply = health_pb2.HealthCheckResponse.FromString(
        direct("grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest(), None))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    after = _scrape(srv)

    def grew(method: str, code: str) -> float:
        return _calls(after, method, code) - _calls(before, method, code)

    assert grew("Fetch", "OK") == 3
    assert grew("DescribeTensor", "OK") == 1
    assert grew("Fetch", "UNAUTHENTICATED") == 1
    assert grew("Fetch", "OUT_OF_RANGE") == 1
    timed = ("tensorslice_grpc_server_handling_seconds_count",
             (("grpc_method", "Fetch"), ("grpc_service", "tensorslice.v1.TensorSlice")))
    assert after[timed] - before.get(timed, 0.0) == 5
    health = ("tensorslice_grpc_server_handled_total",
              (("grpc_code", "OK"), ("grpc_method", "Check"),
               ("grpc_service", "grpc.health.v1.Health")))
    assert after[health] - before.get(health, 0.0) == 1
