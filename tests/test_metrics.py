"""Prometheus metrics on every node of a real local swarm (a router, two relays, two llama.cpp
nodes, the ledger's chain): each node's ``/metrics`` scraped over HTTP, parsed with
``prometheus_client.parser``, before and after traffic, and the values seen to move: requests by
outcome (served, and refused for an unknown model), time to first token, tokens, dispatch,
circuit set-up, cells and bytes each relay forwarded, a junk set-up refused, prefill and decode,
a verifier's check, gossip probes, the chain's height. And a real Prometheus server (Debian's
``prometheus``, when installed) scraping the router and answering a PromQL query over the TTFT
histogram."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from services.relay.circuit import create_cell
from services.router.config import CircuitPoolSettings
from swarmserve.http import HttpServer
from swarmserve.node import ServiceNode
from swarmserve.v1 import relay_pb2_grpc, verifier_pb2, verifier_pb2_grpc
from tests.conftest import MODEL, SwarmFactory
from tests.test_private_path import chat_request, run

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as http:
        reply = await http.get(url)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def metrics_url(node: ServiceNode) -> str:
    server = node.metrics_http
    assert isinstance(server, HttpServer)
    return server.url + "/metrics"


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def test_every_node_reports_metrics_that_move_with_traffic(swarm: SwarmFactory) -> None:
    # No circuit pool: every circuit counted here is a request's own (the pool's metrics are
    # tested in test_circuit_pool.py).
    async with swarm(
        relays=2,
        inference=[{}, {}],
        default_hops=2,
        ledger=True,
        metrics=True,
        http_listen="127.0.0.1:0",
        circuit_pool=CircuitPoolSettings(enabled=False),
    ) as s:
        nodes: list[ServiceNode] = [s.router, *s.relays, *s.inference]
        before = {id(node): await scrape(metrics_url(node)) for node in nodes}
        for prompt in ("Name a colour.", "Name a fruit.", "Name a river."):
            await run(s.router.address, chat_request(prompt, max_new_tokens=6))
        refused = chat_request("x")
        refused.model = "no-such-model"
        with pytest.raises(aio.AioRpcError):
            await run(s.router.address, refused)
        # A junk set-up at the first relay, and a check by a verifier.
        async with aio.insecure_channel(s.relays[0].address) as channel:
            junk = create_cell(bytes(512))
            call = relay_pb2_grpc.RelayStub(channel).Circuit(iter([junk]))
            with pytest.raises(aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        request = chat_request("Name a tree.", max_new_tokens=6)
        chunks, summary = await run(s.router.address, request)
        checker = next(n for n in s.inference if n.keys.identity.node_id != summary.served_by)
        async with aio.insecure_channel(checker.address) as channel:
            await verifier_pb2_grpc.VerifierStub(channel).CheckReceipt(
                verifier_pb2.CheckReceiptRequest(
                    receipt=summary.receipt,
                    chat=request.chat,
                    token_ids=[t for c in chunks for t in c.token_ids],
                    token_texts=[t for c in chunks for t in c.token_texts],
                )
            )
        # A few gossip periods, and blocks reaching every replica (followers sync about once a second).
        heights = {id(node): value(before[id(node)], "swarmserve_ledger_height") for node in nodes}
        deadline = time.monotonic() + 20
        while any(node.chain is None or node.chain.state.height <= heights[id(node)] for node in nodes):
            assert time.monotonic() < deadline, "timed out waiting for every replica to apply a block"
            await asyncio.sleep(0.1)
        after = {id(node): await scrape(metrics_url(node)) for node in nodes}

        def moved(node: ServiceNode, name: str, **labels: str) -> float:
            return value(after[id(node)], name, **labels) - value(before[id(node)], name, **labels)

        router = s.router
        assert moved(router, "swarmserve_router_requests_total", outcome="served", status="OK") == 4
        assert moved(router, "swarmserve_router_requests_total", outcome="refused", status="NOT_FOUND") == 1
        assert moved(router, "swarmserve_router_time_to_first_token_seconds_count") == 4
        assert moved(router, "swarmserve_router_inter_token_latency_seconds_count") > 0
        assert moved(router, "swarmserve_router_tokens_total") > 4
        assert moved(router, "swarmserve_router_dispatch_decisions_total", policy="overlay") == 4
        assert moved(router, "swarmserve_router_circuit_setup_seconds_count") == 4
        assert value(after[id(router)], "swarmserve_router_requests_in_flight") == 0
        for relay in s.relays:  # two hops through two relays: both carried every request
            assert moved(relay, "swarmserve_relay_cells_forwarded_total", direction="forward") >= 4
            assert moved(relay, "swarmserve_relay_cells_forwarded_total", direction="backward") >= 4 * 6
            assert moved(relay, "swarmserve_relay_forwarded_bytes_total", direction="backward") > 0
            assert value(after[id(relay)], "swarmserve_relay_open_circuits") == 0
        assert moved(s.relays[0], "swarmserve_relay_setups_refused_total", reason="undecryptable") == 1
        served = sum(moved(n, "swarmserve_inference_tokens_total", kind="completion") for n in s.inference)
        assert served == moved(router, "swarmserve_router_tokens_total")
        assert sum(moved(n, "swarmserve_inference_prefill_seconds_count") for n in s.inference) == 4
        assert sum(moved(n, "swarmserve_inference_decode_seconds_count") for n in s.inference) == 4
        assert moved(checker, "swarmserve_verifier_verdicts_total", kind="check", outcome="pass") == 1
        for node in s.inference:
            samples = after[id(node)]
            assert value(samples, "swarmserve_inference_slots") == 1
            assert value(samples, "swarmserve_inference_running_requests") == 0
            assert value(samples, "swarmserve_inference_queue_depth") == 0
            assert value(samples, "swarmserve_inference_model_load_seconds", model=MODEL) > 0
        for node in nodes:
            assert value(after[id(node)], "swarmserve_gossip_members", state="alive") == len(nodes) - 1
            assert moved(node, "swarmserve_gossip_probes_total") > 0
            assert moved(node, "swarmserve_gossip_bytes_total", direction="sent") > 0
            assert moved(node, "swarmserve_ledger_height") > 0
            assert value(after[id(node)], "swarmserve_ledger_balance_credits", kind="bonded") >= 0
        # The router serves the same registry on its HTTP port (beside the OpenAI API).
        assert router.http is not None
        on_http = await scrape(router.http.url + "/metrics")
        assert value(on_http, "swarmserve_router_requests_total", outcome="served", status="OK") == 4


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed (CI installs it)")
async def test_a_prometheus_server_scrapes_the_router_and_answers_promql(swarm: SwarmFactory, tmp_path: Path) -> None:
    async with swarm(relays=1, inference=[{}], default_hops=1, http_listen="127.0.0.1:0") as s:
        assert s.router.http is not None
        target = s.router.http.url.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            f"scrape_configs: [{{job_name: router, static_configs: [{{targets: ['{target}']}}]}}]\n"
        )
        port = _free_port()
        server = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            api = f"http://127.0.0.1:{port}"
            await _until(lambda: _get(f"{api}/-/ready"), "prometheus is ready")
            query = (
                "histogram_quantile(0.5, sum by (le) (rate(swarmserve_router_time_to_first_token_seconds_bucket[1m])))"
            )

            async def answered() -> Any:
                # Traffic between scrapes, so that the rate over the histogram is not zero.
                await run(s.router.address, chat_request("Name a colour.", max_new_tokens=4))
                reply = await _get(f"{api}/api/v1/query", params={"query": query})
                result = reply["data"]["result"] if reply and reply.get("status") == "success" else []
                return result and float(result[0]["value"][1]) > 0 and result

            result = await _until(answered, "the TTFT quantile over the router's histogram", timeout_s=30)
            assert 0 < float(result[0]["value"][1]) < 60, result
        finally:
            server.terminate()
            server.wait(10)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _get(url: str, params: Mapping[str, str] | None = None) -> Any:
    try:
        async with httpx.AsyncClient() as http:
            reply = await http.get(url, params=params, timeout=2)
    except httpx.HTTPError:
        return None
    if reply.status_code != 200:
        return None
    return reply.json() if reply.headers.get("content-type", "").startswith("application/json") else True


async def _until(check: Any, what: str, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.5)
