"""The msgpack bodies QMesh clients and workers exchange through the broker (the broker never reads them).

A request body is one msgpack map (``GenerationRequest``). A worker answers with PARTIAL bodies
``{"text": str, "tokens": [int]}`` and one FINAL body: the summary (``final_body``) or an error
(``protocol.error_body``). An embeddings request (``EmbeddingRequest``) gets no PARTIALs, only a FINAL with its
vectors (``pack_vector``). ``docs/PROTOCOL.md`` lists every field.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from qmesh.common import protocol as p
from qmesh.common.errors import QMeshError

ROLES = ("system", "user", "assistant", "tool")
TOOL_CHOICES = ("auto", "none", "required")
MAX_PROMPT_CHARS = 1_000_000
DEFAULT_MAX_TOKENS = 256
MAX_TOKENS_LIMIT = 1_000_000  # the largest max_tokens a request may ask for
MAX_STOPS = 16
MAX_FAILOVERS = 1000  # a resume claiming more moves than this is not a real one
MAX_TOP_LOGPROBS = 20
MAX_TOOLS = 128
MAX_LOGIT_BIAS = 300  # entries
MAX_SCHEMA_BYTES = 64 * 1024  # a JSON schema (or a tool's parameters) as msgpack
TOOL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_TOOL_NAME = 64


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
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "json_schema",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "stream",
}

Message = dict[str, Any]  # {"role", "content"} (+ "tool_calls" on an assistant turn, "tool_call_id" on a tool result)


class BadRequest(QMeshError):
    """A request body a worker cannot serve; it is answered with a 400 error FINAL."""


@dataclass(slots=True)
class GenerationRequest:
    """A prompt (run through the model's chat template unless ``raw``) or a chat history, and sampling options."""

    prompt: str | None = None
    messages: list[Message] | None = None
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
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: list[tuple[int, float]] = field(default_factory=list)  # (token id, bias added to its logit)
    logprobs: int | None = None  # report each token's log-probability and this many alternatives (None: don't)
    json_schema: dict[str, Any] | None = None  # the answer is JSON that matches it
    tools: list[dict[str, Any]] = field(default_factory=list)  # {"name", "description", "parameters"}
    tool_choice: str | dict[str, str] = "auto"  # auto, none, required or {"name": one of the tools}
    parallel_tool_calls: bool = True
    stream: bytes | None = None  # the generation's name (its client's request id): a worker that kept it running
    # while it had no broker hands it back to the client that asks for it again (docs/PROTOCOL.md, broker pair)

    _OPTIONAL = (
        "prompt",
        "messages",
        "system",
        "temperature",
        "seed",
        "top_p",
        "top_k",
        "window",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "logprobs",
        "json_schema",
        "stream",
    )

    @property
    def constrained(self) -> bool:
        """Its answer follows a grammar (a JSON schema, or tool calls): a failover cannot simply continue it."""
        return self.json_schema is not None or bool(self.tools) and self.tool_choice != "none"

    def to_body(self) -> bytes:
        body: dict[str, Any] = {"max_tokens": self.max_tokens}
        for name in self._OPTIONAL:
            value = getattr(self, name)
            if value is not None:
                body[name] = value
        if self.raw:
            body["raw"] = True
        if self.stop:
            body["stop"] = self.stop
        if self.logit_bias:
            body["logit_bias"] = [list(pair) for pair in self.logit_bias]
        if self.tools:
            body["tools"] = self.tools
            body["tool_choice"] = self.tool_choice
            body["parallel_tool_calls"] = self.parallel_tool_calls
        if self.resume_tokens or self.failovers:
            body["resume"] = {"tokens": self.resume_tokens, "failovers": self.failovers}
        return p.pack(body)

    def chat_messages(self) -> list[Message]:
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
            min_p=_number(fields.get("min_p"), "min_p", 0.0, 1.0),
            presence_penalty=_number(fields.get("presence_penalty"), "presence_penalty", -2.0, 2.0),
            frequency_penalty=_number(fields.get("frequency_penalty"), "frequency_penalty", -2.0, 2.0),
            logit_bias=_logit_bias(fields.get("logit_bias")),
            logprobs=None
            if fields.get("logprobs") is None
            else _int(fields["logprobs"], "logprobs", 0, MAX_TOP_LOGPROBS),
            json_schema=_schema(fields.get("json_schema"), "json_schema"),
            tools=_tools(fields.get("tools")),
            tool_choice=fields.get("tool_choice", "auto"),
            parallel_tool_calls=_optional(fields, "parallel_tool_calls", bool) is not False,
            stream=_stream(fields.get("stream")),
        )
        _tool_choice(request.tool_choice, request.tools)
        if request.tools and request.json_schema is not None:
            raise BadRequest("give 'tools' or 'json_schema', not both: each decides the shape of the answer")
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


# ------------------------------------------------------------------------------------------------ embeddings

MAX_EMBED_INPUTS = 2048  # texts in one embeddings request (OpenAI's limit too)
MAX_EMBED_CHARS = MAX_PROMPT_CHARS  # the texts of one embeddings request together


@dataclass(slots=True)
class EmbeddingRequest:
    """Texts to embed, ``{"embed": [str, ...]}``: the worker answers with one vector per text, in order."""

    inputs: list[str]

    def to_body(self) -> bytes:
        return p.pack({"embed": self.inputs})

    @classmethod
    def from_fields(cls, fields: dict[str, Any]) -> EmbeddingRequest:
        """Check an embeddings body's msgpack map: ``embed`` and nothing else (never a mix with a generation)."""
        others = set(fields) - {"embed"}
        if others:
            names = ", ".join(sorted(map(str, others)))
            raise BadRequest(f"an embeddings request has 'embed' only, not a generation's fields ({names})")
        inputs = fields["embed"]
        if not isinstance(inputs, list) or not 0 < len(inputs) <= MAX_EMBED_INPUTS:
            raise BadRequest(f"'embed' must be a list of 1-{MAX_EMBED_INPUTS} texts")
        if not all(isinstance(text, str) and text for text in inputs):
            raise BadRequest("'embed' must hold non-empty strings")
        if sum(map(len, inputs)) > MAX_EMBED_CHARS:
            raise BadRequest(f"the texts of 'embed' are longer than {MAX_EMBED_CHARS} characters together")
        return cls(inputs)


def request_from_body(body: list[bytes]) -> GenerationRequest | EmbeddingRequest:
    """Parse a request body of either kind: a map with ``embed`` is an embeddings request, anything else a
    generation (a plain MDP client's body too: ``GenerationRequest.from_body``)."""
    try:
        fields = p.unpack(body[0]) if body else None
    except p.ProtocolError:
        fields = None
    if isinstance(fields, dict):
        return EmbeddingRequest.from_fields(fields) if "embed" in fields else GenerationRequest.from_fields(fields)
    return GenerationRequest.from_body(body)


def pack_vector(vector: Sequence[float]) -> bytes:
    """A vector as an embeddings FINAL carries it: little-endian float32, 4 bytes a dimension (what OpenAI's
    ``encoding_format: base64`` holds too), a third of msgpack's 9-byte float64s."""
    packed = array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def unpack_vector(data: bytes) -> list[float]:
    """The floats of ``pack_vector``'s bytes; ValueError if they are not a whole number of float32s."""
    if len(data) % 4:
        raise ValueError(f"{len(data)} bytes are not a whole number of float32s")
    vector = array("f")
    vector.frombytes(data)
    if sys.byteorder == "big":
        vector.byteswap()
    return vector.tolist()


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


def _messages(value: Any) -> list[Message] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty list")
    total = 0
    calls: set[str] = set()  # ids of the tool calls made so far: a tool result answers one of them
    for index, message in enumerate(value):
        where = f"messages[{index}]"
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise BadRequest(f"{where} must be {{'role': system|user|assistant|tool, 'content': str, ...}}")
        role = message["role"]
        allowed = {"role", "content"} | {"assistant": {"tool_calls"}, "tool": {"tool_call_id"}}.get(role, set())
        if set(message) - allowed:
            raise BadRequest(
                f"{where}: unknown field(s) for a {role} message: {', '.join(sorted(set(message) - allowed))}"
            )
        if role == "assistant" and "tool_calls" in message:
            calls.update(_tool_calls(message["tool_calls"], where))
        if role == "tool" and message.get("tool_call_id") not in calls:
            raise BadRequest(
                f"{where}: a tool result must answer an earlier tool call (its 'tool_call_id' matches none)"
            )
        total += len(message["content"])
    if total > MAX_PROMPT_CHARS:
        raise BadRequest(f"'messages' are longer than {MAX_PROMPT_CHARS} characters")
    return value


def _tool_calls(value: Any, where: str) -> list[str]:
    """An assistant turn's tool calls, ``[{"id", "name", "arguments": JSON text}]``; their ids."""
    if not isinstance(value, list) or not value:
        raise BadRequest(f"{where}.tool_calls must be a non-empty list")
    for call in value:
        if (
            not isinstance(call, dict)
            or set(call) != {"id", "name", "arguments"}
            or not all(isinstance(call[key], str) for key in call)
        ):
            raise BadRequest(f"{where}.tool_calls: each is {{'id': str, 'name': str, 'arguments': str}}")
    return [call["id"] for call in value]


def _stream(value: Any) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, bytes) or not 0 < len(value) <= p.MAX_STREAM_ID_LEN:
        raise BadRequest(f"'stream' must be 1-{p.MAX_STREAM_ID_LEN} bytes")
    return value


def _logit_bias(value: Any) -> list[tuple[int, float]]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_LOGIT_BIAS:
        raise BadRequest(f"'logit_bias' must be a list of at most {MAX_LOGIT_BIAS} [token id, bias] pairs")
    pairs = []
    for pair in value:
        if not isinstance(pair, list) or len(pair) != 2:
            raise BadRequest("'logit_bias' must be a list of [token id, bias] pairs")
        token = _int(pair[0], "logit_bias token id", 0, 2**31 - 1)
        bias = _number(pair[1], "logit_bias bias", -100.0, 100.0)
        assert bias is not None
        pairs.append((token, bias))
    return pairs


def _schema(value: Any, name: str) -> dict[str, Any] | None:
    """A JSON schema, as far as a body can check it (llama-server checks the rest and says what is wrong)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise BadRequest(f"'{name}' must be a JSON schema object")
    if len(p.pack(value)) > MAX_SCHEMA_BYTES:
        raise BadRequest(f"'{name}' is larger than {MAX_SCHEMA_BYTES} bytes")
    return value


def _tools(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not value or len(value) > MAX_TOOLS:
        raise BadRequest(f"'tools' must be a list of 1-{MAX_TOOLS} functions")
    names = set()
    for index, tool in enumerate(value):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or "name" not in tool or set(tool) - {"name", "description", "parameters"}:
            raise BadRequest(f"{where} must be {{'name': str, 'description': str, 'parameters': JSON schema}}")
        name = tool["name"]
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TOOL_NAME or set(name) - TOOL_NAME_CHARS:
            raise BadRequest(f"{where}.name must be 1-{MAX_TOOL_NAME} letters, digits, '_' or '-'")
        if name in names:
            raise BadRequest(f"{where}.name: two tools are called {name!r}")
        names.add(name)
        if not isinstance(tool.get("description", ""), str):
            raise BadRequest(f"{where}.description must be a string")
        _schema(tool.get("parameters"), f"{where}.parameters")
    return value


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> None:
    if value in TOOL_CHOICES:
        if value == "required" and not tools:
            raise BadRequest("'tool_choice' is 'required' but there are no 'tools'")
        return
    names = {tool["name"] for tool in tools}
    if not isinstance(value, dict) or set(value) != {"name"} or value["name"] not in names:
        raise BadRequest("'tool_choice' must be auto, none, required or {'name': one of the tools}")


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
