"""What a router measures of the requests it serves: Prometheus metrics (``/metrics``) and the
recent window the dashboard charts (``stats.py``). Every request is watched from the moment
``RouterService.generate`` takes it to its end, served, refused, failed or abandoned by its client."""

from __future__ import annotations

import asyncio
import time

from services.router.stats import RecentRequests
from swarmserve.rpc import status_for
from swarmserve.telemetry.metrics import TOKEN_GAP_BUCKETS, NodeMetrics
from swarmserve.v1 import router_pb2

__all__ = ["RequestWatch", "RouterTelemetry"]


class RouterTelemetry:
    def __init__(self, metrics: NodeMetrics) -> None:
        self.recent = RecentRequests()
        self.in_flight_now = 0  # the gauge's value, for the dashboard
        self.requests = metrics.counter(
            "swarmserve_router_requests",
            "requests that ended, by outcome (served, refused before any token, failed after some, cancelled by the "
            "client) and status (the gRPC code; the HTTP API maps it)",
            ["outcome", "status"],
        )
        self.time_to_first_token = metrics.histogram(
            "swarmserve_router_time_to_first_token_seconds", "from taking a request to relaying its first token"
        )
        self.inter_token_latency = metrics.histogram(
            "swarmserve_router_inter_token_latency_seconds",
            "between consecutive tokens relayed to the client",
            buckets=TOKEN_GAP_BUCKETS,
        )
        self.tokens = metrics.counter("swarmserve_router_tokens", "generated tokens relayed to clients")
        self.in_flight = metrics.gauge("swarmserve_router_requests_in_flight", "requests being served now")
        self.dispatch = metrics.counter(
            "swarmserve_router_dispatch_decisions", "serving nodes chosen, by dispatch policy", ["policy"]
        )
        self.circuit_setup = metrics.histogram(
            "swarmserve_router_circuit_setup_seconds", "opening an onion circuit to the serving node"
        )
        self.retries = metrics.counter(
            "swarmserve_router_retries", "requests sent to another node after a failure before their first token"
        )
        self.resumptions = metrics.counter(
            "swarmserve_router_resumptions", "streams resumed on another node after a failure mid-stream"
        )
        self.resume_gap = metrics.histogram(
            "swarmserve_router_resume_gap_seconds",
            "from the last token before a failure to the first token of the resumed stream (the gap a client sees)",
        )

    def watch(self) -> RequestWatch:
        return RequestWatch(self)


class RequestWatch:
    """One request, from start to end."""

    def __init__(self, telemetry: RouterTelemetry) -> None:
        self._telemetry = telemetry
        self._started = time.monotonic()
        self._last_token: float | None = None
        self._ttft: float | None = None
        self._outcome, self._status = "served", "OK"
        self._answered = False
        telemetry.in_flight.inc()
        telemetry.in_flight_now += 1

    def saw(self, event: object) -> None:
        if isinstance(event, router_pb2.GenerateSummary):
            self._answered = True  # a client may stop reading here: it was served
            return
        if getattr(event, "token_id", None) is None:
            return
        now = time.monotonic()
        if self._last_token is None:
            self._ttft = now - self._started
            self._telemetry.time_to_first_token.observe(self._ttft)
        else:
            self._telemetry.inter_token_latency.observe(now - self._last_token)
        self._last_token = now
        self._telemetry.tokens.inc()

    def failed(self, error: BaseException) -> None:
        if self._answered:
            return
        if isinstance(error, GeneratorExit | asyncio.CancelledError):
            self._outcome, self._status = "cancelled", "CANCELLED"
            return
        found = status_for(error)
        self._status = found[0].name if found is not None else "INTERNAL"
        self._outcome = "failed" if self._last_token is not None else "refused"

    def ended(self) -> None:
        telemetry = self._telemetry
        telemetry.in_flight.dec()
        telemetry.in_flight_now -= 1
        telemetry.requests.labels(self._outcome, self._status).inc()
        telemetry.recent.record(self._ttft, self._outcome == "served")
