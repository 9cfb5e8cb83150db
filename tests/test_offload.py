"""WWW.Serve-style offload between inference nodes (emulated engines, real gRPC, real circuits):
a node whose slot is busy passes a new request to a peer with a free slot, within the hop
budget and never back to a node already visited; the receipt names the node that served, and
the router checks it against that node."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from services.inference.config import EmulatedSettings, InferenceConfig, ModelSettings, PriceSettings, ProviderPolicy
from services.inference.node import InferenceNode
from services.relay.circuit import responses_in
from services.relay.client import OpenCircuit
from services.router.config import RouterConfig
from services.router.node import RouterNode
from swarmserve import native
from swarmserve.chain import Genesis, GenesisAccount, GenesisValidator
from swarmserve.chain.callers import sign_as_caller
from swarmserve.config import LedgerSettings, ServerSettings
from swarmserve.keys import NodeKeys
from swarmserve.overlay import Peer
from swarmserve.receipts import verify_receipt
from swarmserve.rpc import ChannelPool
from swarmserve.swarm import free_port_block
from swarmserve.v1 import common_pb2, inference_pb2, relay_pb2, router_pb2
from tests.conftest import TEST_CHAIN, joining, wait_for_members
from tests.test_private_path import chat_request, run

MODEL = "emulated-1b"
SLOW = EmulatedSettings(prefill_us_per_token=100, decode_us_per_token=40_000)  # 25 tokens/s


@asynccontextmanager
async def emulated_swarm(
    tmp_path: Path, count: int, stakes: list[int] | None = None, **router: object
) -> AsyncIterator[tuple[list[InferenceNode], RouterNode]]:
    """``count`` emulated nodes n0, n1... and a router; with ``stakes``, a ledger chain (the
    router validates) where node i's account has stakes[i] bonded."""
    ledger = LedgerSettings()
    if stakes is not None:
        key = {
            n: NodeKeys.load_or_create(tmp_path / n).identity.public_key.hex()
            for n in ["router", *(f"n{i}" for i in range(count))]
        }
        genesis = Genesis(
            name="offload",
            created_unix_ms=1,
            validators=[GenesisValidator(key=key["router"], address=f"127.0.0.1:{free_port_block(1)}")],
            accounts=[GenesisAccount(key=key[f"n{i}"], credits=100, bonded=stake) for i, stake in enumerate(stakes)],
            parameters=TEST_CHAIN,
        )
        (tmp_path / "genesis.json").write_bytes(genesis.encode())
        ledger = LedgerSettings(genesis=tmp_path / "genesis.json")
    nodes: list[InferenceNode] = []
    started: list[InferenceNode | RouterNode] = []
    try:
        for i in range(count):
            node = InferenceNode(
                InferenceConfig(
                    data_dir=tmp_path / f"n{i}",
                    server=ServerSettings(listen="127.0.0.1:0"),
                    models=[ModelSettings(name=MODEL, engine="emulated", emulated=SLOW)],
                    policy=ProviderPolicy(max_concurrent=1, max_queue=4),
                    gossip=joining(nodes),
                    ledger=ledger,
                    stake=0,
                    # Free, so that offloading may pass requests on: a billing peer wants tokens of
                    # its own (services/inference/offload.py); stake still weighs the draw.
                    price=PriceSettings(credits_per_1k_prompt_tokens=0, credits_per_1k_completion_tokens=0),
                )
            )
            await node.start()
            nodes.append(node)
            started.append(node)
        router_node = RouterNode(
            RouterConfig(
                data_dir=tmp_path / "router",
                server=ServerSettings(listen="127.0.0.1:0"),
                gossip=joining(nodes),
                ledger=ledger,
                **router,  # type: ignore[arg-type]
            )
        )
        await router_node.start()
        started.append(router_node)
        await wait_for_members(router_node, count)
        for node in nodes:  # and the nodes know each other, with their models
            await wait_for_members_with_models(node, count - 1)
        yield nodes, router_node
    finally:
        for item in reversed(started):
            await item.stop(0)


async def wait_for_members_with_models(node: InferenceNode, count: int) -> None:
    for _ in range(200):
        if (
            len([p for p in node.membership.directory.alive(common_pb2.NODE_ROLE_INFERENCE) if p.serves(MODEL)])
            >= count
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("peers did not learn each other's models")


def router_request(prompt: str, tokens: int) -> router_pb2.GenerateRequest:
    message = chat_request(prompt, max_new_tokens=tokens)
    message.model = MODEL
    return message


def request(
    tokens: int, budget: int, visited: list[bytes] | None = None, caller: native.Identity | None = None
) -> inference_pb2.InferenceGenerateRequest:
    """With ``caller``, signed as its paying caller (what nodes that bill their callers ask)."""
    message = inference_pb2.InferenceGenerateRequest(
        model=MODEL,
        prompt="Offload me, please.",
        sampling=common_pb2.SamplingParams(max_new_tokens=tokens),
        forwarding=inference_pb2.ForwardingState(hop_budget=budget, visited=visited or []),
    )
    if caller is not None:
        sign_as_caller(caller, message)
    return message


async def serve(
    channels: ChannelPool, entry: Peer, message: inference_pb2.InferenceGenerateRequest
) -> tuple[list[inference_pb2.InferenceToken], relay_pb2.CircuitMessage]:
    """Sends ``message`` to ``entry`` through a one-layer circuit; the tokens and the last message."""
    circuit = await OpenCircuit.open(channels, [], entry, setup_timeout_s=5, cell_timeout_s=30)
    try:
        await circuit.send(relay_pb2.CircuitMessage(request=message))
        tokens = []
        while True:
            reply = await circuit.receive()
            responses = responses_in(reply) or ()
            tokens.extend(r.token for r in responses if r.HasField("token"))
            if not responses or responses[-1].HasField("summary"):
                return tokens, reply
    finally:
        circuit.close()


def served_by(tokens: list[inference_pb2.InferenceToken], last: relay_pb2.CircuitMessage) -> bytes:
    responses = responses_in(last)
    assert responses is not None and responses[-1].HasField("summary"), last
    receipt = verify_receipt(responses[-1].summary.receipt, [t.token_id for t in tokens], [t.text for t in tokens])
    return receipt.node_key


async def test_a_busy_node_offloads_to_a_free_peer_and_the_receipt_names_the_server(tmp_path: Path) -> None:
    async with emulated_swarm(tmp_path, 2) as (nodes, router):
        a, b = (router.directory.get(n.keys.identity.node_id) for n in nodes)
        assert a is not None and b is not None
        channels = router.channels
        busy = asyncio.ensure_future(serve(channels, a, request(40, budget=0)))  # holds a's only slot
        await asyncio.sleep(0.3)
        tokens, last = await serve(channels, a, request(5, budget=2))
        assert served_by(tokens, last) == nodes[1].keys.identity.public_key
        assert nodes[0].offloader is not None and nodes[0].offloader.offloaded == 1
        assert served_by(*await busy) == nodes[0].keys.identity.public_key


async def test_no_offload_without_budget_or_back_to_a_visited_node(tmp_path: Path) -> None:
    async with emulated_swarm(tmp_path, 2) as (nodes, router):
        a = router.directory.get(nodes[0].keys.identity.node_id)
        assert a is not None
        channels = router.channels
        busy = asyncio.ensure_future(serve(channels, a, request(30, budget=0)))
        await asyncio.sleep(0.3)
        # Budget 0: queued here. Budget left but the only peer already visited: queued here.
        no_budget = serve(channels, a, request(3, budget=0))
        visited = serve(channels, a, request(3, budget=3, visited=[nodes[1].keys.identity.public_key]))
        results = await asyncio.gather(no_budget, visited)
        assert all(served_by(*r) == nodes[0].keys.identity.public_key for r in results)
        assert nodes[0].offloader is not None and nodes[0].offloader.offloaded == 0
        # A malformed visited set is refused with a clear error (nothing is forwarded).
        _, last = await serve(channels, a, request(3, budget=1, visited=[b"short"]))
        assert last.WhichOneof("body") == "error"
        assert last.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "visited" in last.error.message
        await busy


async def test_offload_targets_are_drawn_in_proportion_to_stake(tmp_path: Path) -> None:
    async with emulated_swarm(tmp_path, 3, stakes=[50, 50, 10]) as (nodes, router):
        staked, unstaked = (n.keys.identity.public_key for n in nodes[1:])
        assert (nodes[0].stake_of(staked), nodes[0].stake_of(unstaked)) == (50, 10)  # from the genesis
        a = router.directory.get(nodes[0].keys.identity.node_id)
        assert a is not None and nodes[0].offloader is not None and nodes[0].servicer.service is not None
        payer = router.keys.identity  # with a ledger, nodes bill their callers: requests are signed
        busy = asyncio.ensure_future(serve(router.channels, a, request(60, budget=0, caller=payer)))  # holds a's slot
        await asyncio.sleep(0.3)
        picks = Counter(
            target.descriptor.identity_key
            for _ in range(400)
            if (target := nodes[0].offloader.target(nodes[0].servicer.service, request(5, 2, caller=payer))) is not None
        )
        # Weights stake + 1: 51 to 11, so 329 of 400 (sd 7.6) go to the more staked peer; a
        # deterministic choice (400 or 0) or a uniform one (200) is far outside.
        assert sum(picks.values()) == 400 and 290 <= picks[staked] <= 368, picks
        await busy


async def test_the_router_accepts_and_cosigns_an_offloaded_receipt(tmp_path: Path) -> None:
    async with emulated_swarm(tmp_path, 3, default_hops=0) as (nodes, router):
        # 6 requests at 3 one-slot nodes: the router spreads them, all three serve.
        results = await asyncio.gather(*(run(router.address, router_request(f"Question {i}?", 20)) for i in range(6)))
        assert {summary.served_by for _, summary in results} == {n.keys.identity.node_id for n in nodes}
        assert all(len(summary.receipt.cosignatures) == 1 for _, summary in results)
        # Every request now enters at node 0: with its slot busy, the next one is passed on, and
        # the router checks and co-signs a receipt signed by a node it did not send it to.
        entry = router.directory.get(nodes[0].keys.identity.node_id)
        assert entry is not None

        async def pinned(
            request: router_pb2.GenerateRequest, excluded: set[str] | None = None, weights_digest: bytes = b""
        ) -> Peer:
            return entry

        router.service.choose_exit = pinned  # type: ignore[method-assign]
        long = asyncio.ensure_future(run(router.address, router_request("A long one?", 60)))
        # Send the short one when node 0's only slot is held by the long one and gossip has
        # told node 0 of a peer with a free slot (descriptors refresh as load changes).
        admission = nodes[0].servicer.service.admission  # type: ignore[union-attr]

        def peer_free() -> bool:
            return any(
                p.descriptor.load.running + p.descriptor.load.queued < p.descriptor.capacity.max_concurrent
                for p in nodes[0].membership.directory.alive(common_pb2.NODE_ROLE_INFERENCE)
            )

        deadline = time.monotonic() + 10
        while admission.snapshot().running == 0 or not peer_free():
            assert time.monotonic() < deadline, "node 0 never had its slot busy and a free peer in view"
            await asyncio.sleep(0.01)
        _, summary = await run(router.address, router_request("A short one?", 5))
        assert summary.entered_at == nodes[0].keys.identity.node_id
        assert summary.served_by != summary.entered_at
        receipt = common_pb2.Receipt.FromString(summary.receipt.receipt)
        assert native.node_id(receipt.node_key) == summary.served_by
        (cosignature,) = summary.receipt.cosignatures
        assert cosignature.signer_key == router.keys.identity.public_key
        native.verify_signature(cosignature.signer_key, summary.receipt.receipt, cosignature.signature)
        _, first = await long
        assert first.served_by == first.entered_at == nodes[0].keys.identity.node_id


@pytest.mark.parametrize("dispatch", ["round-robin", "random", "central-oracle"])
async def test_baselines_dispatch_and_never_offload(tmp_path: Path, dispatch: str) -> None:
    async with emulated_swarm(tmp_path, 2, default_hops=0, dispatch=dispatch) as (nodes, router):
        results = await asyncio.gather(*(run(router.address, router_request(f"Question {i}?", 5)) for i in range(4)))
        assert all(s.served_by == s.entered_at for _, s in results)
        assert all(n.offloader is not None and n.offloader.offloaded == 0 for n in nodes)


async def test_local_only_serves_every_request_on_the_entry_points_own_node(tmp_path: Path) -> None:
    async with emulated_swarm(tmp_path, 2, default_hops=0) as (nodes, _):
        home = nodes[1]
        local = RouterNode(
            RouterConfig(
                data_dir=tmp_path / "local",
                server=ServerSettings(listen="127.0.0.1:0"),
                gossip=joining(nodes),
                default_hops=0,
                dispatch="local-only",
                home=home.address,
            )
        )
        await local.start()
        try:
            await wait_for_members(local, 2)
            results = await asyncio.gather(*(run(local.address, router_request(f"Question {i}?", 5)) for i in range(3)))
            assert {s.served_by for _, s in results} == {home.keys.identity.node_id}
        finally:
            await local.stop(0)
