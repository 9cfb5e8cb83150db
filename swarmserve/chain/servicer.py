"""The ``Chain`` gRPC servicer over a node's chain replica: protobuf in and out, rules in the
replica and the state machine."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc import aio

from swarmserve.chain.cheques import ChequeError
from swarmserve.chain.replica import MAX_BLOCKS_PER_FETCH, ChainReplica
from swarmserve.rpc import InvalidArgument, NotFound, ServiceBinding
from swarmserve.v1 import chain_pb2, chain_pb2_grpc

__all__ = ["chain_binding"]

DEFAULT_BLOCKS = 64


class ChainServicer(chain_pb2_grpc.ChainServicer):
    def __init__(self, replica: ChainReplica) -> None:
        self.replica = replica

    async def GetStatus(
        self, request: chain_pb2.GetChainStatusRequest, context: aio.ServicerContext[Any, Any]
    ) -> chain_pb2.GetChainStatusResponse:
        state = self.replica.state
        return chain_pb2.GetChainStatusResponse(
            chain_id=state.chain_id,
            height=max(state.height, 0),
            block_digest=state.block_digest,
            state_root=state.state_root,
            validators=[chain_pb2.Validator(key=k, address=a) for k, a in self.replica.committee()],
            validator=self.replica.validator,
            epoch=state.epoch_of(state.height + 1),
        )

    async def GetBlocks(
        self, request: chain_pb2.GetBlocksRequest, context: aio.ServicerContext[Any, Any]
    ) -> chain_pb2.GetBlocksResponse:
        if request.limit > MAX_BLOCKS_PER_FETCH:
            raise InvalidArgument(f"limit is at most {MAX_BLOCKS_PER_FETCH}")
        if request.from_height > self.replica.state.height + 1:
            raise NotFound(f"this node holds blocks up to {self.replica.state.height}")
        blocks = await asyncio.to_thread(
            self.replica.state.blocks, request.from_height, request.limit or DEFAULT_BLOCKS
        )
        return chain_pb2.GetBlocksResponse(blocks=blocks)

    async def Submit(
        self, request: chain_pb2.SubmitTransactionRequest, context: aio.ServicerContext[Any, Any]
    ) -> chain_pb2.SubmitTransactionResponse:
        queued = await self.replica.submit(request.transaction.SerializeToString())
        return chain_pb2.SubmitTransactionResponse(queued=queued)

    async def GetAccount(
        self, request: chain_pb2.GetAccountRequest, context: aio.ServicerContext[Any, Any]
    ) -> chain_pb2.GetAccountResponse:
        if len(request.account_key) != 32:
            raise InvalidArgument("account_key must be a 32-byte identity key")
        state = self.replica.state
        account = await asyncio.to_thread(state.account, request.account_key)
        return chain_pb2.GetAccountResponse(
            available=account.available,
            bonded=account.bonded,
            unbonding=account.unbonding,
            nonce=account.nonce,
            height=max(state.height, 0),
            account_key=account.account_key,
        )

    async def DepositCheque(
        self, request: chain_pb2.DepositChequeRequest, context: aio.ServicerContext[Any, Any]
    ) -> chain_pb2.DepositChequeResponse:
        try:
            credited = await asyncio.to_thread(self.replica.inbox.deposit, request.cheque)
        except ChequeError as error:
            raise InvalidArgument(str(error)) from error
        return chain_pb2.DepositChequeResponse(credited=credited)


def chain_binding(replica: ChainReplica) -> ServiceBinding:
    servicer = ChainServicer(replica)
    return ServiceBinding(
        "swarmserve.v1.Chain", lambda server: chain_pb2_grpc.add_ChainServicer_to_server(servicer, server)
    )
