"""OpenAI's chat and completion requests and answers, as the router's HTTP API speaks them
(``http.py`` serves them): a request body becomes a ``GenerateRequest`` for
``RouterService.generate`` (the call ``Router.Generate`` makes: one path), and the events it
yields become OpenAI's JSON, whole or as server-sent-event chunks.

What is honoured: ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (OpenAI's default
1.0 when absent), ``top_p``, ``seed``, ``stop`` (a string or up to 4), ``logprobs`` /
``top_logprobs`` (the sampled token's log-probability; providers report no alternatives, so each
``top_logprobs`` list holds the sampled token only), ``stream`` and
``stream_options.include_usage``. ``user`` is accepted and dropped: providers must not learn who
asked. ``n`` other than 1, tools, response formats other than text, logit biases, penalties,
``echo``, ``suffix`` and ``best_of`` other than 1 are refused with a 400 rather than ignored, so
a client never gets less than it asked for without knowing. Other unknown fields are ignored, as
OpenAI-compatible servers do.

Extension, sent by the SDK through ``extra_body``: ``{"swarmserve": {"hops": 3, "allow_audit":
false}}`` (``PrivacyOptions``). Every answer carries a ``swarmserve`` object: who served it,
through how many relays, the co-signed receipt (base64 of ``SignedReceipt``) and the token ids
and bytes it commits to, which ``swarmserve.client.check_openai_receipt`` checks.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.router.service import TokenDelta
from swarmserve.rpc import InvalidArgument
from swarmserve.v1 import common_pb2, router_pb2

__all__ = [
    "OWNED_BY",
    "Answer",
    "ChatCompletionRequest",
    "CompletionRequest",
    "chunk",
    "completion_body",
    "error_body",
    "parse",
    "to_generate_request",
    "usage_chunk",
]

OWNED_BY = "swarmserve"  # the swarm, not any one member, serves a model
_ROLES = {
    "system": common_pb2.CHAT_ROLE_SYSTEM,
    "developer": common_pb2.CHAT_ROLE_SYSTEM,
    "user": common_pb2.CHAT_ROLE_USER,
    "assistant": common_pb2.CHAT_ROLE_ASSISTANT,
}
_FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_END_OF_SEQUENCE: "stop",
}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SwarmserveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hops: int | None = Field(None, ge=0, description="relays on the path; unset: the router's default")
    allow_audit: bool = Field(False, description="let a drawn verifier re-execute the answer (PrivacyOptions)")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.role not in _ROLES:
            raise InvalidArgument(f"messages: role {self.role!r} is not supported (system, developer, user, assistant)")
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(part.type != "text" or part.text is None for part in self.content):
            raise InvalidArgument("messages: only text content parts are supported")
        return "".join(part.text or "" for part in self.content)


class _Common(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, never forwarded
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    swarmserve: SwarmserveOptions = SwarmserveOptions()

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError("at most 4 stop sequences")
        return stop

    def _refuse_unsupported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidArgument("n: only 1 choice per request is supported")
        if self.logit_bias:
            raise InvalidArgument("logit_bias is not supported")
        if self.frequency_penalty or self.presence_penalty:
            raise InvalidArgument("frequency_penalty and presence_penalty are not supported")


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        self._refuse_unsupported()
        if self.tools or self.functions:
            raise InvalidArgument("tools and functions are not supported")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise InvalidArgument("response_format: only text is supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs: true")


class CompletionRequest(_Common):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def refuse_unsupported(self) -> None:
        self._refuse_unsupported()
        if self.echo or self.suffix:
            raise InvalidArgument("echo and suffix are not supported")
        if self.best_of not in (None, 1):
            raise InvalidArgument("best_of: only 1 is supported")
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise InvalidArgument("prompt: exactly one prompt per request is supported")


Request = ChatCompletionRequest | CompletionRequest


def parse(kind: type[Request], body: Any) -> Request:
    """``body`` (decoded JSON) as ``kind``; a clear :class:`InvalidArgument` otherwise."""
    try:
        request = kind.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidArgument(f"{where}: {first['msg']}") from None
    request.refuse_unsupported()
    return request


def to_generate_request(request: Request) -> router_pb2.GenerateRequest:
    generate = router_pb2.GenerateRequest(model=request.model)
    if isinstance(request, ChatCompletionRequest):
        for message in request.messages:
            generate.chat.messages.add(role=_ROLES.get(message.role, 0), content=message.text())
        limit = request.max_completion_tokens or request.max_tokens
    else:
        generate.prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
        limit = request.max_tokens
    sampling = generate.sampling
    sampling.max_new_tokens = limit or 0  # 0: the provider's default
    sampling.temperature = 1.0 if request.temperature is None else request.temperature  # OpenAI's default
    sampling.top_p = request.top_p or 1.0
    if request.seed is not None:
        sampling.seed = request.seed
    if request.stop:
        sampling.stop.extend([request.stop] if isinstance(request.stop, str) else request.stop)
    if request.swarmserve.hops is not None:
        generate.privacy.hops = request.swarmserve.hops
    generate.privacy.allow_audit = request.swarmserve.allow_audit
    return generate


@dataclass
class Answer:
    """One request's answer as it streams: what OpenAI's JSON is built from."""

    request: Request
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    token_texts: list[bytes] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    summary: router_pb2.GenerateSummary | None = None

    @property
    def chat(self) -> bool:
        return isinstance(self.request, ChatCompletionRequest)

    @property
    def object_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.id

    def wants_logprobs(self) -> bool:
        return self.request.logprobs is True if self.chat else self.request.logprobs is not None

    def add(self, delta: TokenDelta) -> None:
        self.text.append(delta.text)
        if delta.token_id is not None:
            self.token_ids.append(delta.token_id)
            self.token_texts.append(delta.token_bytes)
            self.logprobs.append(delta.logprob)

    def finish_reason(self) -> str | None:
        return None if self.summary is None else _FINISH.get(self.summary.finish_reason, "stop")

    def usage(self) -> dict[str, int]:
        prompt = 0
        if self.summary is not None:
            prompt = common_pb2.Receipt.FromString(self.summary.receipt.receipt).timing.prompt_tokens
        completion = len(self.token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def swarmserve(self) -> dict[str, Any]:
        summary = self.summary
        assert summary is not None
        return {
            "served_by": summary.served_by,
            "entered_at": summary.entered_at,
            "hops": summary.hops,
            "request_id": summary.request_id,
            "time_to_first_token_ms": summary.timing.time_to_first_token_us / 1000,
            "receipt": base64.b64encode(summary.receipt.SerializeToString()).decode(),
            "earlier_segments": [base64.b64encode(s.SerializeToString()).decode() for s in summary.earlier_segments],
            "stream_receipt": base64.b64encode(summary.stream_receipt.SerializeToString()).decode(),
            "token_ids": self.token_ids,
            "token_texts": [base64.b64encode(text).decode() for text in self.token_texts],
        }

    def logprob_block(self, start: int, end: int) -> dict[str, Any] | None:
        """The ``logprobs`` of tokens ``start:end`` in OpenAI's shape, or None if not asked."""
        if not self.wants_logprobs():
            return None
        tokens = [
            (text.decode(errors="replace"), list(text), logprob)
            for text, logprob in zip(self.token_texts[start:end], self.logprobs[start:end], strict=True)
        ]
        if isinstance(self.request, ChatCompletionRequest):
            top = self.request.top_logprobs or 0
            return {
                "content": [
                    {
                        "token": token,
                        "logprob": logprob,
                        "bytes": raw,
                        "top_logprobs": [{"token": token, "logprob": logprob, "bytes": raw}] if top else [],
                    }
                    for token, raw, logprob in tokens
                ]
            }
        offsets, at = [], sum(len(t.decode(errors="replace")) for t in self.token_texts[:start])
        for token, _, _ in tokens:
            offsets.append(at)
            at += len(token)
        return {
            "tokens": [token for token, _, _ in tokens],
            "token_logprobs": [logprob for _, _, logprob in tokens],
            "top_logprobs": [{token: logprob} for token, _, logprob in tokens],
            "text_offset": offsets,
        }


def completion_body(answer: Answer) -> dict[str, Any]:
    """The whole (non-streaming) answer."""
    text = "".join(answer.text)
    logprobs = answer.logprob_block(0, len(answer.token_ids))
    if answer.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs}
    else:
        choice = {"index": 0, "text": text, "logprobs": logprobs}
    choice["finish_reason"] = answer.finish_reason()
    return {
        "id": answer.object_id,
        "object": "chat.completion" if answer.chat else "text_completion",
        "created": answer.created,
        "model": answer.request.model,
        "choices": [choice],
        "usage": answer.usage(),
        "swarmserve": answer.swarmserve(),
    }


def chunk(answer: Answer, text: str | None, token_range: Sequence[int] = (), *, first: bool = False) -> dict[str, Any]:
    """One streamed chunk: ``text`` (None for the final chunk, which carries the finish reason
    and the ``swarmserve`` object) and the logprobs of the tokens in ``token_range``."""
    final = text is None
    logprobs = answer.logprob_block(token_range[0], token_range[-1] + 1) if token_range else None
    if answer.chat:
        delta: dict[str, Any] = {} if final else {"content": text}
        if first:
            delta["role"] = "assistant"
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": logprobs}
    choice["finish_reason"] = answer.finish_reason() if final else None
    body: dict[str, Any] = {
        "id": answer.object_id,
        "object": "chat.completion.chunk" if answer.chat else "text_completion",
        "created": answer.created,
        "model": answer.request.model,
        "choices": [choice],
    }
    if final:
        body["swarmserve"] = answer.swarmserve()
    return body


def usage_chunk(answer: Answer) -> dict[str, Any]:
    """The chunk ``stream_options.include_usage`` asks for, after the final one."""
    return {
        "id": answer.object_id,
        "object": "chat.completion.chunk" if answer.chat else "text_completion",
        "created": answer.created,
        "model": answer.request.model,
        "choices": [],
        "usage": answer.usage(),
    }


ErrorType = Literal["invalid_request_error", "authentication_error", "rate_limit_error", "server_error"]


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error JSON for an HTTP ``status``."""
    kind: ErrorType = (
        "authentication_error"
        if status in (401, 403)
        else "rate_limit_error"
        if status == 429
        else "invalid_request_error"
        if status < 500
        else "server_error"
    )
    code = {404: "model_not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
