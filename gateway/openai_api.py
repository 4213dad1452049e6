"""OpenAI request bodies in, QMesh requests out; QMesh results in, OpenAI response objects out.

Only what QMesh can honour is accepted: unknown fields are ignored (clients send many), but options QMesh
cannot serve (``n`` > 1, tools, logprobs, echo, token-id prompts) are a 400 naming the parameter rather than
being silently dropped.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from qmesh.client.sdk import Result
from qmesh.common.bodies import DEFAULT_MAX_TOKENS, MAX_STOPS, MAX_TOKENS_LIMIT
from qmesh.common.protocol import MAX_SESSION_LEN
from qmesh.gateway.errors import bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(slots=True)
class OpenAIRequest:
    """A parsed ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` (``text``) request."""

    chat: bool
    model: str
    options: dict[str, Any]  # keyword arguments of QMeshClient.submit, except model
    stream: bool = False
    include_usage: bool = False
    id: str = field(default="")
    created: int = 0

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    # --------------------------------------------------------------------------------- response objects

    def response(self, text: str, result: Result) -> dict[str, Any]:
        """The whole answer (``stream: false``)."""
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=_finish_reason(result))
        return {**self._envelope(""), "choices": [choice], "usage": usage(result)}

    def first_chunk(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role, as OpenAI's do."""
        return self.chunk("", role=True) if self.chat else None

    def chunk(self, text: str, role: bool = False, finish: str | None = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
            if text and not role:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text}
        choice.update(logprobs=None, finish_reason=finish)
        chunk = {**self._envelope(".chunk"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def last_chunk(self, result: Result) -> dict[str, Any]:
        return self.chunk("", finish=_finish_reason(result))

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        return {**self._envelope(".chunk"), "choices": [], "usage": usage(result)}

    def _envelope(self, suffix: str) -> dict[str, Any]:
        kind = "chat.completion" + suffix if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}


def usage(result: Result) -> dict[str, Any]:
    prompt = result.prompt_tokens if isinstance(result.prompt_tokens, int) else 0
    cached = result.cached_tokens if isinstance(result.cached_tokens, int) else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": result.tokens,
        "total_tokens": prompt + result.tokens,
        "prompt_tokens_details": {"cached_tokens": cached},  # served from the llama-server's prompt cache
    }


def _finish_reason(result: Result) -> str:
    return "length" if result.finish_reason == "length" else "stop"


# ------------------------------------------------------------------------------------------ parsing


def parse_chat(body: Any, session: str | None = None) -> OpenAIRequest:
    """``session``: the ``X-Session-Id`` header, which names the conversation (else the body's ``user``)."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    converted = [_message(message, index) for index, message in enumerate(messages)]
    if body.get("tools") or body.get("functions"):
        raise bad_request("tools and functions are not supported by QMesh", "tools")
    if body.get("logprobs"):
        raise bad_request("logprobs are not supported by QMesh", "logprobs")
    return _openai_request(body, chat=True, session=session, messages=converted)


def parse_text(body: Any, session: str | None = None) -> OpenAIRequest:
    body = _object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise bad_request("'prompt' must be a string (token ids and batches of prompts are not supported)", "prompt")
    if not prompt:
        raise bad_request("'prompt' is empty", "prompt")
    if body.get("echo"):
        raise bad_request("echo is not supported by QMesh", "echo")
    if body.get("logprobs") is not None:
        raise bad_request("logprobs are not supported by QMesh", "logprobs")
    return _openai_request(body, chat=False, session=session, prompt=prompt, raw=True)


def _openai_request(body: dict[str, Any], chat: bool, session: str | None, **prompt: Any) -> OpenAIRequest:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", "model")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("only n=1 is supported", "n")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    if stream_options and not stream:
        raise bad_request("'stream_options' is only allowed with 'stream': true", "stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    options: dict[str, Any] = {
        **prompt,
        "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else _int(max_tokens, param, 1, MAX_TOKENS_LIMIT),
        "temperature": _number(body.get("temperature"), "temperature", 0.0, 2.0),
        "top_p": _number(body.get("top_p"), "top_p", 0.0, 1.0),
        "seed": None if body.get("seed") is None else _int(body["seed"], "seed", -(2**63), 2**63 - 1),
        "stop": _stops(body.get("stop")),
        "session": _session(session, "X-Session-Id") if session is not None else _session(body.get("user"), "user"),
    }
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options")
    return OpenAIRequest(chat, model, options, stream=stream, include_usage=include_usage)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _message(message: Any, index: int) -> dict[str, str]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object", param)
    role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise bad_request(f"{param}.role must be one of {', '.join(ROLES)} (tools are not supported)", param)
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            raise bad_request(f"{param}.content: only text parts are supported", param)
        content = "".join(str(part.get("text", "")) for part in content)
    if not isinstance(content, str):
        raise bad_request(f"{param}.content must be a string or a list of text parts", param)
    return {"role": role, "content": content}


def _int(value: Any, name: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"'{name}' must be an integer from {low} to {high}", name)
    return value


def _number(value: Any, name: str, low: float, high: float) -> float | None:
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request(f"'{name}' must be a number from {low:g} to {high:g}", name)
    return float(value)


def _session(value: Any, name: str) -> str | None:
    """A conversation's name, which the broker keeps on one llama-server while load allows."""
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SESSION_LEN or not value.isprintable():
        raise bad_request(f"'{name}' must be 1-{MAX_SESSION_LEN} printable characters", name)
    return value


def _stops(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise bad_request(f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
    return stops
