"""Prometheus metrics: what an operator watches, served over HTTP on `--metrics-port`.

Calls are counted and timed by a server interceptor (`MetricsInterceptor`), with the names
and labels of the usual gRPC server metrics (``grpc_service``, ``grpc_method``,
``grpc_code``). Everything else is read from the server's own counters when scraped
(`ServerCollector`), so serving a request costs a few integer additions and no lock
beyond those the server takes anyway.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from tensorslice.server._service import TensorSliceService

__all__ = ["Metrics", "MetricsInterceptor", "ServerCollector", "serve_metrics"]

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                    2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The metrics of one server, in a registry of its own (several servers in one
    process do not mix)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.handled = Counter(
            "tensorslice_grpc_server_handled", "Calls completed, by method and status code.",
            ["grpc_service", "grpc_method", "grpc_code"], registry=self.registry,
        )
        self.handling_seconds = Histogram(
            "tensorslice_grpc_server_handling_seconds",
            "Time from a call's arrival to its last response message, by method.",
            ["grpc_service", "grpc_method"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self._lock = threading.Lock()
        self.inline_bytes = 0
        self.stream_bytes = 0

    def sent(self, transport: str, nbytes: int) -> None:
        """Count result bytes sent inline (one `Fetch` response) or over a gRPC stream."""
        with self._lock:
            if transport == "inline":
                self.inline_bytes += nbytes
            else:
                self.stream_bytes += nbytes

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        _, service, name = method.split("/", 2) if method.count("/") == 2 else ("", "", method)
        self.handled.labels(service, name, code.name).inc()
        self.handling_seconds.labels(service, name).observe(seconds)


class ServerCollector(Collector):
    """The server's state when scraped: tensors, memory, calls and results in flight, bulk
    tickets, bytes by transport, plan cache."""

    def __init__(self, service: TensorSliceService, metrics: Metrics) -> None:
        self.service = service
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        service, store, bulk = self.service, self.service.store, self.service.bulk
        calls = service.calls

        tensors = GaugeMetricFamily("tensorslice_tensors", "Tensors held, by device.",
                                    labels=["device"])
        held = GaugeMetricFamily("tensorslice_tensor_bytes",
                                 "Bytes of the tensors held, by device.", labels=["device"])
        by_device: dict[str, list[int]] = {}
        for e in store.entries():
            count_bytes = by_device.setdefault(e.meta.device, [0, 0])
            count_bytes[0] += 1
            count_bytes[1] += e.meta.nbytes
        for device, (count, nbytes) in sorted(by_device.items()):
            tensors.add_metric([device], count)
            held.add_metric([device], nbytes)
        yield tensors
        yield held

        device = str(store.device)
        used = GaugeMetricFamily("tensorslice_device_memory_used_bytes",
                                 "Bytes the tensors occupy on the store's device.",
                                 labels=["device"])
        used.add_metric([device], store.device_memory_used)
        yield used
        if store.max_device_memory is not None:
            budget = GaugeMetricFamily("tensorslice_device_memory_budget_bytes",
                                       "The store's budget on its device (--max-device-memory).",
                                       labels=["device"])
            budget.add_metric([device], store.max_device_memory)
            yield budget

        pending = bulk.pending if bulk is not None else 0
        sending = bulk.sending if bulk is not None else 0
        yield GaugeMetricFamily("tensorslice_calls_in_progress",
                                "TensorSlice calls running now (counted against --max-calls).",
                                value=service.gate.active)
        yield GaugeMetricFamily(
            "tensorslice_results_in_flight",
            "Results being produced or awaiting delivery: calls in progress, bulk tickets "
            "pending and bulk transfers running.",
            value=service.gate.active + pending + sending,
        )
        yield GaugeMetricFamily("tensorslice_materialized_bytes",
                                "Bytes calls hold materialised now (--max-materialized-bytes).",
                                value=calls.budget.used)
        yield GaugeMetricFamily("tensorslice_materialized_bytes_limit",
                                "The limit of materialised bytes (0: none).",
                                value=calls.budget.limit)

        sent = CounterMetricFamily("tensorslice_sent_bytes",
                                   "Result bytes sent, by transport.", labels=["transport"])
        with self.metrics._lock:
            sent.add_metric(["inline"], self.metrics.inline_bytes)
            sent.add_metric(["stream"], self.metrics.stream_bytes)
        sent.add_metric(["bulk"], bulk.bytes_sent if bulk is not None else 0)
        yield sent

        yield GaugeMetricFamily("tensorslice_bulk_tickets_pending",
                                "Bulk tickets issued and not yet redeemed.", value=pending)
        yield CounterMetricFamily("tensorslice_bulk_tickets_expired",
                                  "Bulk tickets that expired unredeemed.",
                                  value=bulk.expired if bulk is not None else 0)
        yield CounterMetricFamily("tensorslice_bulk_connections_refused",
                                  "Bulk connections closed: over the limit, a bad or expired "
                                  "token, a failed TLS handshake, or too slow.",
                                  value=bulk.refused if bulk is not None else 0)
        yield GaugeMetricFamily("tensorslice_bulk_transfers_in_progress",
                                "Bulk transfers sending now.", value=sending)

        yield CounterMetricFamily("tensorslice_plan_cache_hits", "Plans found in the cache.",
                                  value=calls.plan_hits)
        yield CounterMetricFamily("tensorslice_plan_cache_misses",
                                  "Plans made afresh (and cached).", value=calls.plan_misses)
        yield CounterMetricFamily("tensorslice_answer_cache_hits",
                                  "Small answers sent again as kept, for the same request "
                                  "bytes and tensor versions.", value=calls.answers.hits)


def _code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """The status a handler set (by `abort` or `set_code`), or None."""
    code: grpc.StatusCode | None = context.code()  # type: ignore[attr-defined]
    return code


def _timed_unary(fn: Callable[[Any, grpc.ServicerContext], Any], method: str,
                 metrics: Metrics) -> Callable[[Any, grpc.ServicerContext], Any]:
    def handler(request: Any, context: grpc.ServicerContext) -> Any:
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            response = fn(request, context)
            code = _code(context) or grpc.StatusCode.OK
            return response
        except BaseException:
            code = _code(context) or grpc.StatusCode.UNKNOWN
            raise
        finally:
            metrics.observe(method, code, time.perf_counter() - start)

    return handler


def _timed_stream(fn: Callable[[Any, grpc.ServicerContext], Iterator[Any]], method: str,
                  metrics: Metrics) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
    def handler(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        start = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        try:
            yield from fn(request, context)
            code = _code(context) or grpc.StatusCode.OK
        except GeneratorExit:  # the call ended before the stream did (cancelled)
            code = grpc.StatusCode.CANCELLED
            raise
        except BaseException:
            code = _code(context) or grpc.StatusCode.UNKNOWN
            raise
        finally:
            metrics.observe(method, code, time.perf_counter() - start)

    return handler


class MetricsInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    """Counts and times every call (the outermost interceptor: refusals count too)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None:
            return None
        method, m = details.method, self.metrics
        kwargs = {"request_deserializer": handler.request_deserializer,
                  "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _timed_unary(handler.unary_unary, method, m), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _timed_stream(handler.unary_stream, method, m), **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                _timed_unary(handler.stream_unary, method, m), **kwargs)
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            _timed_stream(handler.stream_stream, method, m), **kwargs)


def serve_metrics(metrics: Metrics, host: str, port: int) -> tuple[Any, int]:
    """Start the HTTP endpoint (``/metrics``) on ``host:port`` (0: a free port); the server
    (``shutdown()`` stops it) and its port. OSError when the port cannot be bound."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server, int(server.server_port)
