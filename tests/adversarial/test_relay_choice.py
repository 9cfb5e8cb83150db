"""Issue 14, attack 6 (in part): capturing whole circuits by running many relays. Relays used
to be drawn uniformly, so whoever ran most relays held whole circuits. Tried on a real swarm with
the ledger's chain: relays 0 and 1 are one operator (one account on the chain), relay 2 another.
Every 2-hop circuit the router builds (recorded as it opens them) has relay 2 in it: the operator
of two relays never holds both hops of one circuit."""

from __future__ import annotations

from typing import Any

from swarmserve.client import generate
from tests.conftest import MODEL, SwarmFactory


async def test_one_operators_relays_never_share_a_circuit(swarm: SwarmFactory) -> None:
    paths: list[list[str]] = []
    async with swarm(relays=3, ledger=True, shared=[["relay0", "relay1"]]) as s:
        open_circuit = s.router.service.open_circuit

        async def recording(relays: Any, exit_: Any, *args: Any) -> Any:
            paths.append([r.node_id for r in relays])
            return await open_circuit(relays, exit_, *args)

        s.router.service.open_circuit = recording
        r0, r1, r2 = (r.keys.identity.node_id for r in s.relays)
        chain = s.router.chain
        assert chain is not None
        assert chain.state.account_of(s.relays[1].keys.identity.public_key) == s.relays[0].keys.identity.public_key
        for i in range(12):
            await generate(s.router.address, f"Question {i}?", model=MODEL, hops=2, max_tokens=2)
        assert len(paths) >= 12
        for path in paths:
            assert r2 in path and {r0, r1} != set(path), path
        assert {r0, r1} <= {n for path in paths for n in path}  # both of the operator's relays serve
