"""Challenges (PlanetServe): a verifier node asks the swarm its own prompts as an ordinary
client: through a router, so the request reaches the provider the router picks through an
onion circuit like any user's, with a fresh seed and everyday sampling settings. The provider
cannot tell a challenge from a user. The answer's receipt names the provider; the verifier
re-executes the stream on its own copy of the model (``checks.py``) and its verdict is recorded
like any other.

Prompts are drawn from templates and topics, so they look like what users ask; half are greedy,
half sampled at temperature 0.7 (the two regimes the check treats differently).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Mapping

from grpc import aio

from services.inference.config import ChallengeSettings
from services.inference.engine import ChatTurn, Engine
from services.verifier.checks import CheckResult
from services.verifier.service import VerifierService
from swarmserve.overlay import PeerDirectory
from swarmserve.rpc import ChannelPool, ServiceError
from swarmserve.telemetry import get_logger
from swarmserve.v1 import common_pb2, router_pb2, router_pb2_grpc, verifier_pb2

__all__ = ["TEMPLATES", "TOPICS", "Challenger", "challenge_prompt", "challenge_request"]

log = get_logger("swarmserve.verifier")

TEMPLATES = (
    "Write a short paragraph about {topic}.",
    "Explain {topic} to a curious child.",
    "List three facts about {topic}.",
    "What should a beginner know about {topic}?",
    "Give me a one-sentence summary of {topic}.",
    "Why do people care about {topic}?",
    "Describe the history of {topic} briefly.",
    "What are common mistakes people make with {topic}?",
)
TOPICS = (
    "the water cycle", "bread baking", "volcanoes", "the moon", "chess openings", "photosynthesis",
    "bicycles", "honey bees", "the printing press", "rainbows", "compound interest", "glaciers",
    "jazz music", "the human heart", "recycling plastic", "coffee", "lighthouses", "tides",
    "the Roman empire", "electric cars", "sleep", "octopuses", "public libraries", "wind power",
)  # fmt: skip


def challenge_prompt(rng: random.Random) -> str:
    return rng.choice(TEMPLATES).format(topic=rng.choice(TOPICS))


def challenge_request(model: str, settings: ChallengeSettings, rng: random.Random) -> router_pb2.GenerateRequest:
    """One challenge, as the verifier hands it to a router."""
    return router_pb2.GenerateRequest(
        model=model,
        chat=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=common_pb2.CHAT_ROLE_USER, content=challenge_prompt(rng))]
        ),
        sampling=common_pb2.SamplingParams(
            max_new_tokens=settings.max_new_tokens,
            temperature=rng.choice((0.0, 0.7)),
            seed=rng.getrandbits(63),
        ),
    )


class Challenger:
    def __init__(
        self,
        verifier: VerifierService,
        engines: Callable[[], Mapping[str, Engine]],
        directory: PeerDirectory,
        channels: ChannelPool,
        settings: ChallengeSettings,
        own_key: bytes,
    ) -> None:
        self._verifier = verifier
        self._engines = engines
        self._directory = directory
        self._channels = channels
        self._settings = settings
        self._own_key = own_key
        self._random = random.SystemRandom()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._settings.interval_s > 0 and self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.interval_s * self._random.uniform(0.5, 1.5))
            try:
                await self.challenge()
            except (ServiceError, aio.AioRpcError) as error:  # no answer, or no verdict possible
                reason = error.details() if isinstance(error, aio.AioRpcError) else str(error)
                log.info("challenge not checked", reason=reason)

    async def challenge(self) -> tuple[CheckResult, verifier_pb2.SignedVerdict] | None:
        """Sends one challenge, for a model another provider serves and this node holds, through
        a random live router, and checks the answer; None when there is no such model or router,
        or this node served its own challenge."""
        routers = self._directory.alive(common_pb2.NODE_ROLE_ROUTER)
        held = {engine.identity.weights_digest: engine for engine in self._engines().values()}
        # Models as other providers name them, among those this node can check.
        offered = sorted(
            {
                (model.name, model.weights_digest)
                for peer in self._directory.alive(common_pb2.NODE_ROLE_INFERENCE)
                if peer.descriptor.identity_key != self._own_key
                for model in peer.descriptor.models
                if model.weights_digest in held
            }
        )
        if not routers or not offered:
            return None
        name, digest = self._random.choice(offered)
        engine = held[digest]
        request = challenge_request(name, self._settings, self._random)
        prompt = request.chat.messages[0].content
        stub = router_pb2_grpc.RouterStub(self._channels.get(self._random.choice(routers).descriptor.address))
        token_ids: list[int] = []
        token_texts: list[bytes] = []
        async for event in stub.Generate(request, timeout=self._settings.timeout_s):
            if event.HasField("token"):
                token_ids.extend(event.token.token_ids)
                token_texts.extend(event.token.token_texts)
            else:
                receipt = event.summary.receipt
                if common_pb2.Receipt.FromString(receipt.receipt).node_key == self._own_key:
                    return None
                prompt_ids = engine.tokenize(engine.apply_chat_template([ChatTurn("user", prompt)]))
                return await self._verifier.check(receipt, prompt_ids, token_ids, token_texts)
        raise ServiceError("the router's stream ended without a summary")
