"""Closed-loop streaming loads on the real model: straight to llama-server, or through the mesh with the SDK, or
as chat over OpenAI's HTTP API (llama-server's own, or qmesh-gateway's).

All send the same prompts with greedy sampling, keep ``concurrency`` requests in flight, and stamp every chunk as
it arrives, so TTFT, ITL and tokens/s are measured the same way on every path. Raw prompts (no chat template) for
llama-server's ``/completion`` and the SDK; chat (one user message, the model's template) for the HTTP loads and
the SDK's ``chat`` mode.
"""

from __future__ import annotations

import http.client
import json
import queue
import select
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from qmesh.client.sdk import QMeshClient, Request
from qmesh.common.keys import CurveClientKeys
from qmesh.worker.http_client import LlamaHttpClient

from .stats import LoadResult, StreamRecord

PROMPT = "Once upon a time, in a village by the sea, there lived an old fisherman named {name}. Every morning"
JSON_HEADERS = {"Content-Type": "application/json"}
Connection = TypeVar("Connection")  # what one thread of an HTTP load streams over
NAMES = ("Tom", "Ada", "Lin", "Omar", "Eva", "Raj", "Mia", "Ivan", "Zoe", "Ken", "Ana", "Bo")


def prompts(count: int, offset: int = 0) -> list[str]:
    """Distinct prompts (so a round never reuses the previous round's prompt cache), the same for both paths."""
    return [PROMPT.format(name=f"{NAMES[i % len(NAMES)]} the {i + offset}th") for i in range(count)]


def _closed_loop(
    stream: Callable[[Connection, str, int], StreamRecord], connections: list[Connection], texts: list[str], tokens: int
) -> LoadResult:
    """A thread per connection, each streaming the next of ``texts`` as soon as its last stream ended, until none is
    left: ``concurrency`` requests in flight over HTTP."""
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for text in texts:
        todo.put(text)
    records: list[StreamRecord] = []

    def serve(connection: Connection) -> None:
        while True:
            try:
                text = todo.get_nowait()
            except queue.Empty:
                return
            records.append(stream(connection, text, tokens))

    start = time.monotonic()
    threads = [threading.Thread(target=serve, args=(connection,)) for connection in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadResult(records, time.monotonic() - start)


class DirectLoad:
    """``concurrency`` threads, each with its own HTTP client to one llama-server (kept across rounds)."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        self.clients = [LlamaHttpClient(base_url) for _ in range(concurrency)]

    def run(self, texts: list[str], max_tokens: int) -> LoadResult:
        return _closed_loop(self._stream, self.clients, texts, max_tokens)

    @staticmethod
    def _stream(client: LlamaHttpClient, text: str, tokens: int) -> StreamRecord:
        record = StreamRecord(time.monotonic())
        try:
            with client.generate_stream(text, max_tokens=tokens, temperature=0.0) as stream:
                for chunk in stream:
                    record.chunk_times.append(time.monotonic())
                    record.tokens += len(chunk.token_ids)
                if stream.result is not None:
                    record.prompt_s = _prompt_seconds(stream.result.timings)
        except Exception as exc:  # a benchmark reports failures instead of stopping
            record.error = repr(exc)
        return record

    def close(self) -> None:
        for client in self.clients:
            client.close()


class ChatHttpLoad:
    """``concurrency`` threads, each with its own keep-alive connection, streaming ``/v1/chat/completions``.

    The same client code reads llama-server's OpenAI API and qmesh-gateway's: a chunk is an SSE event whose delta
    has text; tokens are the usage's ``completion_tokens`` (``stream_options.include_usage``); llama-server's
    ``timings.prompt_ms``, which the gateway does not send, gives the prompt time where there is one."""

    def __init__(self, base_url: str, model: str, concurrency: int) -> None:
        host, _, port = base_url.split("//", 1)[1].rstrip("/").partition(":")
        self.connections = [http.client.HTTPConnection(host, int(port), timeout=300) for _ in range(concurrency)]
        self.model = model

    def run(self, texts: list[str], max_tokens: int) -> LoadResult:
        return _closed_loop(self._stream, self.connections, texts, max_tokens)

    def _stream(self, connection: http.client.HTTPConnection, text: str, tokens: int) -> StreamRecord:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        record = StreamRecord(0.0)
        for attempt in range(2):  # a connection the server closed after its last answer is opened again
            try:
                _reopen_if_closed(connection)  # a refused connection is this request's error, like any other
                record.sent = time.monotonic()
                connection.request("POST", "/v1/chat/completions", json.dumps(body), JSON_HEADERS)
                self._read(connection.getresponse(), record)
            except (http.client.RemoteDisconnected, ConnectionError) as exc:
                connection.close()
                if attempt or record.chunk_times:
                    record.error = repr(exc)
                    break
                continue
            except Exception as exc:  # a benchmark reports failures instead of stopping
                connection.close()
                record.error = repr(exc)
            break
        return record

    @staticmethod
    def _read(response: http.client.HTTPResponse, record: StreamRecord) -> None:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        while True:
            line = response.readline()
            if not line:
                raise RuntimeError("the stream ended before [DONE]")
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                response.read()  # the chunked body's end: the connection is ready for the next request
                return
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if any(choice["delta"].get("content") for choice in event["choices"]):
                record.chunk_times.append(time.monotonic())
            if event.get("usage"):
                record.tokens = event["usage"]["completion_tokens"]
                record.prompt_s = _prompt_seconds(event.get("timings") or {})

    def close(self) -> None:
        for connection in self.connections:
            connection.close()


def _reopen_if_closed(connection: http.client.HTTPConnection) -> None:
    """Connect before the request is timed: again if the server closed the connection after its last answer
    (llama-server does after a stream, whatever its Keep-Alive header says; uvicorn keeps it open). A socket with
    nothing to read is open; a readable one is closing (a peek would wait: the socket has a timeout)."""
    sock = connection.sock
    if sock is not None and select.select([sock], [], [], 0)[0]:
        connection.close()
    if connection.sock is None:
        connection.connect()


class MeshLoad:
    """One SDK client (one connection, as an application would use it) with ``concurrency`` requests in flight;
    ``chat``: each prompt as one user message (the worker applies the model's template), else raw."""

    def __init__(
        self, endpoint: str, model: str, concurrency: int, curve: CurveClientKeys | None = None, chat: bool = False
    ) -> None:
        self.client = QMeshClient(endpoint, timeout=300, curve=curve)
        self.model = model
        self.concurrency = concurrency
        self.chat = chat

    def run(self, texts: list[str], max_tokens: int) -> LoadResult:
        pending = list(reversed(texts))
        flight: dict[Request, StreamRecord] = {}
        records: list[StreamRecord] = []
        start = time.monotonic()
        while pending or flight:
            while pending and len(flight) < self.concurrency:
                text = pending.pop()
                prompt = {"messages": [{"role": "user", "content": text}]} if self.chat else {"prompt": text}
                request = self.client.submit(
                    model=self.model, max_tokens=max_tokens, temperature=0.0, raw=not self.chat, **prompt
                )
                flight[request] = StreamRecord(request.sent_at)
            self.client.poll(0.5)
            now = time.monotonic()
            for request, record in list(flight.items()):
                new = request.chunks[len(record.chunk_times) :]
                if new and not record.chunk_times and request.first_chunk_at is not None:
                    record.chunk_times.append(request.first_chunk_at)  # stamped by the SDK on arrival
                    new = new[1:]
                record.chunk_times += [now] * len(new)
                record.tokens = sum(len(chunk.tokens) for chunk in request.chunks)
                if request.done:
                    result = request.final
                    if result is not None and result.error is not None:
                        record.error = str(result.error)
                    if result is not None:
                        record.prompt_s = _prompt_seconds(result.timings)
                    records.append(record)
                    del flight[request]
        return LoadResult(records, time.monotonic() - start)

    def close(self) -> None:
        self.client.close()


def _prompt_seconds(timings: dict[str, Any]) -> float | None:
    value = timings.get("prompt_ms")
    return value / 1000 if isinstance(value, (int, float)) else None
