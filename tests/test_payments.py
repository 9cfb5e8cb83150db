"""Payments in a real swarm with the ledger's chain (relays and the router validating, real
llama.cpp, real sockets): the router buys payment tokens from a provider of another account by
cheque and spends them on requests, the cheques settle on the chain at the next epoch with the
same state on every replica, one's own account is served for free, and what was tried and must
fail: a router whose cheques stop growing is sold no more tokens, a forged, altered, misaddressed
or stale cheque credits nothing, and under ``accept_callers: min_balance`` a caller without
credits (a fresh key) is refused."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest
from grpc import aio

import services.router.wallet as wallet_module
from services.inference.config import ProviderPolicy
from services.router.wallet import BATCH
from swarmserve import native
from swarmserve.chain.cheques import sign_cheque
from swarmserve.client import generate
from swarmserve.v1 import chain_pb2, chain_pb2_grpc, inference_pb2, inference_pb2_grpc
from tests.conftest import MODEL, PROVIDER_CREDITS, PROVIDER_STAKE, ROUTER_CREDITS, Swarm, SwarmFactory

PROMPT = "Name three colours."


async def eventually(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.1)


def replicas(s: Swarm) -> list:  # type: ignore[type-arg]
    nodes = [s.router, *s.relays, *s.inference]
    return [n.chain for n in nodes]


async def test_the_router_buys_tokens_by_cheque_spends_them_and_the_chain_settles_it(swarm: SwarmFactory) -> None:
    async with swarm(relays=3, ledger=True) as s:
        provider, router = s.inference[0], s.router
        provider_key, router_key = provider.keys.identity.public_key, router.keys.identity.public_key
        for prompt in (PROMPT, "Hi"):
            await generate(router.address, prompt, model=MODEL, max_tokens=16)
        # One batch bought by one cheque (32 tokens of 1 credit); each request paid its bound
        # (at most 26 prompt tokens and 16 generated, at 1 and 10 credits per 1k: 1 credit).
        assert router.chain.book.issued(provider_key) == BATCH  # type: ignore[union-attr]
        desk = provider.servicer.service.billing.desk  # type: ignore[union-attr]
        assert desk.spent() == 2
        assert router.service.wallet.held(router.directory.get(provider.keys.identity.node_id)) == BATCH - 2  # type: ignore[union-attr,arg-type]
        inbox = provider.chain.inbox  # type: ignore[union-attr]
        assert inbox.unpaid(router_key) == 0  # the cheque came with the purchase
        state = router.chain.state  # type: ignore[union-attr]
        await eventually(lambda: state.settled(router_key, provider_key)[0] == BATCH, "the cheque settled", 30)
        assert state.account(provider_key).available == PROVIDER_CREDITS + BATCH
        assert state.account(router_key).available == ROUTER_CREDITS - BATCH
        # Every replica, validator or not, holds the same state at the same height.
        height = min(r.state.height for r in replicas(s))  # type: ignore[union-attr]
        assert len({r.state.root_at(height) for r in replicas(s)}) == 1  # type: ignore[union-attr]


async def test_an_operators_own_users_are_served_for_free(swarm: SwarmFactory) -> None:
    async with swarm(relays=3, ledger=True, shared=[["router", "inference0"]]) as s:
        await generate(s.router.address, PROMPT, model=MODEL, max_tokens=8)
        provider_key = s.inference[0].keys.identity.public_key
        assert s.router.chain.book.issued(provider_key) == 0  # type: ignore[union-attr]
        assert s.inference[0].chain.inbox.unpaid(s.router.keys.identity.public_key) == 0  # type: ignore[union-attr]
        account = s.router.chain.state.account(provider_key)  # type: ignore[union-attr]
        assert account.account_key == s.router.keys.identity.public_key
        assert (account.available, account.bonded) == (ROUTER_CREDITS, 0)


async def test_a_router_whose_cheques_stop_is_refused(swarm: SwarmFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    strict = ProviderPolicy(max_concurrent=1, max_queue=4, max_unpaid_credits=3)
    monkeypatch.setattr(wallet_module, "BATCH", 2)
    async with swarm(relays=3, ledger=True, inference=[{"policy": strict}]) as s:
        book = s.router.chain.book  # type: ignore[union-attr]
        honest_pay = book.pay
        first: list[chain_pb2.SignedCheque] = []

        def stale_cheque(payee: bytes, credits: int) -> chain_pb2.SignedCheque:
            if not first:
                first.append(honest_pay(payee, credits))
            return first[0]  # the router's cheques stop growing: it pays nothing more

        monkeypatch.setattr(book, "pay", stale_cheque)
        # Tokens of 1 credit, bought 2 at a time: the first pair is paid; the second is sold on
        # credit (2 unpaid <= 3); the third would leave 4 unpaid and is refused.
        for _ in range(4):
            await generate(s.router.address, "Hi", model=MODEL, max_tokens=16, hops=0)
        with pytest.raises(aio.AioRpcError) as refused:
            await generate(s.router.address, "Hi", model=MODEL, max_tokens=16, hops=0)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "unpaid" in (refused.value.details() or "")
        monkeypatch.setattr(book, "pay", honest_pay)  # cheques grow again: new tokens are paid for
        await generate(s.router.address, "Hi", model=MODEL, max_tokens=16, hops=0)
        inbox = s.inference[0].chain.inbox  # type: ignore[union-attr]
        assert inbox.unpaid(s.router.keys.identity.public_key) == 2  # what it took on credit, still owed


async def test_forged_altered_misaddressed_and_stale_cheques_credit_nothing(swarm: SwarmFactory) -> None:
    async with swarm(relays=3, ledger=True, inference_nodes=2) as s:
        chain_id = s.router.chain.chain_id  # type: ignore[union-attr]
        payee = s.inference[0]
        router = s.router.keys.identity
        good = sign_cheque(router, chain_id, payee.keys.identity.public_key, 10)
        forged = chain_pb2.SignedCheque(cheque=good.cheque, signature=native.Identity.generate().sign(good.cheque))
        altered = chain_pb2.SignedCheque()
        altered.CopyFrom(good)
        body = chain_pb2.Cheque.FromString(altered.cheque)
        body.cumulative_credits = 1000
        altered.cheque = body.SerializeToString()
        elsewhere = sign_cheque(router, chain_id, s.inference[1].keys.identity.public_key, 10)
        foreign = sign_cheque(router, b"\x01" * 32, payee.keys.identity.public_key, 10)
        async with aio.insecure_channel(payee.address) as channel:
            stub = chain_pb2_grpc.ChainStub(channel)
            for cheque, why in (
                (forged, "signature"),
                (altered, "signature"),
                (elsewhere, "another node"),
                (foreign, "another chain"),
            ):
                with pytest.raises(aio.AioRpcError) as refused:
                    await stub.DepositCheque(chain_pb2.DepositChequeRequest(cheque=cheque))
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert why in (refused.value.details() or "")
            assert (await stub.DepositCheque(chain_pb2.DepositChequeRequest(cheque=good))).credited == 10
            assert (await stub.DepositCheque(chain_pb2.DepositChequeRequest(cheque=good))).credited == 0  # replayed
            older = sign_cheque(router, chain_id, payee.keys.identity.public_key, 4)
            assert (await stub.DepositCheque(chain_pb2.DepositChequeRequest(cheque=older))).credited == 0


async def test_a_provider_can_require_a_minimum_caller_balance(swarm: SwarmFactory) -> None:
    strict = ProviderPolicy(max_concurrent=1, max_queue=4, accept_callers="min_balance", min_caller_balance=600)
    async with swarm(relays=3, ledger=True, inference=[{"policy": strict}]) as s:
        provider = s.inference[0]
        await generate(s.router.address, "Hi", model=MODEL, max_tokens=4, hops=0)  # the router holds 1000
        request = inference_pb2.InferenceGenerateRequest(model=MODEL, prompt="Hi")
        request.sampling.max_new_tokens = 2
        async with aio.insecure_channel(provider.address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)

            async def refused(message: inference_pb2.InferenceGenerateRequest, why: str) -> None:
                with pytest.raises(aio.AioRpcError) as error:
                    async for _ in stub.Generate(message):
                        pass
                assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert why in (error.value.details() or "")

            await refused(request, "sign their requests")  # unsigned
            from swarmserve.chain.callers import sign_as_caller

            stranger = native.Identity.generate()  # signed, but a fresh key holds nothing
            signed = inference_pb2.InferenceGenerateRequest()
            signed.CopyFrom(request)
            sign_as_caller(stranger, signed)
            await refused(signed, "holds 0 credits")
        # The router gives away all but 500: now below the minimum, it is refused too.
        router = s.router
        chain = router.chain
        assert chain is not None
        stranger_key = native.Identity.generate().public_key
        transfer = chain_pb2.TransferCredits(recipient_key=stranger_key, credits=500)
        await chain.send(transfer=transfer)
        await eventually(lambda: provider.chain.state.account(router.keys.identity.public_key).available < 600, "paid")  # type: ignore[union-attr]
        with pytest.raises(aio.AioRpcError) as error:
            await generate(s.router.address, "Hi", model=MODEL, max_tokens=4, hops=0)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert provider.chain.state.account(stranger_key).available == 500  # type: ignore[union-attr]
        assert provider.chain.state.account(provider.keys.identity.public_key).bonded == PROVIDER_STAKE  # type: ignore[union-attr]
