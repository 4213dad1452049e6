"""The msgpack bodies QMesh clients and workers exchange through the broker (the broker never reads them).

A request body is one msgpack map (``GenerationRequest``). A worker answers with PARTIAL bodies
``{"text": str, "tokens": [int]}`` and one FINAL body: the summary (``final_body``) or an error
(``protocol.error_body``). ``docs/PROTOCOL.md`` lists every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from qmesh.common import protocol as p
from qmesh.common.errors import QMeshError

ROLES = ("system", "user", "assistant")
MAX_PROMPT_CHARS = 1_000_000
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 1_000_000  # the largest max_tokens a request may ask for
MAX_STOPS = 16
MAX_FAILOVERS = 1000  # a resume claiming more moves than this is not a real one


WIRE_FIELDS = {
    "prompt",
    "messages",
    "system",
    "raw",
    "max_tokens",
    "temperature",
    "seed",
    "top_p",
    "top_k",
    "stop",
    "window",
    "resume",
}


class BadRequest(QMeshError):
    """A request body a worker cannot serve; it is answered with a 400 error FINAL."""


@dataclass(slots=True)
class GenerationRequest:
    """A prompt (run through the model's chat template unless ``raw``) or a chat history, and sampling options."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    system: str | None = None
    raw: bool = False
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    seed: int | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    window: int | None = None  # chunks the worker may send ahead of the client's credit (None: no flow control)
    resume_tokens: list[int] = field(default_factory=list)  # already delivered: continue after them
    failovers: int = 0  # how many times this request moved to another worker mid-stream

    def to_body(self) -> bytes:
        body: dict[str, Any] = {"max_tokens": self.max_tokens}
        for name in ("prompt", "messages", "system", "temperature", "seed", "top_p", "top_k", "window"):
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.raw:
            body["raw"] = True
        if self.stop:
            body["stop"] = self.stop
        if self.resume_tokens or self.failovers:
            body["resume"] = {"tokens": self.resume_tokens, "failovers": self.failovers}
        return p.pack(body)

    def chat_messages(self) -> list[dict[str, str]]:
        """The conversation to render with the chat template."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        if self.messages is not None:
            return messages + self.messages
        return messages + [{"role": "user", "content": self.prompt or ""}]

    @classmethod
    def from_body(cls, body: list[bytes]) -> GenerationRequest:
        """Parse a request body. A body that is not a msgpack map is a plain MDP client's UTF-8 prompt."""
        if not body:
            raise BadRequest("empty request body")
        try:
            fields = p.unpack(body[0])
        except p.ProtocolError:
            fields = None
        if not isinstance(fields, dict):
            try:
                return cls(prompt=_text(b"".join(body).decode("utf-8"), "prompt"))
            except UnicodeDecodeError as exc:
                raise BadRequest("a plain request body must be a UTF-8 prompt or a msgpack map") from exc
        return cls.from_fields(fields)

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> GenerationRequest:
        """Check a request body's msgpack map and build the request from it."""
        unknown = set(fields) - WIRE_FIELDS
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}")
        request = cls(
            prompt=_optional(fields, "prompt", str),
            messages=_messages(fields.get("messages")),
            system=_optional(fields, "system", str),
            raw=_optional(fields, "raw", bool) or False,
            max_tokens=_int(fields.get("max_tokens", DEFAULT_MAX_TOKENS), "max_tokens", 1, MAX_TOKENS_LIMIT),
            temperature=_number(fields.get("temperature"), "temperature", 0.0, 10.0),
            seed=_optional(fields, "seed", int),
            top_p=_number(fields.get("top_p"), "top_p", 0.0, 1.0),
            top_k=None if fields.get("top_k") is None else _int(fields["top_k"], "top_k", 0, 1_000_000),
            stop=_stops(fields.get("stop")),
            window=None if fields.get("window") is None else _int(fields["window"], "window", 1, 1_000_000),
        )
        request.resume_tokens, request.failovers = _resume(fields.get("resume"))
        if (request.prompt is None) == (request.messages is None):
            raise BadRequest("give exactly one of 'prompt' or 'messages'")
        if request.prompt is not None:
            _text(request.prompt, "prompt")
        if request.raw and request.messages is not None:
            raise BadRequest("'raw' applies to 'prompt' only")
        return request

    def resumed_after(self, delivered_tokens: list[int]) -> GenerationRequest:
        """This request continued after ``delivered_tokens``, the token ids its stream sent since it was sent: what
        the broker sends the next worker when one dies mid-stream, and the SDK the broker after a broker restart."""
        return replace(self, resume_tokens=self.resume_tokens + delivered_tokens, failovers=self.failovers + 1)


def resume_body(body: list[bytes], delivered: bytes | bytearray) -> list[bytes] | None:
    """The request body to continue a stream elsewhere after the ``delivered`` PARTIAL bodies (concatenated, as
    the broker keeps them), or None if the stream cannot be resumed (a plain body, or chunks without token ids).
    Used by the broker on failover."""
    try:
        if len(body) != 1:
            return None
        request = GenerationRequest.from_fields(p.unpack_map(body[0]))  # not a map: a plain prompt
        tokens: list[int] = []
        for chunk in p.unpack_stream(delivered):
            chunk_tokens = chunk.get("tokens") if isinstance(chunk, dict) else None
            if not isinstance(chunk_tokens, list):
                return None
            tokens.extend(chunk_tokens)
        resumed = request.resumed_after(_token_ids(tokens))  # the token ids came from a worker: check them
    except (p.ProtocolError, BadRequest):
        return None
    return [resumed.to_body()] if resumed.failovers <= MAX_FAILOVERS else None


def final_body(**summary: Any) -> bytes:
    """Body of a successful FINAL: finish_reason, tokens, prompt_tokens, worker, model, timings."""
    return p.pack(summary)


def _text(value: str, name: str) -> str:
    if not value.strip():
        raise BadRequest(f"'{name}' is empty")
    if len(value) > MAX_PROMPT_CHARS:
        raise BadRequest(f"'{name}' is longer than {MAX_PROMPT_CHARS} characters")
    return value


def _optional(fields: dict[str, Any], name: str, kind: type) -> Any:
    value = fields.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadRequest(f"'{name}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be an integer from {low} to {high}")
    return value


def _number(value: Any, name: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be a number from {low:g} to {high:g}")
    return float(value)


def _messages(value: Any) -> list[dict[str, str]] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty list")
    total = 0
    for message in value:
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or message["role"] not in ROLES
            or not isinstance(message["content"], str)
        ):
            raise BadRequest("each message must be {'role': system|user|assistant, 'content': str}")
        total += len(message["content"])
    if total > MAX_PROMPT_CHARS:
        raise BadRequest(f"'messages' are longer than {MAX_PROMPT_CHARS} characters")
    return value


def _resume(value: Any) -> tuple[list[int], int]:
    if value is None:
        return [], 0
    if not isinstance(value, dict) or set(value) != {"tokens", "failovers"}:
        raise BadRequest("'resume' must be {'tokens': [int], 'failovers': int}")
    return _token_ids(value["tokens"]), _int(value["failovers"], "resume.failovers", 0, MAX_FAILOVERS)


def _token_ids(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise BadRequest("'resume.tokens' must be a list of token ids")
    return list(value)


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_STOPS or not all(isinstance(s, str) and s for s in value):
        raise BadRequest(f"'stop' must be a list of at most {MAX_STOPS} non-empty strings")
    return value
