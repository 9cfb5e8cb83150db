"""Prometheus metrics (prometheus-client), one registry per node: several nodes share one process
in the tests and in ``swarmserve up``'s siblings, and each must report only its own.

Names follow Prometheus' conventions: ``swarmserve_<component>_<what>``, base units in the name
(``_seconds``, ``_bytes``), counters end in ``_total``. Values that already live in a component
(queue depth, members by state, the chain's height) are read when scraped (:meth:`NodeMetrics.read`)
rather than copied on every change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

__all__ = ["LATENCY_BUCKETS", "TOKEN_GAP_BUCKETS", "NodeMetrics", "metrics_route"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

Reading = float | Mapping[Any, float]  # keys: tuple[str, ...] or str (Mapping's key type is invariant)
"""A value now: one number, or one per label values (a plain string for a single label, so that a
``Counter[str]`` is read as it is)."""


class _Read(Collector):
    def __init__(
        self,
        family: type[GaugeMetricFamily | CounterMetricFamily],
        name: str,
        documentation: str,
        labels: Sequence[str],
        read: Callable[[], Reading],
    ) -> None:
        self._family, self._name, self._documentation, self._labels, self._read = (
            family, name, documentation, list(labels), read,
        )  # fmt: skip

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        family = self._family(self._name, self._documentation, labels=self._labels)
        value = self._read()
        if isinstance(value, Mapping):
            for label_values, number in value.items():
                family.add_metric([label_values] if isinstance(label_values, str) else list(label_values), number)
        else:
            family.add_metric([], value)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield self._family(self._name, self._documentation, labels=self._labels)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def counter(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Counter:
        return Counter(name, documentation, labels, registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str] = ()) -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry)

    def histogram(
        self, name: str, documentation: str, labels: Sequence[str] = (), buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

    def read(self, name: str, documentation: str, read: Callable[[], Reading], labels: Sequence[str] = ()) -> None:
        """A gauge whose value ``read`` returns at each scrape."""
        self.registry.register(_Read(GaugeMetricFamily, name, documentation, labels, read))

    def read_counter(
        self, name: str, documentation: str, read: Callable[[], Reading], labels: Sequence[str] = ()
    ) -> None:
        """A counter kept by a component (a number that only grows), read at each scrape."""
        self.registry.register(_Read(CounterMetricFamily, name, documentation, labels, read))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def metrics_route(metrics: NodeMetrics) -> Route:
    """``GET /metrics`` in Prometheus' text format."""

    async def scrape(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return Route("/metrics", scrape, methods=["GET"])
