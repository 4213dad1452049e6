"""One request on a slot thread: tokenize, stream from llama-server, and obey the client's credit.

Prompts are rendered (chat template) and tokenized here, and llama-server completes from token ids. That makes
two things exact: a stream resumed after a failover continues right after the tokens the client already has,
and a stream whose client stops reading can be *paused*: after ``pause_after`` seconds without credit the
llama-server generation is stopped (its slot computes nothing for a reader that is not there) and started
again from the delivered tokens once credit returns. After ``stall_timeout`` seconds it ends in a 408.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from qmesh.common import protocol as p
from qmesh.common.bodies import EmbeddingRequest, GenerationRequest, Message, final_body
from qmesh.common.errors import SidecarRefused
from qmesh.worker.http_client import Completion, CompletionChunk
from qmesh.worker.tools import ContentDecoder, answer_schema, parse_answer, tool_messages

SendBody = Callable[[bytes], None]
SendChunk = Callable[[bytes, int], None]  # a PARTIAL body and how many tokens it carries
# How a slot thread waits for credit: (condition, predicate, timeout) -> the predicate's final value. Tests
# pass a simulated clock here, so pauses and stalls are driven without sleeping.
Wait = Callable[[threading.Condition, Callable[[], bool], float], bool]


class SidecarStream(Protocol):
    """What a generation reads: ``worker.http_client.CompletionStream``."""

    result: Completion | None

    def __iter__(self) -> Iterator[CompletionChunk]: ...

    def __enter__(self) -> SidecarStream: ...

    def __exit__(self, *exc_info: object) -> None: ...

    def close(self) -> None: ...


class Sidecar(Protocol):
    """What a generation asks of llama-server: ``worker.http_client.LlamaHttpClient``."""

    def apply_template(self, messages: list[dict[str, str]]) -> str: ...

    def tokenize(self, text: str, add_special: bool = False) -> list[int]: ...

    def generate_stream(self, prompt: str | list[int], **opts: Any) -> SidecarStream: ...


class Job:
    """A request held by a worker thread, shared by the loop (cancel, grant) and its slot thread (take credit).

    ``connection`` and ``route_key``: the broker connection it is answered on and its name there; both change when
    a generation kept running after its broker died is handed to the next one (``BrokerLink.rebind``, which also
    keeps ``sent``, every PARTIAL body and its token count, to send again what the client did not get).
    ``credit``: chunks the client will still take (None: no flow control, as for an embedding, which streams nothing).
    """

    def __init__(
        self,
        route_key: bytes,
        request: GenerationRequest | EmbeddingRequest,
        connection: int,
        wait: Wait = threading.Condition.wait_for,
    ) -> None:
        self.route_key = route_key
        self.request = request
        self.connection = connection
        self.cancelled = threading.Event()
        self.stream: SidecarStream | None = None
        self.credit = request.window if isinstance(request, GenerationRequest) else None
        self.sent: list[tuple[bytes, int]] = []  # PARTIAL bodies and their token counts (BrokerLink's lock)
        self._credit_changed = threading.Condition()
        self._wait = wait

    @property
    def stream_id(self) -> bytes | None:
        """The generation's name, when its client gave one: it may then outlive a broker (docs/PROTOCOL.md)."""
        return self.request.stream if isinstance(self.request, GenerationRequest) else None

    def sent_tokens(self) -> list[int]:
        """The token ids of the PARTIALs sent so far, in order. A snapshot: slot threads append to ``sent`` (under
        BrokerLink's lock), and a list is copied whole under the GIL."""
        return [token for body, _ in list(self.sent) for token in p.unpack_map(body).get("tokens", [])]

    def reset_credit(self, credit: int) -> None:
        """The client's credit starts again (a new broker, a new request for the same stream)."""
        with self._credit_changed:
            if self.credit is not None:
                self.credit = credit
                self._credit_changed.notify_all()

    def cancel(self) -> None:
        self.cancelled.set()
        with self._credit_changed:
            self._credit_changed.notify_all()
        stream = self.stream
        if stream is not None:
            stream.close()

    def grant(self, credit: int) -> None:
        with self._credit_changed:
            if self.credit is not None:
                self.credit += credit
                self._credit_changed.notify_all()

    def take_credit(self, timeout: float) -> bool:
        """Wait for room to send one chunk; False if cancelled or if no credit came within ``timeout``."""
        if self.credit is None:
            return not self.cancelled.is_set()
        with self._credit_changed:
            # This runs for every token: while the client keeps up, credit is in hand and nothing waits.
            if not self.credit and not self._wait(
                self._credit_changed, lambda: bool(self.credit) or self.cancelled.is_set(), timeout
            ):
                return False
            if self.cancelled.is_set():
                return False
            assert self.credit is not None
            self.credit -= 1
            return True


class ReplayDiverged(Exception):
    """A constrained answer regenerated after a failover or a pause did not repeat what was delivered."""


class Generation:
    """Runs ``job`` against llama-server: ``send_chunk`` for every PARTIAL body, ``send_final`` once at the end.

    An unconstrained answer continues after a pause or a failover from the delivered token ids (prompt + those
    ids). A constrained one (a JSON schema, tool calls) cannot: the grammar's state is not in the tokens. It is
    *replayed*: generated again from the start, each token checked against the delivered one and not sent again,
    then continued; an answer that comes out differently ends in a 502, never in broken JSON.
    """

    def __init__(
        self,
        job: Job,
        sidecar: Sidecar,
        send_chunk: SendChunk,
        send_final: SendBody,
        *,
        worker_name: str,
        model: str,
        pause_after: float,
        stall_timeout: float,
        model_sha256: str | None = None,
    ) -> None:
        self.job = job
        self.request = job.request
        self.sidecar = sidecar
        self.send_chunk = send_chunk
        self.send_final = send_final
        self.worker_name = worker_name
        self.model = model
        self.model_sha256 = model_sha256  # the model file's, when known: each answer says which file made it
        self.pause_after = min(pause_after, stall_timeout)
        self.stall_timeout = stall_timeout
        self.delivered: list[int] = list(job.request.resume_tokens)
        self.pauses = 0
        self.calling_tools = bool(self.request.tools) and self.request.tool_choice != "none"
        self.raw: list[str] = []  # the model's text for the delivered tokens (a tool answer's JSON)
        self.decoder = ContentDecoder() if self.calling_tools else None
        self.replay: list[int] = []  # delivered tokens still to be regenerated and checked (constrained answers)

    def run(self) -> None:
        """Raises SidecarError if llama-server fails; every other ending sends a FINAL (the caller's errors, such
        as a prompt longer than the context or a schema llama-server cannot use: a 400)."""
        if self.job.cancelled.is_set():  # cancelled while it waited for a free slot thread
            self.send_final(p.error_body(p.CANCELLED, "cancelled"))
            return
        try:
            self._run()
        except SidecarRefused as exc:
            self.send_final(p.error_body(p.BAD_REQUEST, str(exc)))
        except ReplayDiverged as exc:
            self.send_final(p.error_body(p.WORKER_FAILED, str(exc)))

    def _run(self) -> None:
        request, job = self.request, self.job
        text = (request.prompt or "") if request.raw else self.sidecar.apply_template(self._messages())
        prompt_tokens: list[int] | None = None  # tokenized only to continue after delivered tokens
        while True:
            remaining = request.max_tokens - len(self.delivered)
            if remaining <= 0:  # the tokens delivered before a failover or a pause used up max_tokens
                self._final("length", 0, {})
                return
            if not self.delivered:  # llama-server tokenizes text exactly as /tokenize with add_special does
                prompt: str | list[int] = text
            elif request.constrained:  # replay: the answer's text and its decoding are rebuilt as it goes
                prompt, self.replay, self.raw = text, list(self.delivered), []
                self.decoder = ContentDecoder() if self.calling_tools else None
                remaining += len(self.replay)
            else:
                if prompt_tokens is None:
                    prompt_tokens = self.sidecar.tokenize(text, add_special=True)
                prompt = prompt_tokens + self.delivered
            stream = self.sidecar.generate_stream(prompt, max_tokens=remaining, **self._options())
            job.stream = stream
            held = self._stream(stream)
            if job.cancelled.is_set():
                self.send_final(p.error_body(p.CANCELLED, "cancelled"))
                return
            if held is None:
                result = stream.result
                assert result is not None
                prompt_count = len(prompt_tokens) if prompt_tokens is not None else result.tokens_evaluated
                self._final(result.stop_reason, prompt_count, result.timings)
                return
            # Paused: llama-server has stopped; wait for the client, then continue after ``held``.
            self.pauses += 1
            if not job.take_credit(self.stall_timeout - self.pause_after):
                if job.cancelled.is_set():
                    self.send_final(p.error_body(p.CANCELLED, "cancelled"))
                else:
                    message = f"the client took no chunk for {self.stall_timeout:g} s; generation stopped"
                    self.send_final(p.error_body(p.CLIENT_STALLED, message))
                return
            self._deliver(held)

    def _stream(self, stream: SidecarStream) -> CompletionChunk | None:
        """Forward chunks while the client has credit. Returns the chunk held back when it pauses, else None."""
        with stream:
            if self.job.cancelled.is_set():
                stream.close()
            for chunk in stream:
                if self.replay:
                    self._check_replayed(chunk)
                    continue
                if not self.job.take_credit(self.pause_after):
                    if not self.job.cancelled.is_set():
                        stream.close()  # frees the llama-server slot while the client does not read
                        return chunk
                    return None
                self._deliver(chunk)
        return None

    def _check_replayed(self, chunk: CompletionChunk) -> None:
        expected, self.replay = self.replay[: len(chunk.token_ids)], self.replay[len(chunk.token_ids) :]
        if chunk.token_ids != expected:
            where = len(self.delivered) - len(self.replay) - len(expected)
            raise ReplayDiverged(
                f"a constrained answer cannot be continued exactly after a failover: regenerated, it differed from "
                f"what was delivered at token {where}"
            )
        self.raw.append(chunk.text)
        if self.decoder is not None:
            self.decoder.feed(chunk.text)  # already sent: only the decoder's state is rebuilt

    def _deliver(self, chunk: CompletionChunk) -> None:
        self.raw.append(chunk.text)
        text = chunk.text if self.decoder is None else self.decoder.feed(chunk.text)
        body: dict[str, Any] = {"text": text, "tokens": chunk.token_ids}
        if self.request.logprobs is not None:
            body["logprobs"] = [_logprob(entry, self.request.logprobs) for entry in chunk.probabilities]
        self.send_chunk(p.pack(body), len(chunk.token_ids))
        self.delivered.extend(chunk.token_ids)

    def _final(self, finish_reason: str | None, prompt_tokens: int, timings: dict[str, Any]) -> None:
        extra: dict[str, Any] = {}
        if self.calling_tools:
            _, calls = parse_answer("".join(self.raw))
            if calls is not None:  # the JSON is whole: its calls are, even if max_tokens ended it there
                finish_reason, extra["tool_calls"] = "tool_calls", calls
        if self.model_sha256 is not None:
            extra["model_sha256"] = self.model_sha256
        summary = final_body(
            finish_reason=finish_reason,
            tokens=len(self.delivered),
            prompt_tokens=prompt_tokens,
            cached_tokens=int(timings.get("cache_n", 0)),  # prompt tokens llama-server took from its cache
            failovers=self.request.failovers,
            pauses=self.pauses,
            worker=self.worker_name,
            model=self.model,
            timings=timings,
            **extra,
        )
        self.send_final(summary)

    def _messages(self) -> list[Message]:
        request = self.request
        has_tool_turns = any(m["role"] == "tool" or "tool_calls" in m for m in request.messages or [])
        if self.calling_tools or has_tool_turns:
            return tool_messages(request, describe=self.calling_tools)
        return request.chat_messages()

    def _options(self) -> dict[str, Any]:
        request = self.request
        options = {
            "temperature": request.temperature,
            "seed": request.seed,
            "top_p": request.top_p,
            "top_k": request.top_k,
            "min_p": request.min_p,
            "presence_penalty": request.presence_penalty,
            "frequency_penalty": request.frequency_penalty,
            "stop": request.stop or None,
            "logit_bias": [list(pair) for pair in request.logit_bias] or None,
            "n_probs": None if request.logprobs is None else max(1, request.logprobs),
            "json_schema": answer_schema(request) if self.calling_tools else request.json_schema,
        }
        return {name: value for name, value in options.items() if value is not None}


def _logprob(entry: dict[str, Any], alternatives: int) -> dict[str, Any]:
    """llama-server's probabilities of one token as a PARTIAL carries them."""
    top = entry.get("top_logprobs") or []
    return {
        "token": entry.get("token", ""),
        "logprob": entry.get("logprob", 0.0),
        "bytes": entry.get("bytes") or [],
        "top": [
            {"token": t.get("token", ""), "logprob": t.get("logprob", 0.0), "bytes": t.get("bytes") or []} for t in top
        ][:alternatives],
    }
