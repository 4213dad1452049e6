"""HTTP client for one llama-server, speaking its native API (``/completion``, ``/apply-template``, ...).

Chat is rendered with the model's own template by ``/apply-template`` and then completed like any prompt, so
chat and plain completion share one code path and one result shape. ``return_tokens`` makes every streamed
chunk carry its token ids, which the mesh forwards alongside the text.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import re
import select
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
import sseclient

from qmesh.common.errors import PromptTooLong, SidecarError, SidecarRefused

log = logging.getLogger(__name__)

Prompt = str | list[int]

# llama-server's stop_type -> the reason reported to callers; other values pass through unchanged.
_STOP_REASONS = {"eos": "stop", "word": "stop", "limit": "length"}
STOP_CANCELLED = "cancelled"  # stop_reason of a stream closed early
_JSON_HEADERS = {"Content-Type": "application/json"}
_HEALTH_TIMEOUT = 5.0  # /health answers at once even while loading; a slower answer means "not healthy"
# llama-server says an input longer than its batch (the worker makes a batch one slot's context) in words only, as a 500
_INPUT_TOO_LONG = re.compile(r"input \((\d+) tokens\) is too large to process.*current batch size: (\d+)")


@dataclass
class CompletionChunk:
    """A piece of a streamed completion: its text, the token ids that produced it and, when asked for
    (``n_probs``), llama-server's ``completion_probabilities`` for those tokens."""

    text: str
    token_ids: list[int]
    probabilities: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Completion:
    """A finished completion. ``stop_reason`` is "stop" (end of text or stop word), "length" or "cancelled"."""

    text: str
    token_ids: list[int]
    tokens_predicted: int
    tokens_evaluated: int
    stop_reason: str
    timings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Embedded:
    """The pooled embedding of each input, in input order, and how many tokens the inputs were together."""

    vectors: list[list[float]]
    prompt_tokens: int


class CompletionStream:
    """Iterates the chunks (:class:`CompletionChunk`) of a streamed completion; ``.result`` holds the
    :class:`Completion` after.

    Closing the stream early (from any thread) shuts the connection, which is how llama-server learns to stop
    generating and free the slot; ``.result`` then holds what was received, with stop_reason "cancelled", and
    an iteration in progress ends quietly. ``on_done`` is called once with the result (not if the stream fails).
    """

    def __init__(
        self,
        response: requests.Response,
        url: str,
        on_done: Callable[[Completion], None] | None = None,
    ) -> None:
        self._response = response
        self._url = url
        self._on_done = on_done
        self._events = sseclient.SSEClient(response.iter_content(chunk_size=None)).events()
        self._texts: list[str] = []
        self._token_ids: list[int] = []
        self._lock = threading.Lock()
        self._closed = False
        self.result: Completion | None = None

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._texts)

    def __iter__(self) -> Iterator[CompletionChunk]:
        while self.result is None:
            chunk = self._next_chunk()
            if chunk is not None:
                yield chunk

    def _next_chunk(self) -> CompletionChunk | None:
        """Read one event; None for events that carry nothing, the final one, and a read cut by close()."""
        try:
            event = next(self._events)
        except Exception as exc:  # a read cut by close() in another thread fails in assorted ways
            if self._closed:
                return None
            self._response.close()
            if isinstance(exc, StopIteration):
                raise SidecarError(f"llama-server stream from {self._url} ended before its final event") from None
            if isinstance(exc, requests.RequestException):
                raise SidecarError(f"llama-server stream from {self._url} broke: {exc}") from exc
            raise
        if event.data.strip() == "[DONE]":
            return None
        payload = _parse_event(event.data, self._url)
        if "error" in payload:
            self._response.close()
            raise _error_from_body(payload, self._url, status=None)
        text = payload.get("content") or ""
        tokens = list(payload.get("tokens") or [])
        with self._lock:  # a result taken by close() in another thread has everything that was yielded
            if self.result is not None:
                return None
            self._texts.append(text)
            self._token_ids.extend(tokens)
        if payload.get("stop"):
            self._finish(payload, stop_reason=_stop_reason(payload.get("stop_type", "none")))
            self._response.close()
        if not text and not tokens:
            return None
        return CompletionChunk(text=text, token_ids=tokens, probabilities=payload.get("completion_probabilities") or [])

    def _finish(self, final: dict[str, Any], stop_reason: str) -> None:
        with self._lock:
            if self.result is not None:
                return
            self.result = Completion(
                text=self.text,
                token_ids=list(self._token_ids),
                tokens_predicted=int(final.get("tokens_predicted", len(self._token_ids))),
                tokens_evaluated=int(final.get("tokens_evaluated", 0)),
                stop_reason=stop_reason,
                timings=dict(final.get("timings") or {}),
            )
        if self._on_done is not None:
            self._on_done(self.result)

    def close(self) -> None:
        """Stop reading; llama-server sees the connection close and stops generating. Idempotent."""
        self._finish({}, stop_reason=STOP_CANCELLED)
        self._closed = True
        # Shutting the socket down wakes a reader blocked in another thread; closing alone would not.
        sock = getattr(getattr(self._response.raw, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._response.close()

    def __enter__(self) -> CompletionStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LlamaHttpClient:
    """Talks to one llama-server at ``base_url``; every call has a connect and a read timeout."""

    def __init__(self, base_url: str, *, connect_timeout: float = 2.0, read_timeout: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = (connect_timeout, read_timeout)
        self._session = requests.Session()  # streams
        address = urllib.parse.urlsplit(self.base_url)
        self._address = (address.hostname or "127.0.0.1", address.port or 80)
        self._local = threading.local()  # each thread's kept-alive connection for calls answered whole
        self._connections: list[http.client.HTTPConnection] = []
        self._connections_lock = threading.Lock()

    def health_check(self) -> bool:
        """True when llama-server answers /health with 200 (model loaded); never raises."""
        connect_timeout, read_timeout = self._timeout
        try:
            response = self._session.get(
                f"{self.base_url}/health", timeout=(connect_timeout, min(read_timeout, _HEALTH_TIMEOUT))
            )
        except requests.RequestException:
            return False
        return response.status_code == 200

    def props(self) -> dict[str, Any]:
        """Server properties: ``total_slots``, ``model_path``, ``default_generation_settings``, ..."""
        return self._call("GET", "/props")

    def slot_context(self) -> int:
        """Tokens of context each slot has (prompt and answer together)."""
        return int(self.props()["default_generation_settings"]["n_ctx"])

    def slots(self) -> list[dict[str, Any]]:
        """One entry per slot, each with ``id`` and ``is_processing``."""
        return self._call("GET", "/slots")

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self._call("POST", "/tokenize", {"content": text, "add_special": add_special})["tokens"]

    def detokenize(self, ids: list[int]) -> str:
        return self._call("POST", "/detokenize", {"tokens": ids})["content"]

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt the model's chat template renders for ``messages``, ready for the assistant's turn."""
        return self._call("POST", "/apply-template", {"messages": messages})["prompt"]

    def generate(self, prompt: Prompt, **opts: Any) -> Completion:
        """Complete ``prompt`` (text or token ids). Options: max_tokens, temperature, seed, stop, top_k, top_p."""
        body = _completion_body(prompt, stream=False, **opts)
        payload = self._call("POST", "/completion", body)
        return Completion(
            text=payload.get("content", ""),
            token_ids=list(payload.get("tokens") or []),
            tokens_predicted=int(payload.get("tokens_predicted", 0)),
            tokens_evaluated=int(payload.get("tokens_evaluated", 0)),
            stop_reason=_stop_reason(payload.get("stop_type", "none")),
            timings=dict(payload.get("timings") or {}),
        )

    def generate_stream(
        self, prompt: Prompt, *, on_done: Callable[[Completion], None] | None = None, **opts: Any
    ) -> CompletionStream:
        """Like :meth:`generate`, streamed; close the stream to cancel the generation."""
        body = _completion_body(prompt, stream=True, **opts)
        url = f"{self.base_url}/completion"
        response = self._stream("POST", url, body)
        return CompletionStream(response, url, on_done=on_done)

    def chat(self, messages: list[dict[str, str]], **opts: Any) -> Completion:
        return self.generate(self.apply_template(messages), **opts)

    def chat_stream(
        self,
        messages: list[dict[str, str]],
        *,
        on_done: Callable[[Completion], None] | None = None,
        **opts: Any,
    ) -> CompletionStream:
        return self.generate_stream(self.apply_template(messages), on_done=on_done, **opts)

    def embed(self, inputs: list[str]) -> Embedded:
        """Embed ``inputs`` (``/v1/embeddings`` of a llama-server started with ``--embeddings`` and a pooling). An
        input longer than one batch raises PromptTooLong (with its tokens and the batch size)."""
        try:
            payload = self._call("POST", "/v1/embeddings", {"input": inputs})
        except SidecarError as exc:
            too_long = _INPUT_TOO_LONG.search(str(exc))
            if too_long is None:
                raise
            raise PromptTooLong(int(too_long[1]), int(too_long[2])) from exc
        try:
            vectors = [item["embedding"] for item in sorted(payload["data"], key=lambda item: item["index"])]
            prompt_tokens = int(payload["usage"]["prompt_tokens"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SidecarError(f"llama-server sent an unexpected embeddings answer: {str(payload)[:200]}") from exc
        # Without pooling llama-server sends a vector per token (a list of lists): not what was asked for.
        if len(vectors) != len(inputs) or not all(v and isinstance(v, list) and type(v[0]) is float for v in vectors):
            raise SidecarError(f"llama-server sent {len(vectors)} embeddings, not one pooled vector per input")
        return Embedded(vectors, prompt_tokens)

    def close(self) -> None:
        self._session.close()
        with self._connections_lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A call answered whole (``/apply-template`` before every chat's first token, ``/tokenize``...), on this
        thread's kept-alive ``http.client`` connection, which costs a fraction of the CPU requests spends on a call."""
        url = f"{self.base_url}{path}"
        data = None if body is None else json.dumps(body).encode()
        headers = _JSON_HEADERS if data is not None else {}
        for attempt in range(2):
            reused = False
            try:
                connection, reused = self._connection()
                connection.request(method, path, data, headers)
                response = connection.getresponse()
                raw = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self._local.connection.close()
                # a kept-alive connection the server had just closed: once more, on a new one
                if reused and attempt == 0 and isinstance(exc, (http.client.RemoteDisconnected, ConnectionError)):
                    continue
                raise SidecarError(f"llama-server at {url} could not be reached: {exc}") from exc
        try:
            payload = json.loads(raw)
        except ValueError as exc:
            if response.status < 400:
                raise SidecarError(f"llama-server sent non-JSON from {url}: {raw[:200]!r}") from exc
            payload = {"error": {"message": raw[:500].decode(errors="replace")}}
        if response.status >= 400:
            raise _error_from_body(payload, url, status=response.status)
        return payload

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a call before (opened again if the server closed it)."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None and not _readable(connection.sock):
            return connection, True  # open, and nothing to read: no close is pending
        if connection is None:
            connect_timeout, _ = self._timeout
            connection = self._local.connection = http.client.HTTPConnection(*self._address, timeout=connect_timeout)
            with self._connections_lock:
                self._connections.append(connection)
        connection.close()
        connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(self._timeout[1])  # the connect timeout above, the read timeout from here
        return connection, False

    def _stream(self, method: str, url: str, body: dict[str, Any] | None) -> requests.Response:
        try:
            response = self._session.request(method, url, json=body, timeout=self._timeout, stream=True)
        except requests.RequestException as exc:
            raise SidecarError(f"llama-server at {url} could not be reached: {exc}") from exc
        if response.status_code >= 400:
            try:
                payload = response.json()
            except ValueError:
                payload = {"error": {"message": response.text[:500]}}
            finally:
                response.close()
            raise _error_from_body(payload, url, status=response.status_code)
        return response


def _readable(sock: socket.socket) -> bool:
    """Whether reading ``sock`` would not wait (a peek would: the socket has a timeout)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _completion_body(
    prompt: Prompt,
    *,
    stream: bool,
    max_tokens: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    logit_bias: list[list[float]] | None = None,
    n_probs: int | None = None,
    json_schema: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The /completion request; unknown options are a TypeError, unset ones keep llama-server's defaults."""
    body: dict[str, Any] = {"prompt": prompt, "stream": stream, "cache_prompt": True, "return_tokens": True}
    options = {
        "n_predict": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "stop": stop,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        "logit_bias": logit_bias,
        "n_probs": n_probs,
        "json_schema": json_schema,  # llama-server turns it into a grammar the sampler follows
    }
    body.update({key: value for key, value in options.items() if value is not None})
    return body


def _parse_event(data: str, url: str) -> dict[str, Any]:
    try:
        payload = json.loads(data)
    except ValueError as exc:
        raise SidecarError(f"llama-server stream from {url} sent a bad event: {data[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise SidecarError(f"llama-server stream from {url} sent an unexpected event: {data[:200]!r}")
    return payload


def _error_from_body(payload: Any, url: str, status: int | None) -> SidecarError | SidecarRefused:
    """llama-server reports failures as ``{"error": {"code", "message", "type"}}``. A prompt longer than the
    context (with the counts, ``n_prompt_tokens`` and ``n_ctx``) and an invalid request (a bad JSON schema) are
    the caller's errors."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict) and error.get("type") == "exceed_context_size_error":
        prompt_tokens, context = error.get("n_prompt_tokens"), error.get("n_ctx")
        if isinstance(prompt_tokens, int) and isinstance(context, int):
            return PromptTooLong(prompt_tokens, context)
    if (
        isinstance(error, dict)
        and error.get("type") == "invalid_request_error"
        and isinstance(error.get("message"), str)
    ):
        return SidecarRefused(f"the model server refused the request: {error['message']}")
    if isinstance(error, dict):
        message = error.get("message") or json.dumps(error)
        status = status or error.get("code")
    else:
        message = str(error or payload)
    where = f"{url} answered {status}" if status else f"{url} reported an error"
    return SidecarError(f"llama-server {where}: {message}")


def _stop_reason(stop_type: str) -> str:
    return _STOP_REASONS.get(stop_type, stop_type)
