"""A verifier node's duties on the ledger's chain, beyond recording its own verdicts:

- as an accused provider, it appeals every FAIL recorded against it while the window is open
  (an honest node loses nothing by it; a committee decides);
- as an appeal juror (its account drawn for a committee), it re-executes the recorded evidence
  on its own copy of the model and votes: uphold only if it finds the FAIL too.

Each duty is done once; the loop runs until the node stops."""

from __future__ import annotations

import asyncio
import contextlib

from services.verifier.checks import Outcome
from services.verifier.service import VerifierService
from swarmserve.chain import ChainReplica
from swarmserve.rpc import ServiceError
from swarmserve.telemetry import get_logger
from swarmserve.v1 import chain_pb2

__all__ = ["AppealDuties"]

log = get_logger("swarmserve.verifier")


class AppealDuties:
    def __init__(self, chain: ChainReplica, verifier: VerifierService, interval_s: float = 0.5) -> None:
        self._chain = chain
        self._verifier = verifier
        self._interval_s = interval_s
        self._done: set[tuple[str, bytes]] = set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.run_once()
            except ServiceError as error:
                log.warning("chain duty not done this time", reason=str(error))

    async def run_once(self) -> int:
        """Appeals and votes once on what is open now; returns how many transactions it sent."""
        chain, sent = self._chain, 0
        me = chain.identity.public_key
        for identifier in chain.state.accusations(me):
            if ("appeal", identifier) not in self._done:
                self._done.add(("appeal", identifier))
                await chain.send(appeal=chain_pb2.AppealVerdict(verdict_id=identifier))
                log.info("appealed a FAIL against this node", verdict=identifier.hex()[:16])
                sent += 1
        for identifier, evidence in chain.state.juror_duties(chain.state.account_of(me)):
            if ("vote", identifier) in self._done:
                continue
            self._done.add(("vote", identifier))
            try:
                result = await self._verifier.replay(evidence)
            except ServiceError as error:
                log.info("cannot judge an appeal", verdict=identifier.hex()[:16], reason=str(error))
                continue
            uphold = result.outcome is Outcome.FAIL
            await chain.send(appeal_vote=chain_pb2.AppealVote(verdict_id=identifier, uphold=uphold))
            log.info("voted on an appeal", verdict=identifier.hex()[:16], uphold=uphold)
            sent += 1
        return sent
