"""OpenAI request bodies in, QMesh requests out; QMesh results in, OpenAI response objects out.

Every OpenAI field is either honoured or a 400 that names it, never silently dropped: tools and tool choice,
``response_format`` (JSON mode and JSON schemas), logprobs, ``n``, penalties and ``logit_bias`` are carried to the
worker (``QMeshClient.submit``); what QMesh cannot do (audio, token-id prompts, ``echo``, ``best_of`` > 1, ...) is
refused by name. Fields OpenAI documents as having no effect on the answer (``metadata``, ``store``, ``user`` as a
session name, ...) are accepted.
"""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from qmesh.client.sdk import Result
from qmesh.common.bodies import (
    DEFAULT_MAX_TOKENS,
    MAX_EMBED_CHARS,
    MAX_EMBED_INPUTS,
    MAX_STOPS,
    MAX_TOKENS_LIMIT,
    MAX_TOP_LOGPROBS,
    pack_vector,
)
from qmesh.common.protocol import MAX_SESSION_LEN
from qmesh.gateway.errors import bad_request

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_CHOICES = 16  # n: each choice is a request of its own, spread over free slots
MAX_LEGACY_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI bounds it
# OpenAI fields that change what is generated or returned and that QMesh cannot honour: refused by name.
UNSUPPORTED = ("audio", "modalities", "prediction", "web_search_options", "functions", "function_call", "suffix")


@dataclass(slots=True)
class OpenAIRequest:
    """A parsed ``/v1/chat/completions`` (``chat``) or ``/v1/completions`` (``text``) request."""

    chat: bool
    model: str
    options: dict[str, Any]  # keyword arguments of QMeshClient.submit, except model
    stream: bool = False
    include_usage: bool = False
    n: int = 1  # choices: each is a request of its own
    id: str = field(default="")
    created: int = 0

    def __post_init__(self) -> None:
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    # --------------------------------------------------------------------------------- response objects

    def response(self, choices: list[Answer]) -> dict[str, Any]:
        """The whole answer (``stream: false``), one choice per answer."""
        return {
            **self._envelope(""),
            "choices": [self._whole_choice(index, answer) for index, answer in enumerate(choices)],
            "usage": usage([answer.result for answer in choices]),
        }

    def _whole_choice(self, index: int, answer: Answer) -> dict[str, Any]:
        result = answer.result
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": answer.text}
            if result.tool_calls:
                message.update(content=None, tool_calls=_tool_calls(result.tool_calls))
            choice: dict[str, Any] = {"index": index, "message": message}
        else:
            choice = {"index": index, "text": answer.text}
        choice.update(logprobs=self._logprobs(answer.logprobs), finish_reason=_finish_reason(result))
        return choice

    def first_chunk(self, index: int) -> dict[str, Any] | None:
        """Chat streams open each choice with the assistant role, as OpenAI's do."""
        return self.chunk(index, "", role=True) if self.chat else None

    def chunk(
        self,
        index: int,
        text: str,
        logprobs: list[dict[str, Any]] | None = None,
        role: bool = False,
        finish: str | None = None,
        tool_calls: list[dict[str, str]] | None = None,
    ) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else {}
            if text and not role:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(_tool_calls(tool_calls))]
            choice: dict[str, Any] = {"index": index, "delta": delta}
        else:
            choice = {"index": index, "text": text}
        choice.update(logprobs=self._logprobs(logprobs) if logprobs else None, finish_reason=finish)
        chunk = {**self._envelope(".chunk"), "choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def last_chunks(self, index: int, result: Result) -> list[dict[str, Any]]:
        """A choice's calls (streamed whole: they are parsed once the answer is complete), then its end."""
        chunks = [self.chunk(index, "", tool_calls=result.tool_calls)] if result.tool_calls and self.chat else []
        return [*chunks, self.chunk(index, "", finish=_finish_reason(result))]

    def usage_chunk(self, results: list[Result]) -> dict[str, Any]:
        return {**self._envelope(".chunk"), "choices": [], "usage": usage(results)}

    def _logprobs(self, entries: list[dict[str, Any]] | None) -> dict[str, Any] | None:
        """QMesh's per-token log-probabilities in OpenAI's shape: chat's ``content`` list, or the legacy lists."""
        if self.options.get("logprobs") is None or entries is None:
            return None
        if self.chat:
            return {"content": [_chat_logprob(entry) for entry in entries], "refusal": None}
        offsets, at = [], 0
        for entry in entries:
            offsets.append(at)
            at += len(entry["token"])
        return {
            "tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [{top["token"]: top["logprob"] for top in entry["top"]} for entry in entries],
            "text_offset": offsets,
        }

    def _envelope(self, suffix: str) -> dict[str, Any]:
        kind = "chat.completion" + suffix if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}


@dataclass(slots=True)
class Answer:
    """One choice, whole: its text, its tokens' log-probabilities (when asked for) and its result."""

    text: str
    logprobs: list[dict[str, Any]]
    result: Result


def usage(results: list[Result]) -> dict[str, Any]:
    """Usage of a request's choices: the prompt counted once (it is the same prompt), completions summed."""
    first = results[0]
    prompt = first.prompt_tokens if isinstance(first.prompt_tokens, int) else 0
    cached = first.cached_tokens if isinstance(first.cached_tokens, int) else 0
    completion = sum(result.tokens for result in results)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},  # served from the llama-server's prompt cache
    }


def _tool_calls(calls: list[dict[str, str]]) -> list[dict[str, Any]]:
    return [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
        for call in calls
    ]


def _chat_logprob(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "token": entry["token"],
        "logprob": entry["logprob"],
        "bytes": entry["bytes"],
        "top_logprobs": [{"token": t["token"], "logprob": t["logprob"], "bytes": t["bytes"]} for t in entry["top"]],
    }


def _finish_reason(result: Result) -> str:
    return result.finish_reason if result.finish_reason in ("length", "tool_calls") else "stop"


# ------------------------------------------------------------------------------------------ parsing


def parse_chat(body: Any, session: str | None = None) -> OpenAIRequest:
    """``session``: the ``X-Session-Id`` header, which names the conversation (else the body's ``user``)."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of messages", "messages")
    converted = [_message(message, index) for index, message in enumerate(messages)]
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad_request("'logprobs' must be a boolean", "logprobs")
    top = body.get("top_logprobs")
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    tools = _tools(body.get("tools"))
    fields: dict[str, Any] = {
        "messages": converted,
        "logprobs": (0 if top is None else _int(top, "top_logprobs", 0, MAX_TOP_LOGPROBS)) if logprobs else None,
        "json_schema": _response_format(body.get("response_format")),
    }
    if tools:
        fields.update(
            tools=tools,
            tool_choice=_tool_choice(body.get("tool_choice", "auto"), tools),
            parallel_tool_calls=_bool(body.get("parallel_tool_calls", True), "parallel_tool_calls"),
        )
        if fields["json_schema"] is not None:
            raise bad_request("give 'tools' or a JSON 'response_format', not both", "response_format")
    elif body.get("tool_choice") not in (None, "none"):
        raise bad_request("'tool_choice' needs 'tools'", "tool_choice")
    return _openai_request(body, chat=True, session=session, **fields)


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
    if body.get("best_of") not in (None, 1):
        raise bad_request("best_of is not supported by QMesh (use n)", "best_of")
    logprobs = body.get("logprobs")
    logprobs = None if logprobs is None else _int(logprobs, "logprobs", 0, MAX_LEGACY_LOGPROBS)
    return _openai_request(body, chat=False, session=session, prompt=prompt, raw=True, logprobs=logprobs)


def _openai_request(body: dict[str, Any], chat: bool, session: str | None, **prompt: Any) -> OpenAIRequest:
    model = _model(body)
    for name in UNSUPPORTED:
        if body.get(name) is not None:
            raise bad_request(f"'{name}' is not supported by QMesh", name)
    n = 1 if body.get("n") is None else _int(body["n"], "n", 1, MAX_CHOICES)
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
        "top_k": None if body.get("top_k") is None else _int(body["top_k"], "top_k", 0, 1_000_000),
        "min_p": _number(body.get("min_p"), "min_p", 0.0, 1.0),
        "presence_penalty": _number(body.get("presence_penalty"), "presence_penalty", -2.0, 2.0),
        "frequency_penalty": _number(body.get("frequency_penalty"), "frequency_penalty", -2.0, 2.0),
        "logit_bias": _logit_bias(body.get("logit_bias")),
        "session": _session(session, "X-Session-Id") if session is not None else _session(body.get("user"), "user"),
    }
    include_usage = stream_options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", "stream_options")
    return OpenAIRequest(chat, model, options, stream=stream, include_usage=include_usage, n=n)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string", "model")
    return model


def _message(message: Any, index: int) -> dict[str, Any]:
    """An OpenAI message as the mesh carries it (``name`` is dropped: it does not change the answer)."""
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object", param)
    role = ROLES.get(message.get("role"))  # type: ignore[arg-type]
    if role is None:
        raise bad_request(f"{param}.role must be one of {', '.join(ROLES)}", param)
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
            raise bad_request(f"{param}.content: only text parts are supported", param)
        content = "".join(str(part.get("text", "")) for part in content)
    calls = message.get("tool_calls") if role == "assistant" else None
    if content is None and calls:
        content = ""  # an assistant turn that only called tools
    if not isinstance(content, str):
        raise bad_request(f"{param}.content must be a string or a list of text parts", param)
    converted: dict[str, Any] = {"role": role, "content": content}
    if calls:
        converted["tool_calls"] = [_past_call(call, f"{param}.tool_calls[{i}]") for i, call in enumerate(calls)]
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise bad_request(f"{param}.tool_call_id must be the id of the call it answers", param)
        converted["tool_call_id"] = call_id
    return converted


def _past_call(call: Any, param: str) -> dict[str, str]:
    function = call.get("function") if isinstance(call, dict) else None
    if (
        not isinstance(function, dict)
        or call.get("type", "function") != "function"
        or not isinstance(call.get("id"), str)
        or not isinstance(function.get("name"), str)
        or not isinstance(function.get("arguments"), str)
    ):
        raise bad_request(f"{param} must be {{id, type: function, function: {{name, arguments: str}}}}", param)
    return {"id": call["id"], "name": function["name"], "arguments": function["arguments"]}


def _tools(value: Any) -> list[dict[str, Any]]:
    """OpenAI's ``[{"type": "function", "function": {name, description, parameters}}]`` as the mesh carries it."""
    if value is None:
        return []
    if not isinstance(value, list) or not value:
        raise bad_request("'tools' must be a non-empty list of functions", "tools")
    tools = []
    for index, tool in enumerate(value):
        param = f"tools[{index}]"
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type") != "function":
            raise bad_request(f"{param} must be {{type: function, function: {{name, description, parameters}}}}", param)
        converted = {key: function[key] for key in ("name", "description", "parameters") if key in function}
        if not isinstance(converted.get("parameters", {}), dict):
            raise bad_request(f"{param}.function.parameters must be a JSON schema object", param)
        tools.append(converted)
    return tools


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | dict[str, str]:
    if value in ("auto", "none", "required"):
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if isinstance(function, dict) and value.get("type") == "function":
        name = function.get("name")
        if name in {tool.get("name") for tool in tools}:
            return {"name": name}
    raise bad_request("'tool_choice' must be auto, none, required or {type: function, function: {name}}", "tool_choice")


def _response_format(value: Any) -> dict[str, Any] | None:
    """``response_format`` as the JSON schema the answer must match (None: free text)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise bad_request("'response_format.json_schema.schema' must be a JSON schema object", "response_format")
        return schema
    raise bad_request("'response_format.type' must be text, json_object or json_schema", "response_format")


def _logit_bias(value: Any) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not all(isinstance(k, str) and k.isdigit() for k in value):
        raise bad_request("'logit_bias' must map token ids to biases from -100 to 100", "logit_bias")
    return {int(token): _number(bias, "logit_bias", -100.0, 100.0) or 0.0 for token, bias in value.items()}


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean", name)
    return value


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


# ------------------------------------------------------------------------------------------ embeddings


@dataclass(slots=True)
class EmbeddingsRequest:
    """A parsed ``/v1/embeddings`` request."""

    model: str
    inputs: list[str]
    base64: bool = False  # encoding_format base64: each vector as base64 of its little-endian float32s
    dimensions: int | None = None

    def response(self, result: Result) -> dict[str, Any]:
        """The vectors in OpenAI's shape. ``dimensions`` other than the model's size is a 400 naming it (QMesh does
        not shorten vectors; the size is known once they come back)."""
        vectors = result.embeddings or []
        size = len(vectors[0]) if vectors else 0
        if self.dimensions is not None and self.dimensions != size:
            message = f"'dimensions' is {self.dimensions}, but {self.model} makes vectors of {size}"
            raise bad_request(message + " (QMesh cannot shorten them)", "dimensions")
        data = [{"object": "embedding", "index": i, "embedding": self._encoded(v)} for i, v in enumerate(vectors)]
        tokens = result.prompt_tokens or 0
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": self.model, "usage": usage}

    def _encoded(self, vector: list[float]) -> list[float] | str:
        return base64.b64encode(pack_vector(vector)).decode("ascii") if self.base64 else vector


def parse_embeddings(body: Any) -> EmbeddingsRequest:
    body = _object(body)
    model = _model(body)
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not all(isinstance(text, str) for text in inputs):
        raise bad_request("'input' must be a string or a list of strings (token ids are not supported)", "input")
    if not 0 < len(inputs) <= MAX_EMBED_INPUTS or not all(inputs):
        raise bad_request(f"'input' must be 1-{MAX_EMBED_INPUTS} non-empty strings", "input")
    if sum(map(len, inputs)) > MAX_EMBED_CHARS:
        raise bad_request(f"'input' is longer than {MAX_EMBED_CHARS} characters in all", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None:
        dimensions = _int(dimensions, "dimensions", 1, 1_000_000)
    return EmbeddingsRequest(model, inputs, base64=encoding == "base64", dimensions=dimensions)
