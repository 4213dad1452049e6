"""Unit tests of one generation on a slot thread (worker/generation.py): credit, pause, resume, stall, cancel.

llama-server is replaced by ``ScriptedSidecar``, a fake that is the point here: it continues any prompt with
the same token sequence, so a resumed stream can be checked token by token. Time is simulated: a wait for
credit returns at once, moving the clock forward to the next scheduled event (a CREDIT, a CANCEL) or to the
timeout, so pauses and stalls take no real time.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from qmesh.common import protocol as p
from qmesh.common.bodies import GenerationRequest
from qmesh.common.errors import PromptTooLong
from qmesh.worker.generation import Generation, Job
from qmesh.worker.http_client import Completion, CompletionChunk

PROMPT_TOKENS = [1, 2, 3]
CONTINUATION = list(range(100, 140))  # what the model says after the prompt, one token per chunk
PAUSE_AFTER = 1.0
STALL_TIMEOUT = 30.0


class SimulatedTime:
    """A clock that only moves when someone waits; ``at`` schedules what happens meanwhile."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._order), action))

    def wait(self, condition: threading.Condition, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = self.now + timeout
        while not predicate():
            if not self._events or self._events[0][0] > deadline:
                self.now = deadline
                return predicate()
            when, _, action = heapq.heappop(self._events)
            self.now = max(self.now, when)
            action()
        return True


class ScriptedStream:
    def __init__(self, sidecar: ScriptedSidecar, tokens: list[int], finish: str) -> None:
        self.sidecar = sidecar
        self.tokens = tokens
        self.finish = finish
        self.result: Completion | None = None
        self.closed_at: float | None = None

    def __iter__(self) -> Iterator[CompletionChunk]:
        for index, token in enumerate(self.tokens):
            if self.result is not None:
                return
            self.sidecar.before_chunk(self.sidecar.chunks_made)
            self.sidecar.chunks_made += 1
            if self.result is not None:  # closed by what happened before this chunk
                return
            probabilities = [{"token": f"<{token}>", "logprob": -0.5, "top_logprobs": [{"token": "x", "logprob": -1}]}]
            text = self.sidecar.texts.get(token, f"<{token}>")
            yield CompletionChunk(
                text=text, token_ids=[token], probabilities=probabilities if self.sidecar.options.get("n_probs") else []
            )
            if index == len(self.tokens) - 1:
                self._end(self.finish)

    def _end(self, reason: str) -> None:
        if self.result is None:
            self.result = Completion("", list(self.tokens), len(self.tokens), len(PROMPT_TOKENS), reason, {"n": 1})

    def close(self) -> None:
        if self.result is None:
            self.closed_at = self.sidecar.clock.now
        self._end("cancelled")

    def __enter__(self) -> ScriptedStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class ScriptedSidecar:
    """Continues every prompt with CONTINUATION (after the tokens the prompt already carries past the text)."""

    def __init__(self, clock: SimulatedTime, before_chunk: Callable[[int], None] = lambda index: None) -> None:
        self.clock = clock
        self.before_chunk = before_chunk  # called with the index of each chunk about to be produced
        self.chunks_made = 0
        self.prompts: list[str | list[int]] = []
        self.streams: list[ScriptedStream] = []
        self.context: int | None = None  # set: every prompt is too long for it
        self.texts: dict[int, str] = {}  # a token's text, when not "<token>"
        self.options: dict[str, Any] = {}  # of the last generate_stream

    def apply_template(self, messages: list[dict[str, str]]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(PROMPT_TOKENS)

    def generate_stream(self, prompt: str | list[int], **opts: Any) -> ScriptedStream:
        self.prompts.append(prompt)
        self.options = opts
        if self.context is not None:
            raise PromptTooLong(len(PROMPT_TOKENS), self.context)  # what llama-server answers with a 400
        already = 0 if isinstance(prompt, str) else len(prompt) - len(PROMPT_TOKENS)
        tokens = CONTINUATION[already : already + opts["max_tokens"]]
        stream = ScriptedStream(self, tokens, "length" if already + len(tokens) < len(CONTINUATION) else "stop")
        self.streams.append(stream)
        return stream


class Run:
    """A generation wired to the simulated clock, the scripted sidecar and a recording of what it sends."""

    def __init__(self, window: int | None = None, before_chunk: Callable[[int], None] | None = None, **fields: Any):
        self.clock = SimulatedTime()
        self.sidecar = ScriptedSidecar(self.clock, before_chunk or (lambda index: None))
        request = GenerationRequest(prompt="hi", window=window, **fields)
        self.job = Job(b"key", request, connection=1, wait=self.clock.wait)
        self.sent: list[tuple[str, float, dict[str, Any]]] = []
        self.generation = Generation(
            self.job,
            self.sidecar,
            lambda body, tokens: self.sent.append(("chunk", self.clock.now, p.unpack(body))),
            lambda body: self.sent.append(("final", self.clock.now, p.unpack(body))),
            worker_name="host/1/0",
            model="m",
            pause_after=PAUSE_AFTER,
            stall_timeout=STALL_TIMEOUT,
        )

    def run(self) -> Run:
        self.generation.run()
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for kind, _, body in self.sent if kind == "chunk" for t in body["tokens"]]

    @property
    def final(self) -> dict[str, Any]:
        finals = [body for kind, _, body in self.sent if kind == "final"]
        assert len(finals) == 1, f"{len(finals)} FINALs"
        assert self.sent[-1][0] == "final", "a chunk after the FINAL"
        return finals[0]


def test_without_flow_control_every_token_is_sent_then_the_summary() -> None:
    run = Run(max_tokens=10).run()
    assert run.tokens == CONTINUATION[:10]
    assert run.final["tokens"] == 10 and run.final["finish_reason"] == "length" and run.final["pauses"] == 0
    assert run.sidecar.prompts == ["<user>hi<assistant>"]  # a fresh prompt goes as text: one HTTP call


def test_credit_exhausted_pauses_llama_server_after_pause_after() -> None:
    run = Run(window=4, max_tokens=10).run()  # nobody ever grants more
    first = run.sidecar.streams[0]
    assert run.tokens == CONTINUATION[:4]
    assert first.closed_at == pytest.approx(PAUSE_AFTER), "llama-server was not stopped after pause_after"
    assert run.generation.pauses == 1


def test_credit_back_resumes_exactly_after_the_delivered_tokens() -> None:
    run = Run(window=4, max_tokens=20)
    run.clock.at(5.0, lambda: run.job.grant(4))  # the client reads again after 5 s
    run.clock.at(7.0, lambda: run.job.grant(100))
    run.run()
    assert run.tokens == CONTINUATION[:20], "a token lost or repeated across the pause"
    assert run.final["tokens"] == 20 and run.final["pauses"] == 2
    first_resume = run.sidecar.prompts[1]
    assert first_resume == PROMPT_TOKENS + CONTINUATION[:5]  # the 4 sent, and the one held while paused
    assert [at for kind, at, _ in run.sent if kind == "chunk"][4] == pytest.approx(5.0)


def test_a_client_that_never_reads_ends_in_408_after_stall_timeout() -> None:
    run = Run(window=2, max_tokens=10).run()
    assert run.tokens == CONTINUATION[:2]
    assert run.final["error"]["code"] == p.CLIENT_STALLED
    assert run.sent[-1][1] == pytest.approx(STALL_TIMEOUT)


def test_a_failover_continues_after_the_resumed_tokens_and_counts_them_against_max_tokens() -> None:
    delivered = CONTINUATION[:6]
    run = Run(max_tokens=10, resume_tokens=list(delivered), failovers=1).run()
    assert run.sidecar.prompts == [PROMPT_TOKENS + delivered]
    assert run.tokens == CONTINUATION[6:10]
    assert run.final["tokens"] == 10 and run.final["failovers"] == 1


def test_resumed_tokens_that_used_up_max_tokens_end_at_once() -> None:
    run = Run(max_tokens=3, resume_tokens=CONTINUATION[:3], failovers=1).run()
    assert run.sidecar.prompts == [] and run.tokens == []
    assert run.final["finish_reason"] == "length"


@pytest.mark.parametrize("chunk", [0, 1, 3])
def test_cancel_while_streaming(chunk: int) -> None:
    run = Run(max_tokens=10)
    run.sidecar.before_chunk = lambda index: run.job.cancel() if index == chunk else None
    run.run()
    assert run.tokens == CONTINUATION[:chunk]
    assert run.final["error"]["code"] == p.CANCELLED


def test_cancel_before_the_slot_starts_it_opens_no_stream() -> None:
    run = Run(max_tokens=10)
    run.job.cancel()
    run.run()
    assert run.sidecar.prompts == [] and run.final["error"]["code"] == p.CANCELLED


@pytest.mark.parametrize("when", [0.5, 5.0], ids=["waiting-for-credit", "paused"])
def test_cancel_while_waiting_for_the_client(when: float) -> None:
    run = Run(window=2, max_tokens=10)
    run.clock.at(when, run.job.cancel)
    run.run()
    assert run.tokens == CONTINUATION[:2]
    assert run.final["error"]["code"] == p.CANCELLED
    assert run.sent[-1][1] == pytest.approx(when)
    assert all(stream.result is not None for stream in run.sidecar.streams)  # no llama-server stream left open


def test_a_prompt_longer_than_the_context_is_the_callers_400() -> None:
    run = Run(max_tokens=10)
    run.sidecar.context = 2
    run.run()
    error = run.final["error"]
    assert error["code"] == p.BAD_REQUEST
    assert error["message"].startswith("the prompt is 3 tokens; the model's context is 2 tokens")


def test_a_constrained_answer_is_replayed_after_a_failover_and_continues_exactly() -> None:
    run = Run(max_tokens=10, json_schema={"type": "object"}, resume_tokens=CONTINUATION[:4], failovers=1).run()
    assert run.sidecar.prompts == ["<user>hi<assistant>"]  # from the start, not from the tokens: the grammar
    assert run.tokens == CONTINUATION[4:10]  # the 4 delivered were checked and not sent again
    assert run.final["tokens"] == 10 and run.sidecar.options["json_schema"] == {"type": "object"}


def test_a_constrained_answer_that_comes_out_differently_ends_in_502_not_broken_json() -> None:
    run = Run(max_tokens=10, json_schema={"type": "object"}, resume_tokens=[7, 8], failovers=1).run()
    assert run.tokens == []
    assert run.final["error"]["code"] == p.WORKER_FAILED and "at token 0" in run.final["error"]["message"]


def test_a_constrained_answer_paused_for_credit_is_replayed_when_the_client_reads_again() -> None:
    run = Run(window=3, max_tokens=8, json_schema={"type": "object"})
    run.clock.at(5.0, lambda: run.job.grant(100))
    run.run()
    assert run.tokens == CONTINUATION[:8] and len(run.sidecar.prompts) == 2
    assert all(isinstance(prompt, str) for prompt in run.sidecar.prompts)


def test_each_chunk_carries_its_logprobs_when_asked() -> None:
    run = Run(max_tokens=3, logprobs=1).run()
    chunks = [body for kind, _, body in run.sent if kind == "chunk"]
    assert [c["logprobs"][0]["token"] for c in chunks] == ["<100>", "<101>", "<102>"]
    assert chunks[0]["logprobs"][0]["top"] == [{"token": "x", "logprob": -1, "bytes": []}]
    assert run.sidecar.options["n_probs"] == 1
    assert "logprobs" not in [b for k, _, b in Run(max_tokens=1).run().sent if k == "chunk"][0]


def test_a_tool_call_answer_ends_with_its_calls_and_streams_no_json() -> None:
    pieces = ['{"tool_', 'calls": [{"name": "weather", ', '"arguments": {"city": ', '"Paris"}}]}']
    tool = {"name": "weather", "parameters": {"type": "object"}}
    run = Run(max_tokens=len(pieces), tools=[tool], tool_choice="required")
    run.sidecar.texts = dict(zip(CONTINUATION, pieces, strict=False))
    run.run()
    assert "".join(b["text"] for k, _, b in run.sent if k == "chunk") == ""
    ((call),) = run.final["tool_calls"]
    assert run.final["finish_reason"] == "tool_calls" and call["name"] == "weather"
    assert call["arguments"] == '{"city": "Paris"}'
    assert "tool_calls" in run.sidecar.options["json_schema"]["properties"]


def test_a_reply_in_words_is_streamed_as_text() -> None:
    pieces = ['{"content": "Hel', "lo\\n", 'there"}']
    run = Run(max_tokens=len(pieces), tools=[{"name": "weather"}])
    run.sidecar.texts = dict(zip(CONTINUATION, pieces, strict=False))
    run.run()
    assert "".join(b["text"] for k, _, b in run.sent if k == "chunk") == "Hello\nthere"
    assert "tool_calls" not in run.final and run.final["finish_reason"] != "tool_calls"
