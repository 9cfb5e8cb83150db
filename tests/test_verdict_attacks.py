"""Attacks on verdicts through the public interfaces of a real swarm with the ledger's chain (the
review's attack 5): a provider that sends its own (honest) stream to a verifier's
``CheckReceipt`` to collect a PASS gets a signed verdict and nothing on the chain; a FAIL
submitted through ``Chain.Submit`` without the stream, or by a key the lottery did not draw,
is refused and slashes nobody. The control: the same verifier's PASS on a stream another
account (the router) paid for is recorded."""

from __future__ import annotations

import asyncio
import time

from grpc import aio

from services.inference.engine import ChatTurn
from swarmserve import native
from swarmserve.chain import sign_transaction
from swarmserve.chain.evidence import verdict_id
from swarmserve.client import generate
from swarmserve.v1 import chain_pb2, chain_pb2_grpc, common_pb2, verifier_pb2, verifier_pb2_grpc
from swarmserve.verdicts import sign_verdict
from tests.conftest import MODEL, PROVIDER_STAKE, SwarmFactory


async def test_self_requested_checks_and_forged_verdicts_change_nothing(swarm: SwarmFactory) -> None:
    async with swarm(relays=3, ledger=True, inference_nodes=2, dispatch="round-robin") as s:
        router, chain = s.router, s.router.chain
        assert chain is not None
        results = [await generate(router.address, "Name a colour.", model=MODEL, max_tokens=8) for _ in range(2)]
        served = {r.receipt.node_key: r for r in results}  # type: ignore[union-attr]
        provider, verifier = s.inference
        result = served[provider.keys.identity.public_key]
        assert result.summary is not None
        paid_for = result.summary.receipt  # co-signed by the router (another account)
        own = common_pb2.SignedReceipt()
        own.CopyFrom(paid_for)
        del own.cosignatures[:]
        own.cosignatures.add(  # the provider vouching for itself
            signer_key=provider.keys.identity.public_key, signature=provider.keys.identity.sign(own.receipt)
        )

        async def check(receipt: common_pb2.SignedReceipt) -> verifier_pb2.Verdict:
            request = verifier_pb2.CheckReceiptRequest(
                receipt=receipt, token_ids=result.token_ids, token_texts=result.token_texts
            )
            request.chat.messages.add(role=common_pb2.CHAT_ROLE_USER, content="Name a colour.")
            async with aio.insecure_channel(verifier.address) as channel:
                signed = await verifier_pb2_grpc.VerifierStub(channel).CheckReceipt(request, timeout=60)
            return verifier_pb2.Verdict.FromString(signed.verdict)

        # The provider's own stream: a PASS it can show, and nothing on the chain (the verifier
        # submits it, the chain refuses it).
        assert (await check(own)).outcome == verifier_pb2.VERDICT_OUTCOME_PASS
        deadline = time.monotonic() + 20
        while chain.state.account(verifier.keys.identity.public_key).nonce < 1:
            assert time.monotonic() < deadline, "the verifier's transaction was not decided on"
            await asyncio.sleep(0.1)
        # Forged FAILs submitted straight to the chain: by the drawn verifier without the stream,
        # and with the stream by a fresh key nobody drew.
        state = chain.state
        stranger = native.Identity.generate()
        fail = verifier_pb2.Verdict(
            kind=verifier_pb2.VERDICT_KIND_CHECK,
            subject_id=common_pb2.Receipt.FromString(paid_for.receipt).request_id,
            provider_key=provider.keys.identity.public_key,
            outcome=verifier_pb2.VERDICT_OUTCOME_FAIL,
            score=0.0,
        )
        engine = provider.servicer.service.engines[MODEL]  # type: ignore[union-attr]
        prompt_ids = engine.tokenize(engine.apply_chat_template([ChatTurn("user", "Name a colour.")]))
        full = chain_pb2.VerdictEvidence(  # complete and consistent: only the lottery refuses it
            receipt=paid_for, token_ids=result.token_ids, token_texts=result.token_texts, prompt_token_ids=prompt_ids
        )
        epoch = state.epoch_of(state.height)
        forged = [
            (
                verifier.keys.identity,
                chain_pb2.RecordVerdict(
                    verdict=sign_verdict(verifier.keys.identity, fail),
                    evidence=chain_pb2.VerdictEvidence(receipt=paid_for),
                    lottery_epoch=epoch,
                ),
            ),
            (
                stranger,
                chain_pb2.RecordVerdict(verdict=sign_verdict(stranger, fail), evidence=full, lottery_epoch=epoch),
            ),
        ]
        async with aio.insecure_channel(s.relays[0].address) as channel:
            stub = chain_pb2_grpc.ChainStub(channel)
            for identity, record in forged:
                if identity is verifier.keys.identity:  # signed by its node: one signer per key
                    assert verifier.chain is not None
                    raw = verifier.chain.sign(verdict=record)
                else:
                    raw = sign_transaction(identity, chain.chain_id, 1, verdict=record)
                await stub.Submit(
                    chain_pb2.SubmitTransactionRequest(transaction=chain_pb2.SignedTransaction.FromString(raw))
                )
        deadline = time.monotonic() + 20
        while state.account(stranger.public_key).nonce < 1:
            assert time.monotonic() < deadline, "the forged verdicts were not decided on"
            await asyncio.sleep(0.1)
        assert state.verdict(verdict_id(own)) is None
        assert state.account(provider.keys.identity.public_key).bonded == PROVIDER_STAKE
        # The control: the verifier's PASS on the stream the router paid for goes on the chain.
        assert (await check(paid_for)).outcome == verifier_pb2.VERDICT_OUTCOME_PASS
        deadline = time.monotonic() + 60  # submitted, then applied in a block: slow under CI load
        while (record := state.verdict(verdict_id(paid_for))) is None:
            assert time.monotonic() < deadline, "the genuine verdict was not recorded"
            await asyncio.sleep(0.1)
        assert record.status == "passed" and record.verifier == verifier.keys.identity.public_key
        assert state.account(provider.keys.identity.public_key).bonded == PROVIDER_STAKE
