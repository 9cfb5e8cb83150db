"""The router's payment tokens: bought from each billing provider in batches, paid by cheque,
and attached to requests, so that a provider is paid without learning which router (or user)
each request came from (``services/inference/tokens.py`` is the provider's side).

A batch is bought when the held tokens of a provider do not cover a request; one purchase at a
time per provider. Tokens are kept per provider and token key: a provider that changes its key
makes the old ones worthless (they are dropped). Tokens live in memory: those unspent when the
router stops are lost to it, as are those attached to a request a provider took and then failed.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from grpc import aio

from swarmserve import native
from swarmserve.chain import ChainReplica
from swarmserve.overlay import Peer
from swarmserve.rpc import ChannelPool, DataLoss, ServiceError
from swarmserve.telemetry import get_logger
from swarmserve.v1 import inference_pb2, inference_pb2_grpc

__all__ = ["TokenWallet"]

log = get_logger("swarmserve.router")

BATCH = 32


class TokenWallet:
    def __init__(self, chain: ChainReplica, channels: ChannelPool) -> None:
        self._chain = chain
        self._channels = channels
        self._held: dict[tuple[bytes, bytes], list[inference_pb2.PaymentToken]] = defaultdict(list)
        self._buying: dict[bytes, asyncio.Lock] = defaultdict(asyncio.Lock)

    def held(self, peer: Peer) -> int:
        return len(self._held[(peer.descriptor.identity_key, peer.descriptor.token_key)])

    async def take(self, peer: Peer, count: int) -> list[inference_pb2.PaymentToken]:
        """``count`` tokens of ``peer``'s current key, buying a batch first if too few are held."""
        key = (peer.descriptor.identity_key, peer.descriptor.token_key)
        async with self._buying[peer.descriptor.identity_key]:
            held = self._held[key]
            if len(held) < count:
                held.extend(await self._buy(peer, max(BATCH, count - len(held))))
            taken, self._held[key] = held[:count], held[count:]
        return taken

    async def _buy(self, peer: Peer, count: int) -> list[inference_pb2.PaymentToken]:
        descriptor = peer.descriptor
        bought: list[inference_pb2.PaymentToken] = []
        while count > 0:
            batch = min(count, native.TOKEN_BATCH_MAX)
            request = native.TokenRequest(batch)
            cheque = await asyncio.to_thread(
                self._chain.book.pay, descriptor.identity_key, batch * descriptor.price.credits_per_token
            )
            stub = inference_pb2_grpc.InferenceStub(self._channels.get(descriptor.address))
            try:
                answer = await stub.BuyTokens(
                    inference_pb2.BuyTokensRequest(cheque=cheque, blinded=request.blinded), timeout=10
                )
            except aio.AioRpcError as error:  # the provider's refusal, passed on as it said it
                raise ServiceError(f"buying payment tokens: {error.details()}", error.code()) from None
            try:
                tokens = request.finalize(list(answer.evaluated), answer.proof, descriptor.token_key)
            except (native.CryptoError, ValueError) as error:
                # Evaluated under another key than the published one (a key kept to mark this
                # router), or garbage: the tokens would identify us, or be worthless.
                raise DataLoss(f"the provider's tokens do not check under its published key: {error}") from None
            bought.extend(inference_pb2.PaymentToken(nonce=n, output=o) for n, o in tokens)
            count -= batch
        log.info("bought payment tokens", provider=peer.node_id[:16], tokens=len(bought))
        return bought
