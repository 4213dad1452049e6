"""Closed-loop streaming loads on the real model: straight to llama-server, or through the mesh with the SDK.

Both send the same raw prompts (no chat template) with greedy sampling, keep ``concurrency`` requests in
flight, and stamp every chunk as it arrives, so TTFT, ITL and tokens/s are measured the same way on both paths.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from qmesh.client.sdk import QMeshClient, Request
from qmesh.common.keys import CurveClientKeys
from qmesh.worker.http_client import LlamaHttpClient

from .stats import LoadResult, StreamRecord

PROMPT = "Once upon a time, in a village by the sea, there lived an old fisherman named {name}. Every morning"
NAMES = ("Tom", "Ada", "Lin", "Omar", "Eva", "Raj", "Mia", "Ivan", "Zoe", "Ken", "Ana", "Bo")


def prompts(count: int, offset: int = 0) -> list[str]:
    """Distinct prompts (so a round never reuses the previous round's prompt cache), the same for both paths."""
    return [PROMPT.format(name=f"{NAMES[i % len(NAMES)]} the {i + offset}th") for i in range(count)]


class DirectLoad:
    """``concurrency`` threads, each with its own HTTP client to one llama-server (kept across rounds)."""

    def __init__(self, base_url: str, concurrency: int) -> None:
        self.clients = [LlamaHttpClient(base_url) for _ in range(concurrency)]

    def run(self, texts: list[str], max_tokens: int) -> LoadResult:
        todo: queue.SimpleQueue[str] = queue.SimpleQueue()
        for text in texts:
            todo.put(text)
        records: list[StreamRecord] = []
        start = time.monotonic()
        threads = [threading.Thread(target=self._stream, args=(c, todo, max_tokens, records)) for c in self.clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return LoadResult(records, time.monotonic() - start)

    @staticmethod
    def _stream(client: LlamaHttpClient, todo: queue.SimpleQueue[str], tokens: int, out: list[StreamRecord]) -> None:
        while True:
            try:
                text = todo.get_nowait()
            except queue.Empty:
                return
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
            out.append(record)

    def close(self) -> None:
        for client in self.clients:
            client.close()


class MeshLoad:
    """One SDK client (one connection, as an application would use it) with ``concurrency`` requests in flight."""

    def __init__(self, endpoint: str, model: str, concurrency: int, curve: CurveClientKeys | None = None) -> None:
        self.client = QMeshClient(endpoint, timeout=300, curve=curve)
        self.model = model
        self.concurrency = concurrency

    def run(self, texts: list[str], max_tokens: int) -> LoadResult:
        pending = list(reversed(texts))
        flight: dict[Request, StreamRecord] = {}
        records: list[StreamRecord] = []
        start = time.monotonic()
        while pending or flight:
            while pending and len(flight) < self.concurrency:
                request = self.client.submit(
                    pending.pop(), model=self.model, max_tokens=max_tokens, temperature=0.0, raw=True
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
