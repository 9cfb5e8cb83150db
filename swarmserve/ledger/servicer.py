"""The ``Ledger`` gRPC servicer over a node's replica: protobuf in and out, rules in the replica."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from swarmserve.ledger.replica import LedgerReplica
from swarmserve.rpc import InvalidArgument, ServiceBinding
from swarmserve.v1 import ledger_pb2, ledger_pb2_grpc

__all__ = ["MAX_FETCH", "ledger_binding"]

MAX_FETCH = 256  # entries per FetchEntries answer
MAX_PUSH = 1024  # entries per PushEntries request


class LedgerServicer(ledger_pb2_grpc.LedgerServicer):
    def __init__(self, replica: LedgerReplica) -> None:
        self.replica = replica

    async def GetHeads(
        self, request: ledger_pb2.GetHeadsRequest, context: aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.GetHeadsResponse:
        return ledger_pb2.GetHeadsResponse(heads=await asyncio.to_thread(self.replica.heads))

    async def FetchEntries(
        self, request: ledger_pb2.FetchEntriesRequest, context: aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.FetchEntriesResponse:
        if len(request.author_key) != 32:
            raise InvalidArgument("author_key must be a 32-byte identity key")
        limit = min(request.limit or MAX_FETCH, MAX_FETCH)
        entries = await asyncio.to_thread(self.replica.fetch, request.author_key, request.from_sequence, limit)
        return ledger_pb2.FetchEntriesResponse(entries=entries)

    async def PushEntries(
        self, request: ledger_pb2.PushEntriesRequest, context: aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.PushEntriesResponse:
        if len(request.entries) > MAX_PUSH:
            raise InvalidArgument(f"at most {MAX_PUSH} entries per push")
        result = await asyncio.to_thread(self.replica.accept, request.entries)
        if result.rejected:
            # The valid entries of the batch are kept; the caller learns which were refused.
            raise InvalidArgument(f"{len(result.rejected)} entries refused: " + "; ".join(result.rejected[:5]))
        return ledger_pb2.PushEntriesResponse(accepted=result.accepted, duplicates=result.duplicates)

    async def GetBalance(
        self, request: ledger_pb2.GetBalanceRequest, context: aio.ServicerContext[Any, Any]
    ) -> ledger_pb2.GetBalanceResponse:
        if len(request.account_key) != 32:
            raise InvalidArgument("account_key must be a 32-byte identity key")
        balance = await asyncio.to_thread(self.replica.balance, request.account_key)
        return ledger_pb2.GetBalanceResponse(
            available=balance.available, staked=balance.staked, entries=balance.entries
        )


def ledger_binding(replica: LedgerReplica) -> ServiceBinding:
    servicer = LedgerServicer(replica)
    return ServiceBinding(
        "swarmserve.v1.Ledger", lambda server: ledger_pb2_grpc.add_LedgerServicer_to_server(servicer, server)
    )
