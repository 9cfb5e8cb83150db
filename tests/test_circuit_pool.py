"""The router's circuit pool (``services/router/circuit_pool.py``): circuits built before the
requests that take them, one circuit for one request.

Alone (``PoolStock``, the clock given): a ready circuit is handed out once, to a request for its
exit and hop count, never when it is too old, its call ended, a hop is not alive or restarted
(another onion key), or the request must avoid one of its relays; building stops at the limits
and for pairs nobody asked for lately.

In a real swarm (llama.cpp, relays, gRPC): the second request to an exit takes a ready circuit
(the pool's metrics move), which closes with its request and is never handed out again; a
ready circuit whose relay died without the pool noticing (its liveness checks disabled) fails
before the exit answers: the request is served by the same, only, exit through a circuit built
then, with no retry counted and the exit not excluded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from services.router.circuit_pool import PooledCircuit, PoolStock
from services.router.config import CircuitPoolSettings
from swarmserve.overlay import Peer
from swarmserve.overlay.directory import ALIVE, DEAD
from swarmserve.v1 import common_pb2
from tests.conftest import SwarmFactory
from tests.test_private_path import chat_request, run


class Circuit:
    """Stands in for an open circuit in the bookkeeping tests: only whether it is open counts."""

    def __init__(self) -> None:
        self.open = True

    def is_open(self) -> bool:
        return self.open

    def close(self) -> None:
        self.open = False


def peer(name: str, onion_key: bytes = b"k" * 32) -> Peer:
    descriptor = common_pb2.NodeDescriptor(onion_key=onion_key)
    return Peer(name, descriptor, common_pb2.SignedDescriptor(), 0.0)


def anything(relays: Sequence[Peer]) -> bool:
    return True


SETTINGS = CircuitPoolSettings(per_exit=2, max_circuits=3, building=2, max_age_s=60, demand_window_s=30)


def ready(stock: PoolStock[Circuit], key: tuple[str, int], relays: Sequence[Peer], exit_: Peer, now: float) -> Circuit:
    circuit = Circuit()
    stock.add(key, PooledCircuit.built(relays, exit_, circuit, now))
    return circuit


def test_a_ready_circuit_goes_to_one_request_of_its_exit_and_hop_count() -> None:
    stock: PoolStock[Circuit] = PoolStock(SETTINGS)
    exit_, relay = peer("exit"), peer("relay")
    assert stock.take(("exit", 1), 0.0, anything) is None  # a miss records the demand
    assert stock.wanted(0.0) == [("exit", 1)]
    circuit = ready(stock, ("exit", 1), [relay], exit_, 0.0)
    assert stock.take(("exit", 2), 1.0, anything) is None  # another hop count
    assert stock.take(("other", 1), 1.0, anything) is None  # another exit
    taken = stock.take(("exit", 1), 1.0, anything)
    assert taken is not None and taken.circuit is circuit
    assert stock.take(("exit", 1), 1.0, anything) is None  # never handed out twice
    assert stock.taken == {"hit": 1, "miss": 4}


def test_stale_dead_restarted_or_avoided_circuits_are_not_handed_out() -> None:
    stock: PoolStock[Circuit] = PoolStock(SETTINGS)
    exit_, relay = peer("exit"), peer("relay")
    key = ("exit", 1)
    old = ready(stock, key, [relay], exit_, 0.0)
    assert stock.take(key, 60.0, anything) is None and not old.open  # too old: closed
    ended = ready(stock, key, [relay], exit_, 60.0)
    ended.open = False  # its call ended
    assert stock.take(key, 61.0, anything) is None
    restarted = ready(stock, key, [relay], exit_, 61.0)
    relay.descriptor.onion_key = b"n" * 32  # the relay came back with a new onion key
    assert stock.take(key, 62.0, anything) is None and not restarted.open
    relay.descriptor.onion_key = b"k" * 32
    gone = ready(stock, key, [relay], exit_, 62.0)
    exit_.state = DEAD
    assert stock.take(key, 63.0, anything) is None and not gone.open
    exit_.state = ALIVE
    avoided = ready(stock, key, [relay], exit_, 63.0)
    assert stock.take(key, 64.0, lambda relays: relay not in relays) is None
    assert avoided.open and len(stock.ready(key)) == 1  # left for another request
    taken = stock.take(key, 64.0, anything)
    assert taken is not None and taken.circuit is avoided


def test_building_stops_at_the_limits_and_for_pairs_not_asked_for() -> None:
    stock: PoolStock[Circuit] = PoolStock(SETTINGS)
    exit_, relay = peer("a"), peer("relay")
    for name in ("a", "b"):
        stock.take((name, 3), 0.0, anything)
    assert sorted(stock.wanted(0.0)) == [("a", 3), ("b", 3)]  # two building places
    stock.building[("a", 3)] += 1
    stock.building[("b", 3)] += 1
    assert stock.wanted(0.0) == []  # both places taken
    stock.building[("a", 3)] -= 1
    ready(stock, ("a", 3), [relay], exit_, 0.0)
    assert stock.wanted(0.0) == [("a", 3)]  # a: 1 of 2 ready; b: building its 1st
    ready(stock, ("a", 3), [relay], exit_, 0.0)
    stock.building[("b", 3)] -= 1
    assert stock.wanted(0.0) == [("b", 3)]  # a has its 2
    ready(stock, ("b", 3), [relay], exit_, 0.0)
    assert stock.wanted(0.0) == []  # 3 held: max_circuits
    stock.expire(31.0)  # nobody asked for 30 s: closed
    assert len(stock) == 0 and stock.wanted(31.0) == []


async def test_the_second_request_takes_a_ready_circuit_used_once(swarm: SwarmFactory) -> None:
    async with swarm(relays=3, default_hops=2, metrics=True, circuit_pool=CircuitPoolSettings(per_exit=2)) as s:
        pool = s.router.service.pool
        await run(s.router.address, chat_request("Name a colour.", max_new_tokens=4))
        assert pool.stock.taken == {"hit": 0, "miss": 1}
        key = (s.inference[0].keys.identity.node_id, 2)
        deadline = time.monotonic() + 20
        while len(pool.stock.ready(key)) < 2:
            assert time.monotonic() < deadline, "the pool built 2 circuits for the exit"
            await asyncio.sleep(0.05)
        first_ready = pool.stock.ready(key)[0].circuit
        _, summary = await run(s.router.address, chat_request("Name a fruit.", max_new_tokens=4))
        assert summary.timing.completion_tokens == 4
        assert pool.stock.taken == {"hit": 1, "miss": 1}
        assert not first_ready.is_open(), "the taken circuit closed with its request"
        assert all(entry.circuit is not first_ready for entry in pool.stock.ready(key))
        metrics = s.router.metrics.exposition().decode()
        assert 'swarmserve_router_circuit_pool_takes_total{outcome="hit"} 1.0' in metrics


async def test_a_pooled_circuit_dead_unnoticed_costs_the_request_nothing(
    swarm: SwarmFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with swarm(relays=4, default_hops=1, circuit_pool=CircuitPoolSettings(per_exit=1)) as s:
        pool = s.router.service.pool
        await run(s.router.address, chat_request("Name a colour.", max_new_tokens=4))
        key = (s.inference[0].keys.identity.node_id, 1)
        deadline = time.monotonic() + 20
        while not pool.stock.ready(key):
            assert time.monotonic() < deadline, "the pool built a circuit"
            await asyncio.sleep(0.05)
        # The pool cannot tell that its circuit died (as when a relay vanished a moment ago).
        monkeypatch.setattr(PoolStock, "_fresh", lambda self, entry, now: True)
        (relay,) = pool.stock.ready(key)[0].relays
        victim = next(node for node in s.relays if node.keys.identity.node_id == relay.node_id)
        await victim.server.stop(0)  # gone without a word: gossip still holds it alive
        retries = s.router.service.telemetry.retries._value.get()
        # One inference node: had the exit been blamed (excluded), nothing could serve this.
        _, summary = await run(s.router.address, chat_request("Name a fruit.", max_new_tokens=4))
        assert summary.served_by == s.inference[0].keys.identity.node_id
        assert pool.stock.taken["hit"] == 1
        assert s.router.service.telemetry.retries._value.get() == retries
