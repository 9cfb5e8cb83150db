"""The inference node over real sockets with the real SmolLM2 model (llama.cpp): streaming,
reproducibility, receipts, scoring against a degraded model, admission, cancellation, and every
kind of bad input getting a precise status code."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.inference.config import ModelSettings, ProviderPolicy
from swarmserve.receipts import ReceiptError, verify_receipt
from swarmserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from tests.conftest import MODEL, NodeFactory

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "List three prime numbers.",
    "Explain photosynthesis briefly.",
]


def chat(text: str, **sampling: object) -> inference_pb2.InferenceGenerateRequest:
    return inference_pb2.InferenceGenerateRequest(
        model=MODEL,
        chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content=text)]),
        sampling=common_pb2.SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def collect(
    stub: inference_pb2_grpc.InferenceStub, request: inference_pb2.InferenceGenerateRequest
) -> tuple[list[inference_pb2.InferenceToken], inference_pb2.InferenceSummary]:
    tokens, summary = [], None
    async for reply in stub.Generate(request):
        if reply.HasField("token"):
            tokens.append(reply.token)
        else:
            summary = reply.summary
    assert summary is not None, "every stream ends with a summary"
    return tokens, summary


async def test_stream_deltas_equal_detokenized_ids_and_receipt_verifies(
    inference_node: NodeFactory,
) -> None:
    async with inference_node() as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        tokens, summary = await collect(stub, chat(PROMPTS[0], max_new_tokens=40))
        ids = [t.token_id for t in tokens]
        texts = [t.text for t in tokens]
        engine = node.servicer.service.engines[MODEL]  # type: ignore[union-attr]
        assert tokens and b"".join(texts) == engine.detokenize(ids)
        assert [t.index for t in tokens] == list(range(len(tokens)))
        assert all(t.logprob <= 0 for t in tokens)

        receipt = verify_receipt(summary.receipt, ids, texts, node_key=node.keys.identity.public_key)
        assert receipt.model_digest == engine.identity.weights_digest
        assert receipt.token_count == len(ids)
        assert receipt.sampling.HasField("seed")
        assert receipt.timing.completion_tokens == len(ids)
        assert 0 < receipt.timing.time_to_first_token_us <= receipt.timing.total_us

        # One changed token, one changed byte of text, one dropped token, another key: refused.
        with pytest.raises(ReceiptError, match="commitment"):
            verify_receipt(summary.receipt, [ids[0] + 1, *ids[1:]], texts)
        with pytest.raises(ReceiptError, match="commitment"):
            verify_receipt(summary.receipt, ids, [texts[0] + b"!", *texts[1:]])
        with pytest.raises(ReceiptError, match="covers"):
            verify_receipt(summary.receipt, ids[:-1], texts[:-1])
        with pytest.raises(ReceiptError, match="another node"):
            verify_receipt(summary.receipt, ids, texts, node_key=b"\x01" * 32)
        forged = common_pb2.SignedReceipt()
        forged.CopyFrom(summary.receipt)
        forged.signature = bytes(64)
        with pytest.raises(ReceiptError, match="signature"):
            verify_receipt(forged, ids, texts)


async def test_greedy_and_seeded_sampling_are_reproducible(inference_node: NodeFactory) -> None:
    async with inference_node() as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        first, _ = await collect(stub, chat(PROMPTS[1], max_new_tokens=24))
        second, _ = await collect(stub, chat(PROMPTS[1], max_new_tokens=24))
        assert [t.token_id for t in first] == [t.token_id for t in second]
        seeded = [
            [t.token_id for t in (await collect(stub, chat(PROMPTS[1], max_new_tokens=24, temperature=0.9, seed=7)))[0]]
            for _ in range(2)
        ]
        assert seeded[0] == seeded[1]


async def test_score_separates_the_claimed_model_from_a_requantized_copy(
    inference_node: NodeFactory, q2k_model: Path
) -> None:
    models = [
        ModelSettings(name=MODEL, context_length=1024),
        ModelSettings(name="degraded", path=q2k_model, context_length=1024),
    ]
    async with inference_node(models=models) as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        engine = node.servicer.service.engines[MODEL]  # type: ignore[union-attr]
        honest = degraded = total = 0
        for prompt in PROMPTS:
            request = chat(prompt, max_new_tokens=40)
            tokens, _ = await collect(stub, request)
            prompt_ids = engine.tokenize(
                engine.apply_chat_template(
                    [__import__("services.inference.engine", fromlist=["ChatTurn"]).ChatTurn("user", prompt)]
                )
            )
            completion = [t.token_id for t in tokens]
            for model, counter in ((MODEL, "honest"), ("degraded", "degraded")):
                scored = await stub.Score(
                    inference_pb2.ScoreRequest(
                        model=model, prompt_token_ids=prompt_ids, completion_token_ids=completion
                    )
                )
                assert len(scored.positions) == len(completion)
                hits = sum(p.is_top_choice for p in scored.positions)
                if counter == "honest":
                    honest += hits
                    # Teacher forcing reproduces the logprobs the stream reported.
                    assert abs(scored.positions[0].logprob - tokens[0].logprob) < 1e-3
                else:
                    degraded += hits
            total += len(completion)
        assert honest / total >= 0.9, f"same model: {honest}/{total} top choices"
        assert degraded / total <= honest / total - 0.1, f"Q2_K copy: {degraded}/{total} vs {honest}/{total}"


async def test_stop_strings_cut_the_stream_and_the_receipt_covers_what_was_sent(
    inference_node: NodeFactory,
) -> None:
    async with inference_node() as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        full, _ = await collect(stub, chat(PROMPTS[2], max_new_tokens=40))
        text = b"".join(t.text for t in full).decode(errors="replace")
        stop = text.strip()[3:6]  # a string that occurs in the greedy answer
        tokens, summary = await collect(stub, chat(PROMPTS[2], max_new_tokens=40, stop=[stop]))
        sent = b"".join(t.text for t in tokens).decode(errors="replace")
        assert summary.finish_reason == common_pb2.FINISH_REASON_STOP
        assert stop not in sent and text.startswith(sent)
        verify_receipt(summary.receipt, [t.token_id for t in tokens], [t.text for t in tokens])


async def test_finish_reasons_and_status(inference_node: NodeFactory) -> None:
    async with inference_node() as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        tokens, summary = await collect(stub, chat(PROMPTS[3], max_new_tokens=5))
        assert len(tokens) == 5 and summary.finish_reason == common_pb2.FINISH_REASON_LENGTH
        _, summary = await collect(stub, chat("Say hi.", max_new_tokens=200))
        assert summary.finish_reason == common_pb2.FINISH_REASON_END_OF_SEQUENCE
        status = await stub.Status(inference_pb2.StatusRequest())
        assert status.identity_key == node.keys.identity.public_key
        assert status.models[0].name == MODEL and status.models[0].quantization == "Q4_1"
        assert status.capacity.max_concurrent == 1 and status.load.running == 0
        assert status.load.tokens_per_second > 0 and status.policy.serving_now


async def test_requests_beyond_the_limit_are_queued_then_rejected(
    inference_node: NodeFactory,
) -> None:
    policy = ProviderPolicy(max_concurrent=1, max_queue=1, max_new_tokens=256, default_new_tokens=16)
    async with inference_node(policy=policy) as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        running = stub.Generate(chat(PROMPTS[0], max_new_tokens=60))
        await running.read()  # it has the slot
        queued = asyncio.ensure_future(collect(stub, chat(PROMPTS[1], max_new_tokens=4)))
        for _ in range(100):
            if (await stub.Status(inference_pb2.StatusRequest())).load.queued == 1:
                break
            await asyncio.sleep(0.02)
        status = await stub.Status(inference_pb2.StatusRequest())
        assert (status.load.running, status.load.queued) == (1, 1)
        started = time.monotonic()
        with pytest.raises(aio.AioRpcError) as full:
            await collect(stub, chat(PROMPTS[2], max_new_tokens=4))
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue 1" in (full.value.details() or "")
        assert time.monotonic() - started < 0.5, "a full queue answers at once"
        while await running.read() != aio.EOF:
            pass
        tokens, _ = await queued  # the queued request ran once the slot was free
        assert len(tokens) == 4
        status = await stub.Status(inference_pb2.StatusRequest())
        assert status.load.mean_queue_wait_us > 0


async def test_cancelled_stream_frees_the_slot_promptly(inference_node: NodeFactory) -> None:
    policy = ProviderPolicy(max_concurrent=1, max_queue=0, max_new_tokens=512, default_new_tokens=16)
    async with inference_node(policy=policy) as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Generate(chat(PROMPTS[3], max_new_tokens=500))
        await call.read()
        await call.read()
        call.cancel()  # the client disconnects mid-stream
        deadline = time.monotonic() + 3
        while (await stub.Status(inference_pb2.StatusRequest())).load.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert (await stub.Status(inference_pb2.StatusRequest())).load.running == 0
        tokens, _ = await collect(stub, chat(PROMPTS[0], max_new_tokens=3))  # max_queue 0: needs a free slot
        assert len(tokens) == 3


@pytest.mark.parametrize(
    ("request_", "code", "message"),
    [
        (
            inference_pb2.InferenceGenerateRequest(model=MODEL, prompt="   "),
            "INVALID_ARGUMENT",
            "prompt is empty",
        ),
        (
            inference_pb2.InferenceGenerateRequest(model=MODEL),
            "INVALID_ARGUMENT",
            "exactly one of prompt",
        ),
        (
            inference_pb2.InferenceGenerateRequest(model=MODEL, prompt="hello " * 700),
            "INVALID_ARGUMENT",
            "at most 600",
        ),
        (
            inference_pb2.InferenceGenerateRequest(model="gpt-5", prompt="hi"),
            "NOT_FOUND",
            "'gpt-5' is not served",
        ),
        (
            inference_pb2.InferenceGenerateRequest(prompt="hi"),
            "INVALID_ARGUMENT",
            "model is required",
        ),
        (chat("hi", temperature=9.0), "INVALID_ARGUMENT", "temperature must be in [0, 5]"),
        (chat("hi", temperature=float("nan")), "INVALID_ARGUMENT", "temperature"),
        (chat("hi", top_p=2.0), "INVALID_ARGUMENT", "top_p"),
        (chat("hi", top_k=10**6), "INVALID_ARGUMENT", "top_k"),
        (chat("hi", repetition_penalty=-1.0), "INVALID_ARGUMENT", "repetition_penalty"),
        (chat("hi", max_new_tokens=300), "INVALID_ARGUMENT", "exceeds this node's limit of 256"),
        (chat("hi", stop=["x"] * 9), "INVALID_ARGUMENT", "at most 8 stop strings"),
        (chat("hi", stop=[""]), "INVALID_ARGUMENT", "stop strings must be 1 to 64"),
        (
            inference_pb2.InferenceGenerateRequest(
                model=MODEL,
                chat=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(content="x")]),
            ),
            "INVALID_ARGUMENT",
            "chat role",
        ),
        (
            inference_pb2.InferenceGenerateRequest(model=MODEL, chat=common_pb2.ChatMessages()),
            "INVALID_ARGUMENT",
            "chat has no messages",
        ),
        (
            inference_pb2.InferenceGenerateRequest(
                model=MODEL, prompt_tokens=inference_pb2.PromptTokens(token_ids=[1, 49152])
            ),
            "INVALID_ARGUMENT",
            "outside the vocabulary",
        ),
        (
            inference_pb2.InferenceGenerateRequest(model=MODEL, prompt="hi", request_id="r" * 65),
            "INVALID_ARGUMENT",
            "request_id",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_bad_generate_requests_get_precise_errors(
    inference_node: NodeFactory,
    request_: inference_pb2.InferenceGenerateRequest,
    code: str,
    message: str,
) -> None:
    policy = ProviderPolicy(max_concurrent=1, max_queue=1, max_prompt_tokens=600, max_new_tokens=256)
    async with inference_node(policy=policy) as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(aio.AioRpcError) as error:
            await collect(stub, request_)
        assert error.value.code().name == code
        assert message in (error.value.details() or "")
        # Nothing leaked: the node still serves.
        assert (await stub.Status(inference_pb2.StatusRequest())).load.running == 0
        tokens, _ = await collect(stub, chat("hi", max_new_tokens=2))
        assert len(tokens) == 2


async def test_bad_score_requests_get_precise_errors(inference_node: NodeFactory) -> None:
    async with inference_node() as node, aio.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        cases = [
            (inference_pb2.ScoreRequest(model=MODEL, prompt_token_ids=[1], completion_token_ids=[60000]), "INVALID_ARGUMENT", "outside the vocabulary"),
            (inference_pb2.ScoreRequest(model=MODEL, completion_token_ids=[5]), "INVALID_ARGUMENT", "prompt_token_ids is empty"),
            (inference_pb2.ScoreRequest(model=MODEL, prompt_token_ids=[1]), "INVALID_ARGUMENT", "completion_token_ids is empty"),
            (inference_pb2.ScoreRequest(model=MODEL, prompt_token_ids=[1], completion_token_ids=[2], top_alternatives=21), "INVALID_ARGUMENT", "top_alternatives"),
            (inference_pb2.ScoreRequest(model=MODEL, prompt_token_ids=[1] * 1000, completion_token_ids=[2] * 100), "INVALID_ARGUMENT", "context of 1024"),
            (inference_pb2.ScoreRequest(model=MODEL, expected_weights_digest=b"\0" * 32, prompt_token_ids=[1], completion_token_ids=[2]), "FAILED_PRECONDITION", "not the expected"),
            (inference_pb2.ScoreRequest(model="nope", prompt_token_ids=[1], completion_token_ids=[2]), "NOT_FOUND", "not served"),
        ]  # fmt: skip
        for request, code, message in cases:
            with pytest.raises(aio.AioRpcError) as error:
                await stub.Score(request)
            assert error.value.code().name == code, message
            assert message in (error.value.details() or "")
        scored = await stub.Score(
            inference_pb2.ScoreRequest(
                model=MODEL,
                prompt_token_ids=[504, 3575],
                completion_token_ids=[282],
                top_alternatives=3,
            )
        )
        assert len(scored.positions[0].alternatives) == 3
        assert scored.positions[0].alternatives[0].token_id == scored.positions[0].top.token_id


def test_cli_serves_with_json_logs_and_drains_on_sigterm(tmp_path: Path) -> None:
    """`swarmserve inference` with no config file: defaults, JSON logs, health, SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "inference", "--listen", "127.0.0.1:0"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: list[dict[str, object]] = []
    try:
        assert process.stderr is not None
        address = None
        for raw in process.stderr:
            if raw.startswith("{"):
                lines.append(json.loads(raw))
                if lines[-1]["event"] == "inference node ready":
                    address = str(lines[-1]["address"])
                    break
        assert address, "the node reports its address once ready"

        async def health() -> int:
            async with aio.insecure_channel(address) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="swarmserve.v1.Inference")
                )
                return int(reply.status)

        assert asyncio.run(health()) == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        lines += [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    finally:
        process.kill()
    events = [line["event"] for line in lines]
    assert events.index("listening, not serving yet") < events.index("model loaded") < events.index("serving")
    assert "draining" in events and "stopped" in events
    assert (tmp_path / "data" / "identity.key").exists()


def test_cli_refuses_a_bad_config_clearly(tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("policy:\n  max_concurrent: 0\n")
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "inference", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == 1
    assert "policy.max_concurrent" in result.stderr and "greater than or equal to 1" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "services.cli", "inference", "--listen", "nowhere"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
    )
    assert result.returncode == 1 and "expected HOST:PORT" in result.stderr


async def test_grpcurl_lists_describes_and_calls_the_node(inference_node: NodeFactory) -> None:
    """The README's grpcurl commands, run for real (grpcurl comes with the dev dependencies)."""
    grpcurl = Path(sys.executable).parent / "grpcurl"
    async with inference_node() as node:

        async def call(*args: str) -> tuple[int, str]:
            process = await asyncio.create_subprocess_exec(
                str(grpcurl),
                "-plaintext",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            output, _ = await process.communicate()
            return process.returncode or 0, output.decode()

        code, listed = await call(node.address, "list")
        assert code == 0 and "swarmserve.v1.Inference" in listed and "grpc.health.v1.Health" in listed
        code, described = await call(node.address, "describe", "swarmserve.v1.Inference")
        assert code == 0 and "rpc Score" in described
        code, status = await call(node.address, "swarmserve.v1.Inference/Status")
        assert code == 0 and json.loads(status)["models"][0]["quantization"] == "Q4_1"
        body = json.dumps(
            {
                "model": MODEL,
                "prompt": "The capital of France is",
                "sampling": {"max_new_tokens": 3},
            }
        )
        code, streamed = await call("-d", body, node.address, "swarmserve.v1.Inference/Generate")
        assert code == 0 and streamed.count('"token"') == 3 and '"summary"' in streamed
        code, refused = await call(
            "-d",
            '{"model": "nope", "prompt": "x"}',
            node.address,
            "swarmserve.v1.Inference/Generate",
        )
        assert code != 0 and "NotFound" in refused
