"""Tool calls for any GGUF model: the tools described to the model, its answer constrained to a JSON shape.

Most small models' chat templates know nothing of tools (llama-server's ``chat_template_caps`` says so), so QMesh
describes the tools in the system message and constrains the answer with a JSON schema (llama-server turns it into
a grammar): either ``{"content": "..."}``, a reply in words, or ``{"tool_calls": [{"name", "arguments"}]}``, as
``tool_choice`` allows, each call's arguments matching that function's parameters. The answer is then taken apart:
a reply's text is streamed as it is decoded (``ContentDecoder``), calls are parsed at the end (``parse_answer``).
Earlier turns are written the same way, so the model sees its own past calls in the shape it must answer in.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from qmesh.common.bodies import GenerationRequest, Message

ANY_OBJECT: dict[str, Any] = {"type": "object"}


def answer_schema(request: GenerationRequest) -> dict[str, Any]:
    """The JSON schema the answer must match, from the tools and ``tool_choice``."""
    tools = request.tools
    if isinstance(request.tool_choice, dict):
        tools = [tool for tool in tools if tool["name"] == request.tool_choice["name"]]
    calls = {
        "type": "array",
        "items": {"anyOf": [_call_schema(tool) for tool in tools]},
        "minItems": 1,
    }
    if not request.parallel_tool_calls or isinstance(request.tool_choice, dict):
        calls["maxItems"] = 1
    calling = _object({"tool_calls": calls})
    if request.tool_choice == "auto":
        return {"anyOf": [_object({"content": {"type": "string"}}), calling]}
    return calling


def tool_messages(request: GenerationRequest, describe: bool) -> list[Message]:
    """The conversation as the model is shown it: the tools in the system message (``describe``), past calls and
    results as text in the answer's shape (a template without tool roles renders them like any turn)."""
    messages = request.chat_messages()
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    rest = messages[1:] if system else messages
    if describe:
        system = f"{system}\n\n{_describe(request)}" if system else _describe(request)
    names: dict[str, str] = {}
    shown: list[Message] = [{"role": "system", "content": system}] if system else []
    for message in rest:
        if message["role"] == "assistant" and "tool_calls" in message:
            calls = []
            for call in message["tool_calls"]:
                names[call["id"]] = call["name"]
                calls.append({"name": call["name"], "arguments": _arguments(call["arguments"])})
            shown.append({"role": "assistant", "content": json.dumps({"tool_calls": calls})})
        elif message["role"] == "tool":
            name = names.get(message["tool_call_id"], "the tool")
            shown.append({"role": "user", "content": f"Result of {name}: {message['content']}"})
        else:
            shown.append({"role": message["role"], "content": message["content"]})
    return shown


def parse_answer(text: str) -> tuple[str | None, list[dict[str, str]] | None]:
    """(reply, None) or (None, calls) from the model's whole JSON answer; calls as ``{"id", "name", "arguments":
    JSON text}``. An answer cut short (max_tokens) is (what was decoded of a reply, None)."""
    try:
        answer = json.loads(text)
    except ValueError:
        decoder = ContentDecoder()
        return decoder.feed(text), None
    if "tool_calls" in answer:
        calls = [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "name": call["name"], "arguments": json.dumps(call["arguments"])}
            for call in answer["tool_calls"]
        ]
        return None, calls
    return answer.get("content", ""), None


class ContentDecoder:
    """Streams the text of a ``{"content": "..."}`` answer as its JSON arrives in pieces (nothing for calls)."""

    _START = re.compile(r'\s*\{\s*"(content|tool_calls)"\s*:\s*("?)')
    _ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}

    def __init__(self) -> None:
        self._pending = ""  # raw text not decoded yet
        self._state = "start"  # start, text (inside the reply's string), done

    def feed(self, raw: str) -> str:
        """The reply's text that ``raw`` (the next piece of the answer) completes."""
        self._pending += raw
        if self._state == "start":
            match = self._START.match(self._pending)
            if match is None or match.group(1) == "content" and not match.group(2):
                return ""  # the key (and the string's opening quote) have not arrived yet
            self._pending = self._pending[match.end() :]
            self._state = "text" if match.group(1) == "content" else "done"
        if self._state != "text":
            return ""
        return self._decode()

    def _decode(self) -> str:
        out: list[str] = []
        text, i = self._pending, 0
        while i < len(text):
            char = text[i]
            if char == '"':
                self._state = "done"
                i = len(text)
                break
            if char != "\\":
                out.append(char)
                i += 1
                continue
            if i + 1 >= len(text):
                break  # the escape's second character has not arrived
            code = text[i + 1]
            if code != "u":
                out.append(self._ESCAPES.get(code, code))
                i += 2
                continue
            unit = _unicode_escape(text, i)
            if unit is None:
                break  # an incomplete \\uXXXX (or the second half of a surrogate pair) is still on its way
            char, length = unit
            out.append(char)
            i += length
        self._pending = text[i:]
        return "".join(out)


def _unicode_escape(text: str, at: int) -> tuple[str, int] | None:
    """The character of the ``\\uXXXX`` escape at ``at`` (joining a surrogate pair) and its length in ``text``."""
    if at + 6 > len(text):
        return None
    code = int(text[at + 2 : at + 6], 16)
    if 0xD800 <= code < 0xDC00:  # a high surrogate: its partner follows
        if at + 12 > len(text):
            return None
        low = int(text[at + 8 : at + 12], 16)
        return chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)), 12
    return chr(code), 6


def _call_schema(tool: dict[str, Any]) -> dict[str, Any]:
    return _object({"name": {"const": tool["name"]}, "arguments": tool.get("parameters") or ANY_OBJECT})


def _object(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _describe(request: GenerationRequest) -> str:
    choice = request.tool_choice
    if isinstance(choice, dict):
        how = f'Call the tool {choice["name"]}: answer with {{"tool_calls": [{{"name": ..., "arguments": {{...}}}}]}}.'
    elif choice == "required":
        how = 'Call one or more tools: answer with {"tool_calls": [{"name": ..., "arguments": {...}}]}.'
    else:
        how = (
            'Answer with one JSON object: {"content": "..."} to reply in words, or '
            '{"tool_calls": [{"name": ..., "arguments": {...}}]} to call tools.'
        )
    lines = [f"You can call tools. {how}", "Tools:"]
    for tool in request.tools:
        parameters = json.dumps(tool.get("parameters") or ANY_OBJECT)
        lines.append(f"- {tool['name']}: {tool.get('description', '')} Parameters (JSON schema): {parameters}")
    return "\n".join(lines)


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
