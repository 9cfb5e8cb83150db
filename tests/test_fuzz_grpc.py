"""Fuzzing every gRPC handler of every service (issue 16, "Soak and fuzz").

One small real swarm on loopback, every node its own process (``LocalSwarm``): a router, a relay
and an inference node (emulated engine, so the test is about the handlers, not the model), with
the ledger's chain (the relay and the router validate it). Between them they serve every service
in ``proto/``: Router, Relay (the relay forwards, the inference node terminates), Inference,
Verifier, Chain and Overlay. The methods fuzzed are enumerated from the generated descriptors, so
a new RPC is fuzzed (and must be given its expected errors in ``EXPECTED``) without anyone
remembering to add it.

For every method, on every node that serves it:

- well-formed messages with hostile values (``tests/protofuzz.py``: every field, to a bounded
  depth, with boundary numbers, NaN, empty and oversized strings and bytes, wrong key lengths,
  repeated fields at their limits, unknown enum values), and signed envelopes whose signature
  does verify (cheques, transactions, receipts that commit to their tokens, gossip messages,
  requests signed by a caller of the serving node's own account, onion set-ups a node can open),
  so that the fuzz reaches past the signature checks;
- raw random bytes (and mutated encodings) sent as the request through a generic channel method
  with identity serializers.

Each call must end within its deadline with success or a refusal: a status from the method's
expected set with a clear, non-empty message; never INTERNAL or UNKNOWN (an unhandled
exception). After each method: no engine slot held or queued (``Inference.Status``), no circuit
open on the relay or the inference node (their ``swarmserve_relay_open_circuits`` metric). At the
end: every process alive, the chain still growing, and a normal request served with a receipt
that checks out.

Reproducible by default: the examples are derandomized (the same draws every run; only the
swarm's keys and ports differ), so a CI failure reproduces locally with the same command. About
a minute on 2 cores (40 examples per method and node, 20 of raw bytes). To explore beyond them::

    FUZZ_GRPC_SEED=123 FUZZ_GRPC_EXAMPLES=500 .venv/bin/python -m pytest tests/test_fuzz_grpc.py

(``FUZZ_GRPC_SEED`` picks another random sequence; hypothesis then prints the failing
example and a ``@reproduce_failure`` blob.) The last test prints how each method answered
(``-s`` shows it): how deep the fuzz went, and one message of each refusal.

Each bug the fuzz found has a regression test at the end of this file (all fixed). A bug found
later goes in ``KNOWN_BUGS`` with a strict xfail reproducer until it is fixed: the fuzz then
counts the answers it explains instead of failing on them (an INTERNAL answer is matched by the
traceback its incident id leads to in the node's log).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import pkgutil
import random
import re
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import swarmserve.v1
from services.inference.emulated import EmulatedEngine
from services.inference.servicer import to_chat_turns
from services.relay.circuit import CIRCUIT_READY, pad_message
from swarmserve import native
from swarmserve.chain.callers import sign_as_caller
from swarmserve.chain.cheques import sign_cheque
from swarmserve.client import generate
from swarmserve.keys import NodeKeys
from swarmserve.overlay import open_descriptor
from swarmserve.overlay.descriptors import sign_descriptor
from swarmserve.overlay.packets import leave_message, sign_message
from swarmserve.receipts import ReceiptWriter
from swarmserve.swarm import LocalSwarm, free_port_block
from swarmserve.v1 import (
    chain_pb2,
    common_pb2,
    inference_pb2,
    overlay_pb2,
    relay_pb2,
    router_pb2,
    verifier_pb2,
)
from tests.protofuzz import Hints, MessageFuzzer

MODEL = "emulated-fuzz"
VOCAB = 32_000
CONTEXT = 2048
Code = grpc.StatusCode

# --- what each method may answer ---------------------------------------------------------------

# Any method may refuse a malformed request, and a request over the server's message size (or a
# rate limit) with RESOURCE_EXHAUSTED.
COMMON = {Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}
# Besides COMMON, what each method documents (proto/swarmserve/v1/*.proto) or passes on from the
# node behind it. A new RPC fails test_every_rpc_is_fuzzed until it is given its entry here.
EXPECTED: dict[str, set[Code]] = {
    "/swarmserve.v1.Chain/GetStatus": set(),
    "/swarmserve.v1.Chain/GetBlocks": {Code.NOT_FOUND},
    "/swarmserve.v1.Chain/Submit": {Code.UNAVAILABLE},
    "/swarmserve.v1.Chain/GetAccount": set(),
    "/swarmserve.v1.Chain/DepositCheque": set(),
    "/swarmserve.v1.Inference/Generate": {Code.NOT_FOUND, Code.PERMISSION_DENIED, Code.UNAVAILABLE},
    "/swarmserve.v1.Inference/Score": {Code.NOT_FOUND, Code.FAILED_PRECONDITION},
    "/swarmserve.v1.Inference/Status": set(),
    "/swarmserve.v1.Inference/BuyTokens": {Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION},
    "/swarmserve.v1.Overlay/Exchange": {Code.UNAUTHENTICATED, Code.UNAVAILABLE},
    "/swarmserve.v1.Overlay/Swim": {Code.UNAUTHENTICATED, Code.UNAVAILABLE},
    # FAILED_PRECONDITION: a cell after the hop closed (native.CircuitClosedError, swarmserve/rpc/
    # errors.py), which relay.proto does not list.
    "/swarmserve.v1.Relay/Circuit": {Code.ALREADY_EXISTS, Code.UNAVAILABLE, Code.FAILED_PRECONDITION},
    # A link refuses a malformed frame (INVALID_ARGUMENT, in COMMON); everything else is a DESTROY
    # of one circuit inside it, judged by judge_link.
    "/swarmserve.v1.Relay/Link": set(),
    # PERMISSION_DENIED: the serving node's refusal, passed on (inference.proto lists it).
    "/swarmserve.v1.Router/Generate": {Code.NOT_FOUND, Code.PERMISSION_DENIED, Code.UNAVAILABLE, Code.DATA_LOSS},
    "/swarmserve.v1.Router/ListModels": set(),
    "/swarmserve.v1.Router/GetSwarm": set(),
    # FAILED_PRECONDITION: the verifier's engine cannot replay streams (the emulated one here), not
    # in verifier.proto.
    "/swarmserve.v1.Verifier/CheckReceipt": {Code.NOT_FOUND, Code.PERMISSION_DENIED, Code.FAILED_PRECONDITION},
    "/swarmserve.v1.Verifier/Judge": {Code.NOT_FOUND, Code.PERMISSION_DENIED},
    "/swarmserve.v1.Verifier/GetReputation": set(),
}
# What the inference node may report inside a circuit (a CircuitError): what Inference.Generate may.
CIRCUIT_ERRORS = COMMON | EXPECTED["/swarmserve.v1.Inference/Generate"]

# How long a call may take: a legitimate one needs well under a second here (the emulated engine
# generates at most 512 tokens at 0.5 ms each); the rest is slack for a busy 2-core machine.
UNARY_DEADLINE_S = 10.0
STREAM_DEADLINE_S = 30.0

# Examples per method and node; FUZZ_GRPC_EXAMPLES scales them (see the module docstring).
EXAMPLES = int(os.environ.get("FUZZ_GRPC_EXAMPLES", "40"))
RAW_EXAMPLES = max(1, EXAMPLES // 2)
FUZZ_SEED = os.environ.get("FUZZ_GRPC_SEED")


def fuzz_settings(examples: int) -> Callable[[Any], Any]:
    configured = settings(
        max_examples=examples,
        deadline=None,
        derandomize=FUZZ_SEED is None,
        database=None,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
    if FUZZ_SEED is None:
        return configured
    return lambda test: seed(int(FUZZ_SEED))(configured(test))


# --- the methods in the protos -----------------------------------------------------------------


def proto_methods() -> dict[str, MethodDescriptor]:
    """Every RPC of every service in the generated modules, by its path (/package.Service/Method)."""
    methods = {}
    for module in pkgutil.iter_modules(swarmserve.v1.__path__):
        if module.name.endswith("_pb2"):
            file = importlib.import_module(f"swarmserve.v1.{module.name}").DESCRIPTOR
            for service in file.services_by_name.values():
                for method in service.methods:
                    methods[f"/{service.full_name}/{method.name}"] = method
    return methods


METHODS = proto_methods()


def service_of(path: str) -> str:
    return path.split("/")[1]


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


# --- the swarm ---------------------------------------------------------------------------------

GOSSIP = {
    "SWARMSERVE_GOSSIP__PROBE_INTERVAL_S": "0.2",
    "SWARMSERVE_GOSSIP__PROBE_TIMEOUT_S": "0.1",
    "SWARMSERVE_GOSSIP__SUSPICION_MULT": "3",
    "SWARMSERVE_GOSSIP__SYNC_INTERVAL_S": "2",
}
INFERENCE_ENV = {
    **GOSSIP,
    "SWARMSERVE_MODELS": (
        f"[{{name: {MODEL}, engine: emulated, context_length: {CONTEXT}, "
        f"emulated: {{vocab_size: {VOCAB}, decode_us_per_token: 500, prefill_us_per_token: 20}}}}]"
    ),
    "SWARMSERVE_POLICY__MAX_QUEUE": "4",
}
# One relay: circuits of one hop (the fuzz asks for more, and is refused).
# No circuit pool: after each RPC the relay and the node must hold no circuit at all (the pool's
# circuits, open by design, would hide a request's leaked one; test_circuit_pool.py tests it).
ROUTER_ENV = {**GOSSIP, "SWARMSERVE_DEFAULT_HOPS": "1", "SWARMSERVE_CIRCUIT_POOL__ENABLED": "false"}


@dataclass
class Node:
    name: str
    address: str
    services: set[str]
    identity_key: bytes = b""
    onion_key: bytes = b""
    channel: grpc.Channel | None = None
    log: Path | None = None  # its JSON log, where an INTERNAL's incident id leads to the traceback

    def __repr__(self) -> str:  # what hypothesis prints of a failing example
        return self.name


@dataclass
class FuzzSwarm:
    swarm: LocalSwarm
    nodes: dict[str, Node]
    chain_id: bytes
    weights_digest: bytes
    router_identity: native.Identity  # signs requests as a caller of the inference node's own account
    inference_identity: native.Identity  # signs receipts its verifier must refuse to check
    fuzzers: dict[str, MessageFuzzer] = field(default_factory=dict)  # by target node
    engine: EmulatedEngine = field(
        default_factory=lambda: EmulatedEngine(MODEL, vocab_size=VOCAB, context_length=CONTEXT)
    )

    def hosts(self, path: str) -> list[Node]:
        return [n for n in self.nodes.values() if service_of(path) in n.services]

    @property
    def inference(self) -> Node:
        return self.nodes["inference-1"]


def _channel(address: str) -> grpc.Channel:
    # Larger than the servers' 16 MiB limit: an oversized request must be refused by the server.
    limit = 64 * 1024 * 1024
    return grpc.insecure_channel(
        address, options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    )


def _reflected_services(channel: grpc.Channel) -> set[str]:
    """The services a node serves, as its reflection service lists them."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = stub.ServerReflectionInfo(iter([request]), timeout=10, wait_for_ready=True)
    return {s.name for reply in replies for s in reply.list_services_response.service}


def _unary(node: Node, path: str, request: Message, reply: type[Message]) -> Any:
    assert node.channel is not None
    return node.channel.unary_unary(path, request_serializer=None, response_deserializer=reply.FromString)(
        request.SerializeToString(), timeout=5
    )


@pytest.fixture(scope="module")
def fuzz_swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzSwarm]:
    data_dir = tmp_path_factory.mktemp("fuzz-swarm")
    swarm = LocalSwarm(
        data_dir,
        # Away from the block other tests start at (23000), should they run at the same time.
        ports_from=free_port_block(96, start=random.randrange(30_000, 38_000)),
        relays=1,
        inference_nodes=1,
        node_env={"router-1": ROUTER_ENV, "relay-1": GOSSIP, "inference-1": INFERENCE_ENV},
    )
    asyncio.run(swarm.start(timeout_s=120))
    nodes: dict[str, Node] = {}
    try:
        for spec in [*swarm.routers, *swarm.relays, *swarm.inference]:
            channel = _channel(spec.listen)
            log = data_dir / "logs" / f"{spec.name}.log"
            nodes[spec.name] = Node(spec.name, spec.listen, _reflected_services(channel), channel=channel, log=log)
        router = nodes["router-1"]
        members = _unary(
            router, "/swarmserve.v1.Router/GetSwarm", router_pb2.GetSwarmRequest(), router_pb2.GetSwarmResponse
        )
        by_address = {n.address: n for n in nodes.values()}
        for member in members.members:
            descriptor = open_descriptor(member.descriptor)
            if descriptor.address in by_address:
                by_address[descriptor.address].identity_key = descriptor.identity_key
                by_address[descriptor.address].onion_key = descriptor.onion_key
        status = _unary(
            router,
            "/swarmserve.v1.Chain/GetStatus",
            chain_pb2.GetChainStatusRequest(),
            chain_pb2.GetChainStatusResponse,
        )
        inference = _unary(
            nodes["inference-1"],
            "/swarmserve.v1.Inference/Status",
            inference_pb2.StatusRequest(),
            inference_pb2.StatusResponse,
        )
        nodes["inference-1"].identity_key = inference.identity_key
        router_identity = NodeKeys.load_or_create(data_dir / "router-1").identity
        nodes["router-1"].identity_key = router_identity.public_key
        inference_identity = NodeKeys.load_or_create(data_dir / "inference-1").identity
        fuzz = FuzzSwarm(
            swarm, nodes, status.chain_id, inference.models[0].weights_digest, router_identity, inference_identity
        )
        fuzz.fuzzers = {name: MessageFuzzer(hints_for(fuzz, swarm, node)) for name, node in nodes.items()}
        yield fuzz
    finally:
        for node in nodes.values():
            if node.channel is not None:
                node.channel.close()
        asyncio.run(swarm.stop())


# --- what the fuzzer knows, and the signed envelopes ------------------------------------------


def identities() -> st.SearchStrategy[native.Identity]:
    """Fresh identities, derived from drawn seeds (so derandomized runs repeat them)."""
    return st.binary(min_size=32, max_size=32).map(native.Identity.from_seed)


def hints_for(fuzz: FuzzSwarm, swarm: LocalSwarm, target: Node) -> Hints:
    """What the fuzzer knows when it calls ``target`` (cheques are made out to it)."""
    keys = [n.identity_key for n in fuzz.nodes.values() if n.identity_key]
    keys += [swarm.identity_key(operator) for operator in swarm.operators]
    onion = [n.onion_key for n in fuzz.nodes.values() if n.onion_key]
    hints = Hints(
        # No member's address: a stranger's descriptor claiming one stays alive for good (a known
        # bug, test_a_stranger_cannot_take_a_members_address), and would make the end check flaky.
        strings=[MODEL, "smollm2-135m-instruct", "127.0.0.1:9"],
        blobs=[*keys, *onion, fuzz.chain_id, fuzz.weights_digest, bytes(32), bytes(64)],
        integers=[VOCAB - 1, VOCAB, VOCAB + 1, CONTEXT - 1, CONTEXT, CONTEXT + 1, 512, 513, 1536, 1537, 256, 257],
        limits={
            "stop": 8,
            "blinded": native.TOKEN_BATCH_MAX,
            "updates": 64,
            "known": 16_384,
            "messages": 64,
            "token_ids": CONTEXT,
            "token_texts": CONTEXT,
            "prompt_token_ids": CONTEXT,
            "completion_token_ids": CONTEXT,
            "prefix_token_ids": CONTEXT,
            "resume_token_ids": 512,
            "provider_keys": 256,
            "tokens": 64,
            "visited": 16,
            "cheques": 64,
            "cosignatures": 16,
            "votes": 16,
        },
    )
    node_keys = [n.identity_key for n in fuzz.nodes.values() if n.identity_key]
    hints.fields = {
        "model": [MODEL],
        "prompt": ["Name three rivers.", "a b c"],
        "content": ["Hello there.", "a b"],
        "role": [common_pb2.CHAT_ROLE_SYSTEM, common_pb2.CHAT_ROLE_USER, common_pb2.CHAT_ROLE_ASSISTANT],
        "max_new_tokens": [1, 4, 16],
        "temperature": [0.0, 0.7],
        "top_p": [0.0, 0.9],
        "top_k": [0, 40],
        "repetition_penalty": [0.0, 1.1],
        "hops": [0, 1],
        "request_id": ["", "fuzz-request"],
        "token_ids": [1, 2, 300],
        "prompt_token_ids": [1, 2, 300],
        "completion_token_ids": [1, 2, 300],
        "top_alternatives": [0, 3],
        "from_height": [0, 1, 2],
        "limit": [0, 1, 64],
        "chain_id": [fuzz.chain_id],
        "expected_weights_digest": [fuzz.weights_digest],
        "weights_digest": [fuzz.weights_digest],
        "payee_key": [target.identity_key],
        "address": ["127.0.0.1:9", "127.0.0.1:0"],  # nobody listens there
        **{name: node_keys for name in ("account_key", "recipient_key", "provider_keys", "probe_target")},
    }
    sampling = common_pb2.SamplingParams(max_new_tokens=8)
    chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content="Hi")])
    hints.valid = {
        "swarmserve.v1.GenerateRequest": [
            router_pb2.GenerateRequest(model=MODEL, prompt="Name three rivers.", sampling=sampling),
            router_pb2.GenerateRequest(
                model=MODEL, chat=chat, sampling=sampling, privacy=router_pb2.PrivacyOptions(hops=0)
            ),
        ],
        "swarmserve.v1.InferenceGenerateRequest": [
            inference_pb2.InferenceGenerateRequest(model=MODEL, prompt="Name three rivers.", sampling=sampling),
            inference_pb2.InferenceGenerateRequest(
                model=MODEL, prompt_tokens=inference_pb2.PromptTokens(token_ids=[1, 2, 3]), sampling=sampling
            ),
        ],
        "swarmserve.v1.ScoreRequest": [
            inference_pb2.ScoreRequest(
                model=MODEL, prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5], top_alternatives=2
            )
        ],
        "swarmserve.v1.GetBlocksRequest": [chain_pb2.GetBlocksRequest(from_height=1, limit=4)],
        "swarmserve.v1.GetAccountRequest": [chain_pb2.GetAccountRequest(account_key=target.identity_key)],
        "swarmserve.v1.GetReputationRequest": [verifier_pb2.GetReputationRequest(provider_keys=node_keys)],
        "swarmserve.v1.SamplingParams": [sampling],
        "swarmserve.v1.ChatMessages": [chat],
    }
    hints.overrides.update(envelopes(fuzz))
    return hints


def envelopes(fuzz: FuzzSwarm) -> dict[str, Callable[[MessageFuzzer, int], st.SearchStrategy[Message]]]:
    """Strategies for messages whose signature must verify before the server looks further."""
    node_keys = [n.identity_key for n in fuzz.nodes.values() if n.identity_key]
    chains = st.sampled_from([fuzz.chain_id, fuzz.chain_id, b"", bytes(32)])
    # Receipts commit to a 32-byte digest (the hash chain refuses others; SignedReceipt's generic
    # strategy covers wrong lengths): the served model's, or one nobody serves.
    digests = st.sampled_from([fuzz.weights_digest, fuzz.weights_digest, bytes(32)])

    def cheque(fz: MessageFuzzer, depth: int) -> st.SearchStrategy[Message]:
        return st.builds(
            lambda who, chain, payee, credits: sign_cheque(who, chain, payee, credits),
            identities(),
            chains,
            st.one_of(
                st.sampled_from(list(fz.hints.fields["payee_key"])), st.sampled_from(node_keys), fz.blobs(small=True)
            ),
            fz.integers(chain_pb2.Cheque.DESCRIPTOR.fields_by_name["cumulative_credits"].type),
        )

    def transaction(fz: MessageFuzzer, depth: int) -> st.SearchStrategy[Message]:
        def sign(who: native.Identity, body: chain_pb2.TransactionBody, chain: bytes, nonce: int | None) -> Message:
            body.account_key, body.chain_id = who.public_key, chain
            if nonce is not None:
                body.nonce = nonce
            raw = body.SerializeToString()
            return chain_pb2.SignedTransaction(body=raw, signature=who.sign(raw))

        return st.builds(
            sign,
            identities(),
            fz.generic(chain_pb2.TransactionBody.DESCRIPTOR, depth + 1),
            chains,
            st.one_of(st.none(), st.sampled_from([1, 2])),
        )

    def receipt(
        who: native.Identity,
        request_id: str,
        digest: bytes,
        prompt: Sequence[int],
        sampling: common_pb2.SamplingParams,
        prefix: Sequence[int],
        tokens: Sequence[tuple[int, bytes]],
        finish: int,
    ) -> common_pb2.SignedReceipt:
        """A receipt that commits to exactly ``tokens``, signed by ``who``."""
        writer = ReceiptWriter(who, request_id, digest, prompt, sampling, prefix)
        for token_id, text in tokens:
            writer.add(token_id, text)
        return writer.sign(finish, common_pb2.Timing())

    def token_ids(fz: MessageFuzzer) -> st.SearchStrategy[list[int]]:
        return st.lists(
            st.one_of(
                st.integers(0, VOCAB - 1),
                fz.integers(inference_pb2.PromptTokens.DESCRIPTOR.fields_by_name["token_ids"].type),
            ),
            max_size=6,
        )

    def tokens(fz: MessageFuzzer) -> st.SearchStrategy[list[tuple[int, bytes]]]:
        return st.lists(st.tuples(st.integers(0, VOCAB + 1), st.binary(max_size=8)), max_size=6)

    def signed_receipt(fz: MessageFuzzer, depth: int) -> st.SearchStrategy[Message]:
        return st.builds(
            receipt,
            identities(),
            fz.strings(small=True),
            digests,
            token_ids(fz),
            fz.generic(common_pb2.SamplingParams.DESCRIPTOR, depth + 1),
            token_ids(fz),
            tokens(fz),
            st.sampled_from(list(common_pb2.FinishReason.values())),
        )

    def prompt_of(text: str | None, chat: common_pb2.ChatMessages | None) -> list[int]:
        engine = fuzz.engine
        if chat is not None:
            return engine.tokenize(engine.apply_chat_template(to_chat_turns(chat)))
        return engine.tokenize(text or "")

    def check_request(fz: MessageFuzzer, depth: int) -> st.SearchStrategy[Message]:
        """A receipt that checks out against the tokens sent with it (by a stranger, or the
        verifier's own key), and the prompt as ids, text or chat."""

        def build(
            who: native.Identity,
            own: bool,
            request_id: str,
            digest: bytes,
            sampling: common_pb2.SamplingParams,
            prefix: list[int],
            served: list[tuple[int, bytes]],
            text: str,
            chat: common_pb2.ChatMessages | None,
            ids: list[int] | None,
            finish: int,
        ) -> Message:
            if own:  # the verifier's own stream: it must refuse to check it
                who = fuzz.inference_identity
            prompt = ids if ids is not None else prompt_of(text, chat)
            signed = receipt(who, request_id, digest, prompt, sampling, prefix, served, finish)
            request = verifier_pb2.CheckReceiptRequest(
                receipt=signed,
                token_ids=[t for t, _ in served],
                token_texts=[x for _, x in served],
                prefix_token_ids=prefix,
            )
            if ids is not None:
                request.prompt_token_ids.extend(ids)
            elif chat is not None:
                request.chat.CopyFrom(chat)
            else:
                request.prompt = text
            return request

        return st.builds(
            build,
            identities(),
            st.booleans(),
            fz.strings(small=True),
            digests,
            fz.generic(common_pb2.SamplingParams.DESCRIPTOR, depth + 1),
            token_ids(fz),
            tokens(fz),
            fz.strings(small=True),
            st.one_of(st.none(), fz.generic(common_pb2.ChatMessages.DESCRIPTOR, depth + 1)),
            st.one_of(st.none(), token_ids(fz)),
            st.sampled_from(list(common_pb2.FinishReason.values())),
        )

    def judge_request(fz: MessageFuzzer, depth: int) -> st.SearchStrategy[Message]:
        """Two answers to one prompt, each with a receipt that commits to it (by two strangers,
        or one twice), and the prompt as the judge will tokenize it."""

        def build(
            first: native.Identity,
            second: native.Identity,
            same: bool,
            duel_id: str,
            digest: bytes,
            sampling: common_pb2.SamplingParams,
            text: str,
            chat: common_pb2.ChatMessages | None,
            answers: tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]],
        ) -> Message:
            prompt = prompt_of(text, chat)
            request = verifier_pb2.JudgeRequest(duel_id=duel_id)
            for side, who, served in zip(
                (request.first, request.second), (first, first if same else second), answers, strict=True
            ):
                side.receipt.CopyFrom(
                    receipt(who, duel_id, digest, prompt, sampling, (), served, common_pb2.FINISH_REASON_LENGTH)
                )
                side.token_ids.extend(t for t, _ in served)
                side.token_texts.extend(x for _, x in served)
            if chat is not None:
                request.chat.CopyFrom(chat)
            else:
                request.prompt = text
            return request

        return st.builds(
            build,
            identities(),
            identities(),
            st.booleans(),
            fz.strings(small=True),
            digests,
            fz.generic(common_pb2.SamplingParams.DESCRIPTOR, depth + 1),
            st.one_of(st.sampled_from(["Name three rivers.", "a b c d"]), fz.strings(small=True)),
            st.one_of(st.none(), fz.generic(common_pb2.ChatMessages.DESCRIPTOR, depth + 1)),
            st.tuples(tokens(fz), tokens(fz)),
        )

    def descriptor(fz: MessageFuzzer, depth: int) -> st.SearchStrategy[tuple[native.Identity, Message]]:
        """A node descriptor signed by a stranger, issued about now (or too far from now)."""

        def sign(
            who: native.Identity, body: common_pb2.NodeDescriptor, skew_ms: int | None, address: str | None
        ) -> Any:
            body.identity_key = who.public_key
            if skew_ms is not None:
                body.issued_unix_ms = max(0, int(time.time() * 1000) + skew_ms)
            if address is not None:
                body.address = address
            return who, sign_descriptor(who, body)

        return st.builds(
            sign,
            identities(),
            fz.generic(common_pb2.NodeDescriptor.DESCRIPTOR, depth + 1),
            st.one_of(st.none(), st.sampled_from([0, 0, 0, -59_000, 61_000, -61_000])),
            st.one_of(st.none(), st.just("127.0.0.1:9")),
        )

    def gossip(kind: type[Message]) -> Callable[[MessageFuzzer, int], st.SearchStrategy[Message]]:
        """A gossip message from a stranger with a valid descriptor, signed by it."""

        def strategy(fz: MessageFuzzer, depth: int) -> st.SearchStrategy[Message]:
            def sign(sender: tuple[native.Identity, common_pb2.SignedDescriptor], message: Any) -> Message:
                who, signed = sender
                message.sender.CopyFrom(signed)
                return sign_message(who, message)

            return st.builds(sign, descriptor(fz, depth), fz.generic(kind.DESCRIPTOR, depth))

        return strategy

    def caller_signed(fz: MessageFuzzer, depth: int) -> st.SearchStrategy[Message]:
        """A request signed by the router, a caller of the inference node's own account: it is
        served free, so it reaches the engine."""

        def sign(request: inference_pb2.InferenceGenerateRequest, model: bool) -> Message:
            if model:
                request.model = MODEL
            sign_as_caller(fuzz.router_identity, request)
            return request

        return st.builds(sign, fz.unsigned(inference_pb2.InferenceGenerateRequest.DESCRIPTOR, depth), st.booleans())

    return {
        "swarmserve.v1.SignedCheque": cheque,
        "swarmserve.v1.SignedTransaction": transaction,
        "swarmserve.v1.SignedReceipt": signed_receipt,
        "swarmserve.v1.CheckReceiptRequest": check_request,
        "swarmserve.v1.JudgeRequest": judge_request,
        "swarmserve.v1.SignedDescriptor": lambda fz, depth: descriptor(fz, depth).map(lambda pair: pair[1]),
        "swarmserve.v1.SwimPacket": gossip(overlay_pb2.SwimPacket),
        "swarmserve.v1.ExchangeRequest": gossip(overlay_pb2.ExchangeRequest),
        "swarmserve.v1.InferenceGenerateRequest": caller_signed,
    }


# --- circuits ---------------------------------------------------------------------------------


@dataclass
class CellStream:
    """What a Relay.Circuit call sends; ``circuit`` when the set-up is one the node can open,
    to read what comes back inside it."""

    cells: list[relay_pb2.RelayCell]
    circuit: native.Circuit | None = None
    replayed: bool = False  # sent again on a second call: the set-up must be refused as a replay

    def __repr__(self) -> str:  # what hypothesis prints for a failing example
        kinds = [c.WhichOneof("cell") for c in self.cells]
        return f"CellStream(cells={kinds}, valid_setup={self.circuit is not None}, replayed={self.replayed}, sent={self.cells!r})"


def cell_streams(fuzz: FuzzSwarm, target: Node) -> st.SearchStrategy[CellStream]:
    fz = fuzz.fuzzers[target.name]
    relay, inference = fuzz.nodes["relay-1"], fuzz.inference
    # Paths through the target that it can open (the rest of the path real or not).
    paths: list[list[tuple[bytes, bytes]]] = []
    if target is relay:
        paths += [
            [(relay.onion_key, inference.address.encode()), (inference.onion_key, b"")],
            [(relay.onion_key, b"")],  # a relay is no exit
            [(relay.onion_key, b"127.0.0.1:9"), (inference.onion_key, b"")],  # no member there
            [(relay.onion_key, b"not an address")],
            [
                (relay.onion_key, relay.address.encode()),
                (relay.onion_key, inference.address.encode()),
                (inference.onion_key, b""),
            ],
        ]
    if target is inference:
        paths += [
            [(inference.onion_key, b"")],
            [(inference.onion_key, relay.address.encode()), (relay.onion_key, b"")],  # an exit does not forward
        ]

    def build(
        path: list[tuple[bytes, bytes]],
        messages: list[relay_pb2.CircuitMessage | bytes],
        tail: list[relay_pb2.RelayCell],
        twice: str,
    ) -> CellStream:
        onion, circuit = native.Circuit.build(path)
        cells = [relay_pb2.RelayCell(create=relay_pb2.CreateCircuit(onion=onion))]
        for message in messages:
            payload = (
                circuit.wrap_forward(pad_message(message)) if isinstance(message, relay_pb2.CircuitMessage) else message
            )
            cells.append(relay_pb2.RelayCell(data=relay_pb2.DataCell(payload=payload)))
        cells += tail
        if twice == "in the stream":  # a second set-up on an open circuit
            cells.insert(1, cells[0])
        return CellStream(cells, circuit, replayed=twice == "on a second call")

    inner = st.one_of(
        fz.messages(relay_pb2.CircuitMessage.DESCRIPTOR, 1),
        fz.messages(inference_pb2.InferenceGenerateRequest.DESCRIPTOR, 2).map(
            lambda r: relay_pb2.CircuitMessage(request=r)
        ),
        fz.blobs(small=True),
    )
    valid = st.builds(
        build,
        st.sampled_from(paths),
        st.lists(inner, max_size=2),
        st.lists(fz.messages(relay_pb2.RelayCell.DESCRIPTOR, 1, small=True), max_size=1),
        st.sampled_from(["no", "no", "in the stream", "on a second call"]),
    )
    junk = st.lists(fz.messages(relay_pb2.RelayCell.DESCRIPTOR), max_size=4).map(CellStream)
    return st.one_of(junk, valid)


LINK_KINDS = {"create": 1, "created": 2, "data": 3, "destroy": 4}
LINK_LINGER_S = 0.5  # a link stays open this long after its last frame, for the answers to come


def link_cell(circuit: int, kind: int, payload: bytes = b"", reason: int = 0) -> bytes:
    return circuit.to_bytes(4, "big") + bytes([kind, reason]) + len(payload).to_bytes(4, "big") + payload


def link_cells(frame: bytes) -> list[tuple[int, int, int, bytes]]:
    """(circuit, kind, reason, payload) of each cell of a well-formed frame."""
    cells, at = [], 0
    while at < len(frame):
        length = int.from_bytes(frame[at + 6 : at + 10], "big")
        cells.append(
            (int.from_bytes(frame[at : at + 4], "big"), frame[at + 4], frame[at + 5], frame[at + 10 : at + 10 + length])
        )
        at += 10 + length
    return cells


@dataclass
class LinkStream:
    """What a Relay.Link call sends: a circuit's cells (those of a :class:`CellStream`) as link
    cells of one circuit id, in one frame or one frame each, or junk frames."""

    frames: list[bytes]
    circuit_id: int = 1
    cells: CellStream | None = None

    def __repr__(self) -> str:
        return (
            f"LinkStream(frames={[f[:24] for f in self.frames]!r}, circuit_id={self.circuit_id}, cells={self.cells!r})"
        )


def as_link(stream: CellStream, circuit_id: int, one_frame: bool) -> LinkStream:
    cells = []
    for cell in stream.cells:
        kind = cell.WhichOneof("cell")
        if kind == "create":
            cells.append(link_cell(circuit_id, LINK_KINDS[kind], cell.create.onion))
        elif kind == "created":
            cells.append(link_cell(circuit_id, LINK_KINDS[kind], cell.created.confirmation))
        elif kind == "data":
            cells.append(link_cell(circuit_id, LINK_KINDS[kind], cell.data.payload))
        elif kind == "destroy":
            cells.append(link_cell(circuit_id, LINK_KINDS[kind], reason=cell.destroy.reason & 0xFF))
    return LinkStream([b"".join(cells)] if one_frame else cells, circuit_id, stream)


def link_streams(fuzz: FuzzSwarm, target: Node) -> st.SearchStrategy[LinkStream]:
    circuit_ids = st.sampled_from([0, 1, 2**32 - 1])
    built = st.builds(as_link, cell_streams(fuzz, target), circuit_ids, st.booleans())
    junk = st.lists(st.binary(max_size=64), min_size=1, max_size=3).map(LinkStream)
    return st.one_of(built, built, junk)


# --- calling and judging -----------------------------------------------------------------------


@dataclass
class Outcome:
    code: Code
    details: str
    replies: list[bytes]
    seconds: float


def call(node: Node, path: str, payload: bytes | Sequence[bytes]) -> Outcome:
    """One call with the request (or the cells) as raw bytes; never raises for a status."""
    method = METHODS[path]
    assert node.channel is not None
    deadline = STREAM_DEADLINE_S if method.server_streaming or method.client_streaming else UNARY_DEADLINE_S
    started = time.monotonic()
    replies: list[bytes] = []
    try:
        if method.client_streaming:
            assert not isinstance(payload, bytes)
            stream = node.channel.stream_stream(path, request_serializer=None, response_deserializer=None)
            requests = list(payload)

            def lingering() -> Iterator[bytes]:
                yield from requests
                if path == "/swarmserve.v1.Relay/Link":  # a link's end ends its circuits
                    time.sleep(LINK_LINGER_S)

            replies.extend(stream(lingering(), timeout=deadline))
        elif method.server_streaming:
            assert isinstance(payload, bytes)
            stream = node.channel.unary_stream(path, request_serializer=None, response_deserializer=None)
            replies.extend(stream(payload, timeout=deadline))
        else:
            assert isinstance(payload, bytes)
            replies.append(
                node.channel.unary_unary(path, request_serializer=None, response_deserializer=None)(
                    payload, timeout=deadline
                )
            )
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "", replies, time.monotonic() - started)  # type: ignore[attr-defined]
    return Outcome(Code.OK, "", replies, time.monotonic() - started)


def incident(node: Node, details: str) -> str:
    """The traceback the node logged for an INTERNAL answer ("internal error (incident ID)")."""
    found = re.search(r"incident ([0-9a-f]+)", details)
    if found is None or node.log is None:
        return ""
    deadline = time.monotonic() + 3  # the line may still be on its way to the file
    while time.monotonic() < deadline:
        for line in node.log.read_text(errors="replace").splitlines():
            if found.group(1) in line and line.startswith("{"):
                return str(json.loads(line).get("exception", line))
        time.sleep(0.1)
    return f"(incident {found.group(1)} not found in {node.log})"


@dataclass(frozen=True)
class KnownBug:
    """A bug the fuzz found in code this test does not own, pinned by an xfail test
    (``reproducer``; strict, so it fails as XPASS once the bug is fixed: then this entry goes).
    Until then the fuzz counts the answers it explains (SEEN) instead of failing on them."""

    name: str
    reproducer: str
    explains: Callable[[str, Outcome, str], bool]  # (the method, its outcome, the incident's traceback)


KNOWN_BUGS: list[KnownBug] = []  # none open: each fixed one's reproducer below is now a regression test


def known_bug(node: Node, path: str, outcome: Outcome) -> KnownBug | None:
    trace = incident(node, outcome.details).strip() if outcome.code is Code.INTERNAL else ""
    return next((bug for bug in KNOWN_BUGS if bug.explains(path, outcome, trace)), None)


def assert_clear_refusal(node: Node, code: Code, details: str, allowed: set[Code], where: str) -> None:
    assert code not in (Code.INTERNAL, Code.UNKNOWN), (
        f"{where}: unhandled error: {code.name} {details!r}\n{incident(node, details)}"
    )
    assert code is not Code.DEADLINE_EXCEEDED, f"{where}: no answer within the deadline (a hang)"
    assert code in allowed, (
        f"{where}: {code.name} is not an expected refusal ({sorted(c.name for c in allowed)}): {details!r}"
    )
    text = details.strip()
    assert text, f"{where}: {code.name} with an empty message"
    assert "Traceback" not in text and "internal error" not in text, (
        f"{where}: {code.name} leaks internals: {details!r}"
    )


# What the calls got, by method and status (printed at the end: how deep the fuzz went).
SEEN: dict[str, Counter[str]] = defaultdict(Counter)
SAMPLES: dict[tuple[str, str], str] = {}  # one message per (method, refusal), to read what was refused


def judge(node: Node, path: str, outcome: Outcome, stream: CellStream | LinkStream | None = None) -> None:
    """Success with replies of the right type, or a clear refusal from the expected set (or an
    answer a KNOWN_BUGS entry explains)."""
    method = METHODS[path]
    where = f"{path} on {node.name}"
    if outcome.code is not Code.OK and (bug := known_bug(node, path, outcome)) is not None:
        SEEN[path][f"known bug ({bug.reproducer})"] += 1
        return
    SEEN[path][outcome.code.name] += 1
    SAMPLES.setdefault((path, outcome.code.name), outcome.details[:200])
    if outcome.code is not Code.OK:
        assert_clear_refusal(node, outcome.code, outcome.details, COMMON | EXPECTED[path], where)
    reply_class = message_class(method.output_type)
    replies = []
    for raw in outcome.replies:
        try:
            replies.append(reply_class.FromString(raw))
        except DecodeError as error:  # pragma: no cover - a server bug
            raise AssertionError(f"{where}: a reply does not parse as {reply_class.__name__}: {error}") from None
    if outcome.code is Code.OK and path in ("/swarmserve.v1.Router/Generate", "/swarmserve.v1.Inference/Generate"):
        assert replies and replies[-1].HasField("summary"), f"{where}: the stream ended without its summary"
    if isinstance(stream, LinkStream):
        judge_link(node, where, stream, replies)
    elif stream is not None and stream.circuit is not None:
        judge_circuit(node, where, stream.circuit, replies)


def judge_circuit(node: Node, where: str, circuit: native.Circuit, cells: list[relay_pb2.RelayCell]) -> None:
    """What came back inside a circuit the node opened: the confirmation, answers, or an error
    with an expected code and a clear message; teardowns with a defined reason."""
    for cell in cells:
        kind = cell.WhichOneof("cell")
        if kind == "created":
            assert circuit.unwrap_backward(cell.created.confirmation) == CIRCUIT_READY, f"{where}: bad confirmation"
        elif kind == "data":
            message = relay_pb2.CircuitMessage.FromString(circuit.unwrap_backward(cell.data.payload))
            SEEN["(inside circuits)"][message.WhichOneof("body") or "empty"] += 1
            if message.WhichOneof("body") == "error":
                SEEN["(inside circuits)"][f"error {message.error.code}"] += 1
                code = next((c for c in Code if c.value[0] == message.error.code), None)
                assert code is not None, f"{where}: the circuit reported an undefined code {message.error.code}"
                assert_clear_refusal(node, code, message.error.message, CIRCUIT_ERRORS, f"{where} (inside the circuit)")
        elif kind == "destroy":
            assert cell.destroy.reason in relay_pb2.DestroyReason.values(), (
                f"{where}: undefined teardown {cell.destroy}"
            )
            assert cell.destroy.reason != relay_pb2.DESTROY_REASON_UNSPECIFIED, f"{where}: teardown without a reason"


def judge_link(node: Node, where: str, stream: LinkStream, frames: list[relay_pb2.LinkFrame]) -> None:
    """A link's answers: well-formed frames of whole cells, for the circuit id sent; inside a
    circuit the node opened, what :func:`judge_circuit` allows."""
    cells = []
    for frame in frames:
        for circuit_id, kind, reason, payload in link_cells(frame.cells):
            assert circuit_id == stream.circuit_id, f"{where}: a cell for circuit {circuit_id}, never set up"
            if kind == LINK_KINDS["created"]:
                cells.append(relay_pb2.RelayCell(created=relay_pb2.CircuitCreated(confirmation=payload)))
            elif kind == LINK_KINDS["data"]:
                cells.append(relay_pb2.RelayCell(data=relay_pb2.DataCell(payload=payload)))
            else:
                assert kind == LINK_KINDS["destroy"], f"{where}: the node sent a cell of kind {kind}"
                cells.append(relay_pb2.RelayCell(destroy=relay_pb2.DestroyCircuit(reason=reason)))  # type: ignore[arg-type]
    circuit = stream.cells.circuit if stream.cells is not None else None
    if circuit is not None:
        judge_circuit(node, where, circuit, cells)
        return
    for cell in cells:  # a set-up the node cannot open: refused, nothing else
        assert cell.WhichOneof("cell") == "destroy", f"{where}: {cell.WhichOneof('cell')} for a set-up it cannot open"
        assert cell.destroy.reason in relay_pb2.DestroyReason.values(), f"{where}: undefined teardown {cell.destroy}"
        assert cell.destroy.reason != relay_pb2.DESTROY_REASON_UNSPECIFIED, f"{where}: teardown without a reason"


# --- after each method: nothing held --------------------------------------------------------------


def open_circuits(metrics_address: str) -> float:
    with urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=5) as response:
        text = response.read().decode()
    match = re.search(r"^swarmserve_relay_open_circuits(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE)
    assert match, f"no swarmserve_relay_open_circuits at {metrics_address}"
    return float(match.group(1))


def held(fuzz: FuzzSwarm) -> dict[str, float]:
    """Engine slots running or queued on the inference node, and circuits open on the relay
    and the inference node (an exit holds its circuits too): all zero when nothing is in flight."""
    status = _unary(
        fuzz.inference, "/swarmserve.v1.Inference/Status", inference_pb2.StatusRequest(), inference_pb2.StatusResponse
    )
    found = {"inference running": float(status.load.running), "inference queued": float(status.load.queued)}
    for name, address in fuzz.swarm.metrics.items():
        found[f"{name} open circuits"] = open_circuits(address)
    return found


def assert_nothing_held(fuzz: FuzzSwarm, after: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while any((found := held(fuzz)).values()):
        assert time.monotonic() < deadline, f"after {after}, still held {timeout_s:.0f} s later: {found}"
        time.sleep(0.2)


def assert_alive(fuzz: FuzzSwarm) -> None:
    exited = {name: code for name, code in fuzz.swarm.exit_codes().items() if code is not None}
    assert not exited, f"nodes exited: {exited} (logs in {fuzz.swarm.data_dir / 'logs'})"


# --- the tests ----------------------------------------------------------------------------------

PATHS = sorted(METHODS)
IDS = [p.split(".v1.")[1] for p in PATHS]


def test_every_rpc_is_fuzzed(fuzz_swarm: FuzzSwarm) -> None:
    """The methods fuzzed (enumerated from the generated descriptors) are exactly those with an
    expected-error entry, and each is served by some node of the swarm under test."""
    assert set(METHODS) == set(EXPECTED), (
        f"RPCs without an EXPECTED entry: {sorted(set(METHODS) - set(EXPECTED))}; "
        f"entries for no RPC: {sorted(set(EXPECTED) - set(METHODS))}"
    )
    unserved = [path for path in METHODS if not fuzz_swarm.hosts(path)]
    assert not unserved, f"no node of the fuzzed swarm serves {unserved}"
    assert set(PATHS) == set(METHODS)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_well_formed_messages_with_hostile_values(fuzz_swarm: FuzzSwarm, path: str) -> None:
    """EXAMPLES requests on every node that serves the method (each example picks one)."""
    method, hosts = METHODS[path], fuzz_swarm.hosts(path)
    if method.client_streaming:
        streams = link_streams if path == "/swarmserve.v1.Relay/Link" else cell_streams
        strategy: st.SearchStrategy[Any] = st.sampled_from([n.name for n in hosts]).flatmap(
            lambda name: st.tuples(st.just(name), streams(fuzz_swarm, fuzz_swarm.nodes[name]))
        )
    else:
        strategy = st.sampled_from([n.name for n in hosts]).flatmap(
            lambda name: st.tuples(st.just(name), fuzz_swarm.fuzzers[name].messages(method.input_type))
        )

    @fuzz_settings(EXAMPLES * len(hosts))
    @given(target=strategy)
    def fuzz(target: tuple[str, Any]) -> None:
        name, request = target
        node = fuzz_swarm.nodes[name]
        if isinstance(request, LinkStream):
            frames = [relay_pb2.LinkFrame(cells=f).SerializeToString() for f in request.frames]
            judge(node, path, call(node, path, frames), request)
            if request.cells is not None and request.cells.replayed:
                again = call(node, path, frames)
                judge(node, path, again, request)
                opened = [
                    kind
                    for raw in again.replies
                    for _, kind, _, _ in link_cells(relay_pb2.LinkFrame.FromString(raw).cells)
                ]
                assert LINK_KINDS["created"] not in opened, "a replayed set-up was taken on a link"
        elif isinstance(request, CellStream):
            cells = [c.SerializeToString() for c in request.cells]
            first = call(node, path, cells)
            judge(node, path, first, request)
            opened = any(relay_pb2.RelayCell.FromString(r).WhichOneof("cell") == "created" for r in first.replies)
            if request.replayed and opened:  # the node took the set-up: it must know it again
                again = call(node, path, cells)
                judge(node, path, again)
                assert again.code is Code.ALREADY_EXISTS, f"a replayed set-up was not refused: {again}"
        else:
            judge(node, path, call(node, path, request.SerializeToString()))

    fuzz()
    assert_alive(fuzz_swarm)
    assert_nothing_held(fuzz_swarm, f"fuzzing {path}")


def mutated(raw: bytes, position: int, how: str, extra: bytes) -> bytes:
    """A valid encoding, broken the way a bad peer or a bit flip would break it."""
    if not raw:
        return extra
    at = position % len(raw)
    if how == "truncate":
        return raw[:at]
    if how == "flip":
        return raw[:at] + bytes([raw[at] ^ 0xFF]) + raw[at + 1 :]
    if how == "insert":
        return raw[:at] + extra + raw[at:]
    return raw + extra


def raw_requests(fuzz: FuzzSwarm, target: Node, descriptor: Descriptor) -> st.SearchStrategy[bytes]:
    valid = fuzz.fuzzers[target.name].messages(descriptor, small=True).map(lambda m: m.SerializeToString())
    return st.one_of(
        st.binary(max_size=512),
        st.builds(
            mutated,
            valid,
            st.integers(0, 1 << 16),
            st.sampled_from(["truncate", "flip", "insert", "append"]),
            st.binary(max_size=16),
        ),
    )


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_raw_random_bytes(fuzz_swarm: FuzzSwarm, path: str) -> None:
    """Random bytes, and valid encodings truncated, flipped or extended, as the request (or as
    the cells of a circuit): judged as any request."""
    method, hosts = METHODS[path], fuzz_swarm.hosts(path)

    def payloads(name: str) -> st.SearchStrategy[Any]:
        requests = raw_requests(fuzz_swarm, fuzz_swarm.nodes[name], method.input_type)
        return st.tuples(st.just(name), st.lists(requests, max_size=3) if method.client_streaming else requests)

    @fuzz_settings(RAW_EXAMPLES * len(hosts))
    @given(target=st.sampled_from([n.name for n in hosts]).flatmap(payloads))
    def fuzz(target: tuple[str, bytes | list[bytes]]) -> None:
        node = fuzz_swarm.nodes[target[0]]
        judge(node, path, call(node, path, target[1]))

    fuzz()
    assert_alive(fuzz_swarm)
    assert_nothing_held(fuzz_swarm, f"raw bytes to {path}")


def test_after_the_fuzzing_the_swarm_is_whole(fuzz_swarm: FuzzSwarm) -> None:
    """Runs after the fuzz tests (pytest keeps a module's order): every process alive, nothing
    held, the chain still growing, and a normal request served with a receipt that checks out."""
    assert_alive(fuzz_swarm)
    assert_nothing_held(fuzz_swarm, "the whole fuzzing run")
    router = fuzz_swarm.nodes["router-1"]

    def height() -> int:
        status = _unary(
            router,
            "/swarmserve.v1.Chain/GetStatus",
            chain_pb2.GetChainStatusRequest(),
            chain_pb2.GetChainStatusResponse,
        )
        return int(status.height)

    before, deadline = height(), time.monotonic() + 20
    while height() <= before:
        assert time.monotonic() < deadline, f"the chain stopped at height {before}"
        time.sleep(0.2)
    try:
        result = asyncio.run(generate(router.address, "Name three rivers.", model=MODEL, hops=1, max_tokens=8))
    except grpc.RpcError as error:
        swarm = _unary(
            router, "/swarmserve.v1.Router/GetSwarm", router_pb2.GetSwarmRequest(), router_pb2.GetSwarmResponse
        )
        members = [
            (m.node_id[:12], overlay_pb2.MemberState.Name(m.state), open_descriptor(m.descriptor).address)
            for m in swarm.members
        ]
        raise AssertionError(
            f"a normal request failed after the fuzzing: {error!r}; the router's members: {members}"
        ) from None
    assert len(result.token_ids) == 8 and result.receipt is not None
    assert_nothing_held(fuzz_swarm, "a normal request")
    assert_alive(fuzz_swarm)
    print("\nanswers to the fuzzed calls, by method:")
    for path, codes in sorted(SEEN.items()):
        print(f"  {path}: {dict(codes.most_common())}")
    print("a message of each refusal:")
    for (path, code), details in sorted(SAMPLES.items()):
        if code != "OK":
            print(f"  {path} {code}: {details}")


# --- the bugs the fuzz found, one regression test each -----------------------------------------


def test_undecodable_requests_are_refused_as_invalid_argument(fuzz_swarm: FuzzSwarm) -> None:
    undecodable = b"\xff\xff\xff\xff"  # field number 0 and a truncated varint: no message parses from it
    found = {}
    for path, method in sorted(METHODS.items()):
        for node in fuzz_swarm.hosts(path):
            outcome = call(node, path, [undecodable] if method.client_streaming else undecodable)
            found[f"{path} on {node.name}"] = (outcome.code.name, outcome.details)
    wrong = {where: answer for where, answer in found.items() if answer[0] != "INVALID_ARGUMENT" or not answer[1]}
    assert not wrong, f"undecodable requests not refused as INVALID_ARGUMENT: {wrong}"


def test_a_tampered_cell_after_the_next_hop_ended_is_no_internal_error(fuzz_swarm: FuzzSwarm) -> None:
    """A circuit through the relay to the inference node; the first data cell is no request, so
    the exit answers an error and ends its call; the next cell is tampered (empty). Whatever the
    timing, the relay must end the circuit with a destroy cell or a clear status."""
    relay, exit_ = fuzz_swarm.nodes["relay-1"], fuzz_swarm.inference
    assert relay.channel is not None
    answers: Counter[str] = Counter()
    for attempt in range(32):
        onion, circuit = native.Circuit.build([(relay.onion_key, exit_.address.encode()), (exit_.onion_key, b"")])
        not_a_request = relay_pb2.CircuitMessage(error=relay_pb2.CircuitError(code=3, message="not a request"))
        cells = [
            relay_pb2.RelayCell(create=relay_pb2.CreateCircuit(onion=onion)),
            relay_pb2.RelayCell(data=relay_pb2.DataCell(payload=circuit.wrap_forward(pad_message(not_a_request)))),
            relay_pb2.RelayCell(data=relay_pb2.DataCell(payload=b"")),  # fails authentication at the relay
        ]
        pause_s = (attempt % 8) * 0.0005  # the window: the exit's call ends while the relay peels the cell

        def send(cells: list[relay_pb2.RelayCell] = cells, pause_s: float = pause_s) -> Iterator[bytes]:
            yield cells[0].SerializeToString()
            yield cells[1].SerializeToString()
            time.sleep(pause_s)
            yield cells[2].SerializeToString()

        try:
            list(relay.channel.stream_stream("/swarmserve.v1.Relay/Circuit")(send(), timeout=STREAM_DEADLINE_S))
            answers["OK"] += 1
        except grpc.RpcError as error:
            details = error.details() or ""  # type: ignore[attr-defined]
            answers[f"{error.code().name}: {incident(relay, details).splitlines()[-1:] or details}"] += 1  # type: ignore[attr-defined]
    assert not [a for a in answers if a.startswith("INTERNAL")], f"answers over 32 attempts: {dict(answers)}"


def test_a_refusal_of_a_huge_field_is_delivered(fuzz_swarm: FuzzSwarm) -> None:
    model = "m" * 20_000  # within the router's 64 KiB request limit
    score = inference_pb2.ScoreRequest(model=model, prompt_token_ids=[1], completion_token_ids=[2])
    generate_request = router_pb2.GenerateRequest(model=model, prompt="Name three rivers.")
    found = {
        "Inference.Score": call(fuzz_swarm.inference, "/swarmserve.v1.Inference/Score", score.SerializeToString()),
        "Router.Generate": call(
            fuzz_swarm.nodes["router-1"], "/swarmserve.v1.Router/Generate", generate_request.SerializeToString()
        ),
    }
    wrong = {rpc: (o.code.name, o.details[:120]) for rpc, o in found.items() if o.code is not Code.NOT_FOUND}
    assert not wrong, f"the refusal (NOT_FOUND, unknown model) did not reach the client: {wrong}"


def test_a_cheque_beyond_int64_is_refused(fuzz_swarm: FuzzSwarm) -> None:
    stranger = native.Identity.from_seed(bytes(range(32)))
    targets = [
        (n, "/swarmserve.v1.Chain/DepositCheque") for n in fuzz_swarm.hosts("/swarmserve.v1.Chain/DepositCheque")
    ]
    targets.append((fuzz_swarm.inference, "/swarmserve.v1.Inference/BuyTokens"))
    found = {}
    for node, path in targets:
        cheque = sign_cheque(stranger, fuzz_swarm.chain_id, node.identity_key, 2**63)
        request: Message = (
            chain_pb2.DepositChequeRequest(cheque=cheque)
            if path.endswith("DepositCheque")
            else inference_pb2.BuyTokensRequest(cheque=cheque, blinded=[bytes(32)])
        )
        outcome = call(node, path, request.SerializeToString())
        found[f"{path} on {node.name}"] = (outcome.code.name, outcome.details)
    wrong = {where: answer for where, answer in found.items() if answer[0] != "INVALID_ARGUMENT"}
    assert not wrong, f"a cheque for 2**63 credits was not refused as INVALID_ARGUMENT: {wrong}"


def test_a_stranger_cannot_take_a_members_address(fuzz_swarm: FuzzSwarm) -> None:
    router, inference = fuzz_swarm.nodes["router-1"], fuzz_swarm.inference
    strangers = [native.Identity.from_seed(bytes([i + 1]) * 32) for i in range(3)]
    now = int(time.time() * 1000)

    def swim(who: native.Identity, **updates: Any) -> Outcome:
        descriptor = common_pb2.NodeDescriptor(
            identity_key=who.public_key,
            version=now,
            incarnation=now,
            issued_unix_ms=int(time.time() * 1000),
            address=inference.address,  # someone else's
            roles=[common_pb2.NODE_ROLE_INFERENCE],
            onion_key=bytes(range(32)),  # no one holds its secret
            onion_key_expires_unix_ms=now + 3_600_000,
            models=[common_pb2.ModelInfo(name=MODEL, weights_digest=fuzz_swarm.weights_digest, context_length=CONTEXT)],
            capacity=common_pb2.Capacity(max_concurrent=64, max_queue=64),
            policy=common_pb2.PolicySummary(max_new_tokens=512, max_prompt_tokens=1536, default_new_tokens=16),
        )
        packet = overlay_pb2.SwimPacket(sender=sign_descriptor(who, descriptor), **updates)
        return call(router, "/swarmserve.v1.Overlay/Swim", sign_message(who, packet).SerializeToString())

    try:
        for who in strangers:
            assert swim(who).code is Code.OK
        ids = {who.node_id for who in strangers}
        deadline = time.monotonic() + 10  # the suspicion timeout here is about a second
        while True:
            members = _unary(
                router, "/swarmserve.v1.Router/GetSwarm", router_pb2.GetSwarmRequest(), router_pb2.GetSwarmResponse
            ).members
            alive = [m.node_id[:12] for m in members if m.node_id in ids and m.state == overlay_pb2.MEMBER_STATE_ALIVE]
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        failed = []
        for i in range(6):
            request = router_pb2.GenerateRequest(
                model=MODEL, prompt=f"Name {i} rivers.", sampling=common_pb2.SamplingParams(max_new_tokens=4)
            )
            outcome = call(router, "/swarmserve.v1.Router/Generate", request.SerializeToString())
            if outcome.code is not Code.OK:
                failed.append(f"{outcome.code.name}: {outcome.details}")
        assert not alive and not failed, f"still alive after 10 s: {alive}; normal requests failed: {failed}"
    finally:  # the strangers leave (a member's own signed goodbye is final at once)
        for who in strangers:
            leave = overlay_pb2.MemberUpdate(
                identity_key=who.public_key,
                state=overlay_pb2.MEMBER_STATE_DEAD,
                incarnation=now,
                leave_signature=who.sign(leave_message(who.public_key, now)),
            )
            swim(who, updates=[leave])
