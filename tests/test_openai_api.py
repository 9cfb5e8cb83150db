"""The router's OpenAI-compatible HTTP API, through the real ``openai`` SDK (sync and async
clients) against a real local swarm (a router, a relay, a llama.cpp node with the embedded model):
models, chat and completions, streaming and not, usage, logprobs, seeds, stops, the ``swarmserve``
extension through ``extra_body`` and the ``swarmserve`` object whose receipt the client checks.

Tried: ``n=2``, a tool, a negative temperature, malformed JSON (400); an unknown model (404); a
body over the router's limit (413); a second request while the only node's one slot is taken and
it queues none (429); more relays than the swarm has (503); a router with API keys called with
none and with a wrong one (401); a client that hangs up mid-stream (the node's slot is freed at
once, not when the answer would have ended); a tampered receipt or text (the check refuses)."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import openai
import pytest

from services.inference.config import ProviderPolicy
from services.inference.engine import Engine, GeneratedToken, Sampling
from swarmserve.client import check_openai_receipt
from swarmserve.receipts import ReceiptError
from tests.conftest import MODEL, Swarm, SwarmFactory

HTTP = "127.0.0.1:0"
QUESTION = [{"role": "user", "content": "Name three colours."}]


class SlowEngine:
    """The real engine, 50 ms a token: an answer long enough to hang up in the middle of."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def generate(
        self, prompt_ids: Sequence[int], sampling: Sampling, resume: Sequence[int] = ()
    ) -> AsyncGenerator[GeneratedToken, None]:
        async for token in self.inner.generate(prompt_ids, sampling, resume):
            await asyncio.sleep(0.05)
            yield token


def base_url(s: Swarm) -> str:
    assert s.router.http is not None
    return s.router.http.url + "/v1"


@asynccontextmanager
async def api_swarm(swarm: SwarmFactory, **router: object) -> AsyncIterator[Swarm]:
    policy = ProviderPolicy(max_concurrent=1, max_queue=0, max_new_tokens=256, default_new_tokens=16)
    async with swarm(
        relays=1, inference=[{"policy": policy, "offload": False}], default_hops=1, http_listen=HTTP, **router
    ) as s:
        yield s


async def test_chat_and_completions_with_the_openai_sdk(swarm: SwarmFactory) -> None:
    async with api_swarm(swarm) as s:
        client = openai.AsyncOpenAI(base_url=base_url(s), api_key="unused", max_retries=0)
        models = await client.models.list()
        assert [(m.id, m.owned_by) for m in models.data] == [(MODEL, "swarmserve")]

        # Not streamed: the answer, its usage, and a receipt the client checks itself.
        answer = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
        text = answer.choices[0].message.content
        assert text and answer.choices[0].finish_reason in ("stop", "length")
        extra = answer.model_extra["swarmserve"]  # type: ignore[index]
        receipt = check_openai_receipt(extra, text)
        assert answer.usage is not None and answer.usage.completion_tokens == receipt.token_count > 0
        assert answer.usage.prompt_tokens > 0 and extra["hops"] == 1
        assert extra["served_by"] == s.inference[0].keys.identity.node_id

        # Streamed, through no relay (the extension), with usage and logprobs: the same greedy text.
        stream = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, logprobs=True, top_logprobs=1,
            extra_body={"swarmserve": {"hops": 0}},
        )  # fmt: skip
        chunks = [c async for c in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert chunks[0].choices[0].delta.role == "assistant"
        final = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
        check_openai_receipt(final.model_extra["swarmserve"], streamed)  # type: ignore[index]
        assert final.model_extra["swarmserve"]["hops"] == 0  # type: ignore[index]
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == receipt.token_count
        scored = [
            item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content or []
        ]
        assert len(scored) == receipt.token_count and all(item.logprob <= 0 for item in scored)
        assert all(item.top_logprobs[0].token == item.token for item in scored)

        # Sampling with a seed is reproducible; a stop string ends the answer before it.
        seeded = [
            (await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10, temperature=0.9, seed=42))
            .choices[0].message.content
            for _ in range(2)
        ]  # fmt: skip
        assert seeded[0] == seeded[1]
        stop = text.split()[1] if len(text.split()) > 1 else text[:2]
        stopped = await client.chat.completions.create(
            model=MODEL, messages=QUESTION, max_tokens=12, temperature=0, stop=[stop]
        )
        assert stopped.choices[0].finish_reason == "stop" and stop not in (stopped.choices[0].message.content or "")

        # The legacy completions endpoint, streamed and not.
        completion = await client.completions.create(
            model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=0
        )
        assert completion.choices[0].text and completion.choices[0].logprobs is not None
        assert len(completion.choices[0].logprobs.token_logprobs or []) == completion.usage.completion_tokens  # type: ignore[union-attr]
        pieces = [
            c
            async for c in await client.completions.create(
                model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
            )
        ]
        assert "".join(c.choices[0].text for c in pieces if c.choices) == completion.choices[0].text

        # The sync client, as most scripts use it (in a thread: the swarm runs in this loop).
        def sync_call() -> str:
            sync = openai.OpenAI(base_url=base_url(s), api_key="unused", max_retries=0)
            return (
                sync.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=12, temperature=0)
                .choices[0]
                .message.content
                or ""
            )

        assert await asyncio.to_thread(sync_call) == text

        # A tampered receipt or text does not check.
        with pytest.raises(ReceiptError):
            check_openai_receipt(extra, text + "!")
        with pytest.raises(ReceiptError):
            check_openai_receipt(extra | {"token_ids": [*extra["token_ids"][:-1], extra["token_ids"][-1] ^ 1]})


async def test_errors_are_openai_errors_with_the_right_status(swarm: SwarmFactory) -> None:
    async with api_swarm(swarm, max_request_bytes=4096) as s:
        client = openai.AsyncOpenAI(base_url=base_url(s), api_key="unused", max_retries=0)

        async def refused(status: int, words: str, **asked: object) -> None:
            with pytest.raises(openai.APIStatusError) as caught:
                await client.chat.completions.create(**({"model": MODEL, "messages": QUESTION} | asked))  # type: ignore[call-overload]
            assert caught.value.status_code == status, caught.value
            body = caught.value.body
            assert isinstance(body, dict) and words in body["message"], body  # the SDK unwraps {"error": ...}

        await refused(400, "n: only 1", n=2)
        await refused(400, "tools", tools=[{"type": "function", "function": {"name": "f"}}])
        await refused(400, "temperature", temperature=-1)
        await refused(404, "no live inference node serves model", model="no-such-model")
        await refused(413, "accepts at most", messages=[{"role": "user", "content": "x" * 5000}])
        await refused(503, "live relays", extra_body={"swarmserve": {"hops": 3}})
        async with httpx.AsyncClient() as http:
            reply = await http.post(base_url(s) + "/chat/completions", content=b"{not json")
            assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"

            # The one slot taken by a long answer and no queue: the swarm refuses for load (429).
            # The client that took it then hangs up: the node's slot is freed at once.
            node = s.inference[0].servicer.service
            assert node is not None
            node.engines[MODEL] = SlowEngine(node.engines[MODEL])  # type: ignore[assignment]
            story = [{"role": "user", "content": "Write a long story about a dragon and a lighthouse."}]
            long = {"model": MODEL, "messages": story, "max_tokens": 250, "stream": True, "temperature": 0.7, "seed": 1}
            async with http.stream("POST", base_url(s) + "/chat/completions", json=long) as streaming:
                assert streaming.status_code == 200, await streaming.aread()
                lines = streaming.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                assert node.load().running == 1
                await refused(429, "node is full", max_tokens=4)
            hung_up = time.monotonic()
            while node.load().running:
                assert time.monotonic() - hung_up < 1, "the node still generates for a client that left"
                await asyncio.sleep(0.05)


async def test_api_keys(swarm: SwarmFactory) -> None:
    async with api_swarm(swarm, api_keys=["sk-right"]) as s:
        async with httpx.AsyncClient() as http:
            for path in ("/models", "/chat/completions"):
                reply = await http.request("GET" if path == "/models" else "POST", base_url(s) + path, json={})
                assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        wrong = openai.AsyncOpenAI(base_url=base_url(s), api_key="sk-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        client = openai.AsyncOpenAI(base_url=base_url(s), api_key="sk-right", max_retries=0)
        assert [m.id for m in (await client.models.list()).data] == [MODEL]
        answer = await client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        assert answer.choices[0].message.content is not None


async def test_server_sent_events_framing(swarm: SwarmFactory) -> None:
    async with api_swarm(swarm) as s, httpx.AsyncClient() as http:
        asked = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": True}
        reply = await http.post(base_url(s) + "/chat/completions", json=asked)
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = reply.text.split("\n\n")
        assert events[-1] == "" and events[-2] == "data: [DONE]", events[-3:]
        bodies = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
        assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1])
        assert {b["object"] for b in bodies} == {"chat.completion.chunk"}
        assert len({b["id"] for b in bodies}) == 1
        assert bodies[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "swarmserve" in bodies[-1]
        assert all(b["choices"][0]["finish_reason"] is None for b in bodies[:-1])


def readme_blocks() -> tuple[str, str]:
    """The shell and Python examples of the README's OpenAI-compatible API section."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## OpenAI-compatible API", 1)[1].split("\n## ", 1)[0]
    shell = section.split("```sh\n", 1)[1].split("```", 1)[0]
    python = section.split("```python\n", 1)[1].split("```", 1)[0]
    return shell, python


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed (the README's shell example uses it)")
async def test_the_readme_examples_work_as_shown(swarm: SwarmFactory) -> None:
    shell, python = readme_blocks()
    async with swarm(relays=3, inference=[{}], http_listen=HTTP) as s:
        assert s.router.http is not None
        shell, python = (block.replace("http://127.0.0.1:7080", s.router.http.url) for block in (shell, python))
        for command in shell.replace("\\\n", "").strip().splitlines():
            process = await asyncio.create_subprocess_shell(command, stdout=asyncio.subprocess.PIPE)
            output, _ = await process.communicate()
            assert process.returncode == 0, command
            reply = json.loads(output)
            assert (
                reply["data"][0]["id"] == MODEL if "/models" in command else reply["choices"][0]["message"]["content"]
            )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", python, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await process.communicate()
        assert process.returncode == 0 and "served by" in output.decode(), output.decode()
