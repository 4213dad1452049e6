"""The QMesh client SDK: many concurrent requests over one DEALER connection to the broker.

``QMeshClient`` is single-threaded and driven by its callers: iterating a stream, waiting for a result or
calling ``poll()`` receives whatever the broker sent and files it under its request. Use one client per thread.

When the connection to the broker drops (a broker restart), every request in flight is sent again once the
connection is back: from the start if nothing had arrived, else resumed after the tokens already received.

A broker whose handshake refuses this client (no key, a key not on its list, a wrong broker key) ends every
request and MMI call with ``BrokerUnreachable`` as soon as ZeroMQ reports it, within milliseconds; a broker that
is not there is waited for ``connect_timeout`` (it may be starting or restarting). ``known_unreachable`` tells a
caller that would rather not wait (the gateway) when the client already knows it has no broker.

Flow control: each request lets the worker send ``window`` chunks ahead; the client grants more as it reads
them off the socket (in ``poll``). A program that stops polling therefore pauses generation instead of making
the broker or the worker buffer without bound.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from qmesh.common import protocol as p
from qmesh.common.bodies import BadRequest, EmbeddingRequest, GenerationRequest, unpack_vector
from qmesh.common.endpoints import DEFAULT_BROKER, broker_endpoints
from qmesh.common.errors import BrokerUnreachable, ConfigError, MeshError, QMeshError
from qmesh.common.fastio import recv_frames, send_frames
from qmesh.common.keys import HANDSHAKE_EVENTS, CurveClientKeys, HandshakeWatch
from qmesh.common.prefix import conversation_text, prefix_hashes


@dataclass(slots=True)
class Chunk:
    text: str
    tokens: list[int]
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # per token, when the request asked for them


@dataclass(slots=True)
class Result:
    """A finished request: the whole text and the worker's summary, or the error that ended it."""

    text: str
    model: str
    worker: str | None = None
    tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # of the prompt tokens, how many llama-server took from its prompt cache
    tool_calls: list[dict[str, str]] | None = None  # {"id", "name", "arguments": JSON text}: finish_reason tool_calls
    finish_reason: str | None = None
    ttft_ms: float | None = None
    error: MeshError | None = None
    failovers: int = 0
    timings: dict[str, Any] = field(default_factory=dict)
    embeddings: list[list[float]] | None = None  # an embeddings request's vectors, one per text, in order
    model_sha256: str | None = None  # the sha256 of the model file that made the answer, as its worker says

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class MMICall:
    """A question to the broker's service discovery (8/MMI) in flight; ``poll`` settles it with an answer or an
    error (the broker's error FINAL, or BrokerUnreachable)."""

    service: str
    sent_at: float
    body: tuple[bytes, ...] = ()
    request_id: bytes = b""
    done: bool = False
    answer: Any = None
    error: QMeshError | None = None


log = logging.getLogger(__name__)

# The least time the client stays on one broker of a pair before moving to the other: while neither is active yet
# (both passive, or one dead and the other not yet taken over) it goes back and forth at this pace, not as fast as
# each says no.
SWITCH_DWELL = 0.5


# How each MMI service's FINAL body reads (docs/PROTOCOL.md, section 6).
_MMI_ANSWERS: dict[str, Callable[[list[bytes]], Any]] = {
    "mmi.services": lambda body: p.unpack_map(body[0] if body else b""),
    "mmi.workers": lambda body: p.unpack(body[0] if body else b""),
    "mmi.requests": lambda body: p.unpack(body[0] if body else b""),
    "mmi.models": lambda body: p.unpack(body[0] if body else b""),
    "mmi.broker": lambda body: p.unpack(body[0] if body else b""),
    "mmi.shards": lambda body: p.unpack(body[0] if body else b""),
    "mmi.service": lambda body: body[:1] == [b"200"],
}


class Request:
    """One request in flight. Iterate it for its chunks; ``result()`` waits for the end."""

    def __init__(
        self,
        client: QMeshClient,
        request_id: bytes,
        model: str,
        generation: GenerationRequest | EmbeddingRequest,
        timeout: float,
        hint: p.RoutingHint | None = None,
    ) -> None:
        self.client = client
        self.id = request_id
        self.model = model
        self.generation = generation  # as last sent: a resume after a broker restart replaces it
        self.hint = hint  # where it would best run (sent again with every resend)
        self.body = generation.to_body()
        self.unacknowledged_chunks = 0  # received but not yet granted back to the worker as credit
        self.resumes = 0  # times this client resumed it after losing the broker
        self.sent_at = time.monotonic()
        self.deadline = self.sent_at + timeout
        self.chunks: list[Chunk] = []
        self.taken = 0  # chunks already handed out by ``new_chunks``
        self.status: dict[str, Any] = {}
        self.first_chunk_at: float | None = None
        self.acknowledged = False  # the broker has it (any reply arrived)
        self.was_queued = False  # it waited for a free worker slot
        self.final: Result | None = None

    @property
    def done(self) -> bool:
        return self.final is not None

    @property
    def text(self) -> str:
        return "".join(chunk.text for chunk in self.chunks)

    def new_chunks(self) -> list[Chunk]:
        """The chunks received since the last call (all so far on the first): the request's one read cursor, which
        iterating it, ``qmesh-client`` and the gateway all read through. It does not wait; ``poll`` fills it."""
        new = self.chunks[self.taken :]
        self.taken = len(self.chunks)
        return new

    def __iter__(self) -> Iterator[Chunk]:
        """Yield chunks as they arrive; raise MeshError if the request ends in an error."""
        while True:
            yield from self.new_chunks()
            if self.final is not None:
                if self.final.error is not None:
                    raise self.final.error
                return
            self.client.poll(0.5)

    def result(self) -> Result:
        """Wait for the end; errors are in ``Result.error``, not raised."""
        while self.final is None:
            self.client.poll(0.5)
        return self.final

    def cancel(self) -> None:
        self.client.cancel(self)

    # -- filled in by the client

    def _on_partial(self, body: list[bytes]) -> None:
        self.acknowledged = True
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
        try:
            fields = p.unpack_map(body[0]) if body else {}
            logprobs = fields.get("logprobs")
            self.chunks.append(
                Chunk(
                    str(fields.get("text", "")),
                    list(fields.get("tokens") or []),
                    logprobs if isinstance(logprobs, list) else [],
                )
            )
        except p.ProtocolError:  # a plain MDP worker: the body is the text
            self.chunks.append(Chunk(b"".join(body).decode("utf-8", "replace"), []))
        self.unacknowledged_chunks += 1

    def _resume_body(self) -> bytes | None:
        """The body that continues this request after the chunks received so far; None if it cannot."""
        if not self.chunks:
            return self.body
        if not all(chunk.tokens or not chunk.text for chunk in self.chunks):
            return None  # a worker that does not report token ids
        received = [t for chunk in self.chunks for t in chunk.tokens]
        # ``generation`` is the request as last sent: its resume tokens are the first ones received (submit sends
        # none), so it continues after the rest.
        self.generation = self.generation.resumed_after(received[len(self.generation.resume_tokens) :])
        self.body = self.generation.to_body()
        self.resumes += 1
        return self.body

    def _on_final(self, body: list[bytes]) -> None:
        try:
            fields = p.unpack_map(body[0]) if body else {}
        except p.ProtocolError:
            if body:
                self.chunks.append(Chunk(b"".join(body).decode("utf-8", "replace"), []))
            fields = {}
        error = _error_in(fields)
        if error is not None:
            self._end(error)
            return
        self._end(None, fields)

    def _end(self, error: MeshError | None, summary: dict[str, Any] | None = None) -> None:
        summary = summary or {}
        ttft = None if self.first_chunk_at is None else (self.first_chunk_at - self.sent_at) * 1000
        tokens = summary.get("tokens")
        self.final = Result(
            text=self.text,
            model=str(summary.get("model", self.model)),
            worker=summary.get("worker") or self.status.get("worker"),
            tokens=tokens if isinstance(tokens, int) else sum(len(c.tokens) for c in self.chunks),
            prompt_tokens=summary.get("prompt_tokens"),
            cached_tokens=summary.get("cached_tokens"),
            tool_calls=summary.get("tool_calls"),
            finish_reason=summary.get("finish_reason"),
            ttft_ms=ttft,
            error=error,
            failovers=int(summary.get("failovers") or 0),
            timings=summary.get("timings") or {},
            embeddings=_vectors(summary.get("embeddings")),
            model_sha256=summary["model_sha256"] if p.is_sha256(summary.get("model_sha256")) else None,
        )
        self.client._requests.pop(self.id, None)


class QMeshClient:
    """A connection to the broker. ``timeout`` bounds each request from send to FINAL.

    CURVE (a broker with keys): ``curve_secret`` and ``broker_key`` are the files ``--curve-secret`` and
    ``--broker-key`` take (this side's ``NAME.key_secret``, the broker's ``NAME.key``); ``curve`` is the same keys
    already loaded.

    A broker pair: ``broker`` lists both, ``"tcp://A:5555,tcp://B:5556"``. The client talks to one; it moves to the
    other when that one says it is passive (421), is of an older epoch than one already seen (unless the other did
    not answer either since), closes the connection, or stays silent for ``liveness`` seconds while requests wait
    (it is probed first), and sends everything in flight again there, resuming streams after the tokens received (a
    worker that kept generating carries on exactly where the client is).
    """

    def __init__(
        self,
        broker: str = DEFAULT_BROKER,
        *,
        timeout: float = 300.0,
        connect_timeout: float = 10.0,
        window: int = 64,
        curve: CurveClientKeys | None = None,
        curve_secret: str | Path | None = None,
        broker_key: str | Path | None = None,
        context: zmq.Context | None = None,
        liveness: float = 7.5,
    ) -> None:
        if curve_secret is not None or broker_key is not None:
            if curve is not None:
                raise ConfigError("give either curve= or curve_secret= and broker_key=, not both")
            if curve_secret is None or broker_key is None:
                raise ConfigError("curve_secret and broker_key go together: both key files for CURVE, or neither")
            curve = CurveClientKeys.load(curve_secret, broker_key)
        self.broker = broker
        try:
            self._endpoints = broker_endpoints(broker)
        except ValueError as exc:
            raise QMeshError(f"bad broker address {broker!r}: {exc}") from exc
        if curve is not None:
            curve.check_brokers(len(self._endpoints))
        self._endpoint = 0
        self._max_epoch = 0  # the newest epoch of a broker pair seen: a broker of an older one is stale
        self._switches_unanswered = 0  # moves to the other broker since a broker of the newest epoch took a request
        self._switch_due: str | None = None  # why the client must move to the other broker of the pair
        self._last_heard = time.monotonic()
        self._probe: bytes | None = None  # the id of the MMI call asking a silent broker whether it is there
        self._switched = False  # everything was sent again on a new connection to the other broker
        self._leaving_dead = False  # the switch due leaves a broker that died or went silent
        self._fled_at: float | None = None  # when the client last left a dead broker, until another answers
        self._not_yet: set[bytes] = set()  # requests the passive broker refused just after that: asked again soon
        self._ask_again_at: float | None = None
        self._opened_at = time.monotonic()
        self.liveness = liveness
        self._curve_keys = curve
        self.timeout = timeout
        self.window = window
        self.connect_timeout = connect_timeout
        self._context = context or zmq.Context.instance()
        self._ids = itertools.count(1)
        self._prefix = os.urandom(4)
        self._requests: dict[bytes, Request] = {}
        self._mmi: dict[bytes, MMICall] = {}
        self._served: dict[str, dict[str, Any]] = {}  # the last model table the broker sent (mmi.services)
        self._curve = curve is not None
        self._connected = False
        self._ever_connected = False
        self._handshake_error: str | None = None  # why the last handshake failed, until one succeeds
        self._no_connection: str | None = None  # why, once an attempt to connect failed or the connection dropped
        self._outbox: deque[list[bytes]] = deque()  # messages the socket could not take yet
        self._poller = zmq.Poller()
        self._open()

    def _open(self) -> None:
        """A DEALER to the current endpoint, and its monitor, in the poller."""
        self._opened_at = time.monotonic()
        self._connected_here = False  # a handshake succeeded on this connection
        self._handshakes = HandshakeWatch(self.broker, self._curve)
        self._socket = self._context.socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES + 64 * 1024)
        if self._curve_keys is not None:
            self._curve_keys.apply(self._socket, self._endpoint)
        self._monitor = self._socket.get_monitor_socket(
            HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
        )
        try:
            self._socket.connect(self._endpoints[self._endpoint])
        except zmq.ZMQError as exc:
            self._shut()
            raise QMeshError(f"bad broker address {self.broker!r}: {exc}") from exc
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def _shut(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)

    def _switch(self) -> None:
        """Move to the other broker of the pair and send it everything in flight (once the connection is up)."""
        log.info(
            "moving to the broker at %s: %s",
            self._endpoints[(self._endpoint + 1) % len(self._endpoints)],
            self._switch_due,
        )
        self._switch_due, self._probe = None, None
        self._fled_at = time.monotonic() if self._leaving_dead else None
        self._leaving_dead, self._ask_again_at = False, None
        self._not_yet.clear()
        self._poller.unregister(self._socket)
        self._poller.unregister(self._monitor)
        self._shut()
        self._outbox.clear()  # meant for the broker left behind: what matters is sent again
        self._endpoint = (self._endpoint + 1) % len(self._endpoints)
        self._switches_unanswered += 1
        self._connected = False
        self._last_heard = time.monotonic()
        self._open()
        self._send_again()  # queued until the new connection is up
        self._switched = True

    def close(self) -> None:
        for request in list(self._requests.values()):
            self.cancel(request)
        self._shut()

    def __enter__(self) -> QMeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ requests

    def submit(
        self,
        prompt: str | None = None,
        *,
        model: str,
        messages: list[dict[str, str]] | None = None,
        system: str | None = None,
        max_tokens: int = 256,
        temperature: float | None = None,
        seed: int | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: list[str] | None = None,
        raw: bool = False,
        timeout: float | None = None,
        session: str | None = None,
        min_p: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        logit_bias: dict[int, float] | None = None,
        logprobs: int | None = None,
        json_schema: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: str | dict[str, str] = "auto",
        parallel_tool_calls: bool = True,
    ) -> Request:
        """Send a request and return at once; iterate the Request or call ``result()``.

        ``session`` names a conversation: the broker keeps its requests on one llama-server while load allows.
        Every request also carries its prompt's prefix hashes, so a conversation's next turn goes where its
        beginning is cached even without a session.

        ``logprobs``: each chunk carries its tokens' log-probabilities and this many alternatives. ``json_schema``:
        the answer is JSON that matches it. ``tools`` (``{"name", "description", "parameters"}``) and
        ``tool_choice`` (auto, none, required or ``{"name": ...}``): the answer is text or calls
        (``Result.tool_calls``), for any model. The request body checks them all (``GenerationRequest``)."""
        generation = GenerationRequest(
            prompt=prompt,
            messages=messages,
            system=system,
            raw=raw,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            top_p=top_p,
            top_k=top_k,
            stop=stop or [],
            window=self.window,
            min_p=min_p,
            presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty,
            logit_bias=sorted((logit_bias or {}).items()),
            logprobs=logprobs,
            json_schema=json_schema,
            tools=tools or [],
            tool_choice=tool_choice,
            parallel_tool_calls=parallel_tool_calls,
        )
        request_id = self._new_id()
        generation.stream = request_id  # the generation's name: a worker that outlives its broker keeps it by it
        timeout = self.timeout if timeout is None else timeout
        request = Request(self, request_id, model, generation, timeout, routing_hint(generation, session))
        if len(request.body) > p.MAX_BODY_BYTES:
            size = len(request.body)
            raise QMeshError(f"the request is {size} bytes; the largest message the mesh takes is {p.MAX_BODY_BYTES}")
        try:
            GenerationRequest.from_body([request.body])  # what the worker would refuse, refused before it travels
        except BadRequest as exc:
            request._end(MeshError(p.BAD_REQUEST, str(exc)))
            return request
        context = self._served.get(model, {}).get("context")
        if isinstance(context, int) and max_tokens > context:  # could never fit: no need for a trip to a worker
            message = (
                f"max_tokens is {max_tokens}, but {model} has a context of {context} tokens per request, prompt "
                "and answer together: ask for fewer tokens"
            )
            request._end(MeshError(p.BAD_REQUEST, message))
            return request
        return self._start(request)

    def stream(self, prompt: str | None = None, **options: Any) -> Iterator[Chunk]:
        """Yield the answer's chunks; leaving the loop early cancels the generation."""
        request = self.submit(prompt, **options)
        try:
            yield from request
        finally:
            if not request.done:
                self.cancel(request)

    def generate(self, prompt: str | None = None, **options: Any) -> Result:
        """The whole answer; raises MeshError if it ended in an error."""
        result = self.submit(prompt, **options).result()
        if result.error is not None:
            raise result.error
        return result

    def chat(self, model: str, system: str | None = None) -> Chat:
        return Chat(self, model, system)

    def embed(self, inputs: str | list[str], *, model: str, timeout: float | None = None) -> Embeddings:
        """The embedding of each text, in order (a list of vectors; of one vector for one text), with the texts'
        ``prompt_tokens``; raises MeshError. A batch is spread over the model's free embedding slots as the broker
        reports them now (``submit_embeddings``)."""
        self.models()
        batch = self.submit_embeddings(inputs, model=model, timeout=timeout)
        result = batch.result()
        if result.error is not None:
            raise result.error
        return Embeddings(result.embeddings or [], result.prompt_tokens or 0, [part.result() for part in batch.parts])

    def submit_embeddings(self, inputs: str | list[str], *, model: str, timeout: float | None = None) -> EmbeddingBatch:
        """Send texts to embed and return at once; ``result()`` of what it returns waits for every vector.

        The texts are split, in order, into as many requests as the model has free embedding slots in the last
        model table this client got (``models``, ``refresh_models``; one request without a table), so that they
        are embedded on several llama-servers at once; the vectors come back in input order. Never waits."""
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        try:
            EmbeddingRequest.from_fields({"embed": texts})  # what a worker would refuse, refused before it travels
        except BadRequest as exc:
            return EmbeddingBatch(self, model, [], MeshError(p.BAD_REQUEST, str(exc)))
        timeout = self.timeout if timeout is None else timeout
        hint = p.RoutingHint(capability=p.EMBEDDINGS)  # the broker places it only on an embeddings worker
        parts = []
        for part in split_texts(texts, self._free_slots(model, p.EMBEDDINGS)):
            request_id = self._new_id()
            parts.append(self._start(Request(self, request_id, model, EmbeddingRequest(part), timeout, hint)))
        return EmbeddingBatch(self, model, parts)

    def _start(self, request: Request) -> Request:
        """Send a request (or end it at once if the broker refuses this client) and keep it until its FINAL."""
        refusal = self._refusal()
        if refusal is not None:
            request._end(refusal)
            return request
        self._requests[request.id] = request
        self._send(p.client_request(request.model, [request.body], request.id, request.hint))
        return request

    def _new_id(self) -> bytes:
        """A request id no other request or MMI call of this client has: its random prefix, then a counter."""
        return self._prefix + next(self._ids).to_bytes(8, "big")

    def _free_slots(self, model: str, capability: str) -> int:
        """Free slots of ``model``'s workers of ``capability`` in the last model table; 0 if it does not say."""
        counts = self._served.get(model, {}).get("by_capability", {}).get(capability, {})
        slots, busy = counts.get("slots"), counts.get("busy")
        return slots - busy if isinstance(slots, int) and isinstance(busy, int) else 0

    def cancel(self, request: Request) -> None:
        """Stop a request: the broker ends it and tells the worker, which frees its llama-server slot."""
        if request.done:
            return
        self._send(p.client_cancel(request.id))
        request._end(MeshError(p.CANCELLED, "cancelled"))

    # ------------------------------------------------------------------------------------------ MMI

    def models(self) -> dict[str, dict[str, Any]]:
        """Models served right now: ``{name: {"workers", "slots", "busy", "queued", "capabilities", "by_capability"
        [, "context"]}}`` (``capabilities``: what its workers serve, chat and/or embeddings; ``by_capability``:
        workers, slots and busy for each). The table is kept: ``submit`` refuses at once a ``max_tokens`` larger than
        the ``context`` (tokens per request, when every worker of the model announces it) in the last table it got,
        and ``submit_embeddings`` spreads a batch over the free embedding slots it lists."""
        return self._wait(self.refresh_models())

    def refresh_models(self) -> MMICall:
        """Ask for the model table without waiting: ``poll`` settles the call (``answer``: what ``models`` returns)
        and keeps the table for ``submit``. A program that never calls ``models`` can keep it fresh this way."""
        return self._ask("mmi.services")

    def workers(self) -> list[dict[str, Any]]:
        return self._wait(self._ask("mmi.workers"))

    def broker_info(self) -> dict[str, Any]:
        """The broker that answers (``mmi.broker``): its ``endpoint``, its ``pair_role`` (``"primary"``,
        ``"backup"``, or None outside a pair) and ``epoch`` (of its pair's last takeover; 0 outside a pair)."""
        answer = self._wait(self._ask("mmi.broker"))
        return {"endpoint": self._endpoints[self._endpoint], **answer}

    def shards(self) -> list[dict[str, Any]]:
        """The shard hosts (``mmi.shards``, docs/PROTOCOL.md section 6): what each offers, how much of it a split
        worker uses, and which."""
        return self._wait(self._ask("mmi.shards"))

    def model_files(self) -> list[dict[str, Any]]:
        """The model files of the mesh (``mmi.models``, docs/PROTOCOL.md section 6): each name with its sha256 and
        size, the workers and stores that hold it, holders found with a bad copy, and transfers of it under way."""
        return self._wait(self._ask("mmi.models"))

    def recent_requests(self) -> list[dict[str, Any]]:
        """The last few hundred requests that ended, oldest first (``mmi.requests``, docs/PROTOCOL.md section 6)."""
        return self._wait(self._ask("mmi.requests"))

    def ask_mmi(self, service: str) -> MMICall:
        """Ask an MMI service (``mmi.workers``, ``mmi.services``, ``mmi.requests``) without waiting: ``poll``
        settles the call with what the blocking method returns. For a thread that must never wait (the gateway's)."""
        return self._ask(service)

    def has_model(self, model: str) -> bool:
        return self._wait(self._ask("mmi.service", model.encode()))

    def _ask(self, service: str, *body: bytes) -> MMICall:
        """Send an MMI request and return at once; ``poll`` settles the call."""
        request_id = self._new_id()
        call = MMICall(service, time.monotonic(), body, request_id)
        refusal = self._refusal()
        if refusal is not None:
            call.done, call.error = True, refusal
            return call
        self._mmi[request_id] = call
        self._send(p.client_request(service, list(body), request_id))
        return call

    def _wait(self, call: MMICall) -> Any:
        """The call's answer once it is settled; raises its error (BrokerUnreachable, or the broker's 403)."""
        while not call.done:
            self.poll(0.2)
        if call.error is not None:
            raise call.error
        return call.answer

    # ------------------------------------------------------------------------------------------ pump

    def watched(self) -> list[zmq.Socket]:
        """The sockets ``poll`` reads: the broker connection and its monitor (new ones after a move to the other
        broker of a pair). An event loop that drives this client calls ``poll(0)`` when one of their ``zmq.FD`` is
        readable; the FD signals edges only, so it calls it again while one of them has ``POLLIN`` in ``zmq.EVENTS``."""
        return [self._socket, self._monitor]

    def _send(self, frames: list[bytes]) -> None:
        """Never block the caller: a socket with no usable connection (yet) keeps the message in the outbox."""
        if not self._outbox:
            try:
                send_frames(self._socket, frames)
                return
            except zmq.Again:
                pass
        self._outbox.append(frames)

    def _flush_outbox(self) -> None:
        while self._outbox:
            try:
                send_frames(self._socket, self._outbox[0])
            except zmq.Again:
                return
            self._outbox.popleft()

    def poll(self, timeout: float = 0.0) -> None:
        """Receive what has arrived (waiting up to ``timeout`` s for the first message) and check deadlines."""
        self._flush_outbox()
        events = dict(self._poller.poll(timeout * 1000))
        if self._monitor in events:
            self._drain_monitor()
        if self._socket in events:
            self._last_heard = time.monotonic()
            while True:
                try:
                    frames = recv_frames(self._socket)
                except zmq.Again:
                    break
                self._on_reply(frames)
            self._grant_credit()
        now = time.monotonic()
        self._check_pair(now)
        if self._switch_due is not None and now - self._opened_at >= SWITCH_DWELL:
            self._switch()
        elif self._ask_again_at is not None and now >= self._ask_again_at:
            for request_id in self._not_yet:
                self._resend(request_id)
            self._not_yet.clear()
            self._ask_again_at = None
        self._expire(now)

    def _check_pair(self, now: float) -> None:
        """With a pair of brokers, a broker silent while requests wait is asked whether it is there; one still
        silent after ``liveness`` seconds is left for the other (a frozen machine closes no connection)."""
        if len(self._endpoints) < 2 or not (self._requests or self._mmi) or self._switch_due is not None:
            return
        silent = now - self._last_heard
        if silent >= self.liveness:
            self._leave_for_dead(f"the broker was silent for {silent:.1f} s")
        elif silent >= self.liveness / 2 and self._probe is None:
            self._probe = self._ask("mmi.service", b"").request_id

    def _grant_credit(self) -> None:
        """Give back credit for chunks read off the socket, in batches of half a window."""
        for request in self._requests.values():
            if request.unacknowledged_chunks >= max(1, self.window // 2):
                self._send(p.client_credit(request.id, request.unacknowledged_chunks))
                request.unacknowledged_chunks = 0

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            reply = p.parse_for_client(frames)
        except p.ProtocolError:
            return
        if reply.request_id == self._probe:
            self._probe = None
        if self._not_from_the_active_broker(reply):
            return
        self._fled_at = None  # an active broker answers
        call = self._mmi.pop(reply.request_id or b"", None)
        if call is not None:
            _settle(call, reply.body)
            if call.service == "mmi.services" and call.error is None:
                self._served = call.answer
            return
        request = self._requests.get(reply.request_id or b"")
        if request is None:
            return  # a request we cancelled or gave up on
        if reply.command == p.C_STATUS:
            request.acknowledged = True
            with contextlib.suppress(p.ProtocolError):
                request.status = p.unpack_map(reply.body[0]) if reply.body else {}
                request.was_queued |= request.status.get("state") == "queued"
        elif reply.command == p.C_PARTIAL:
            request._on_partial(reply.body)
        else:
            request._on_final(reply.body)

    def _not_from_the_active_broker(self, reply: p.BrokerToClient) -> bool:
        """A passive broker's 421, or a STATUS of an older epoch than one already seen: the other broker of the
        pair serves (the request stays, to be sent there)."""
        if reply.command not in (p.C_FINAL, p.C_STATUS) or len(reply.body) != 1:
            return False  # a PARTIAL (the per-token path) says nothing of the pair
        try:
            fields = p.unpack_map(reply.body[0])
        except p.ProtocolError:
            return False
        error = fields.get("error")
        epoch = error.get("epoch") if isinstance(error, dict) else fields.get("epoch")
        if isinstance(epoch, int) and epoch < self._max_epoch and reply.command == p.C_STATUS:
            if self._switches_unanswered < len(self._endpoints):
                self._switch_due = f"the broker is of epoch {epoch}, older than {self._max_epoch}"
                return True
            # Both brokers were tried since one of the newer epoch last took a request: that one is dead or cut off,
            # and this one (restarted without hearing it, or across a partition) is the broker there is.
            log.warning(
                "the broker at %s is of epoch %d, older than %d, but no broker of a newer one answers: following it",
                self._endpoints[self._endpoint],
                epoch,
                self._max_epoch,
            )
            self._max_epoch = epoch
        if isinstance(epoch, int):
            self._max_epoch = max(self._max_epoch, epoch)
            if reply.command == p.C_STATUS:
                self._switches_unanswered = 0
        if isinstance(error, dict) and error.get("code") == p.NOT_ACTIVE and len(self._endpoints) > 1:
            now = time.monotonic()
            if self._fled_at is not None and now - self._fled_at < self.liveness and reply.request_id:
                # Just after its peer died it may not know yet: ask it again rather than go back to the dead one.
                self._not_yet.add(reply.request_id)
                self._ask_again_at = self._ask_again_at or now + p.PASSIVE_RETRY
            else:
                self._switch_due = "it is the passive broker of its pair"
            return True
        return False

    def _leave_for_dead(self, why: str) -> None:
        """Move to the other broker; if this one had answered on this connection, it died under us, and the other
        may need a moment to notice (a broker never reached, perhaps not started yet, is no such news)."""
        self._switch_due, self._leaving_dead = why, self._connected_here

    def _drain_monitor(self) -> None:
        while True:
            try:
                message = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            event = message["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._ever_connected and not self._switched:  # the same broker again, which may have restarted
                    self._send_again()
                self._switched = False
                self._connected = self._ever_connected = self._connected_here = True
                self._handshake_error = self._no_connection = None
            elif event == zmq.EVENT_DISCONNECTED:
                self._connected = False
                self._no_connection = f"cannot reach the broker at {self.broker}: the connection was lost"
                if len(self._endpoints) > 1:
                    self._leave_for_dead("the connection to it closed")
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self._no_connection = (
                    f"cannot reach the broker at {self.broker}: connecting failed (is qmesh-broker running?)"
                )
                if len(self._endpoints) > 1:
                    self._leave_for_dead("connecting to it failed")
            else:
                failure = self._handshakes.refusal(event, message["value"])
                self._handshake_error = failure or self._handshake_error

    def _send_again(self) -> None:
        """After a reconnection the broker may have lost everything (a restart, the other broker of a pair): send
        each request and question again, resuming streams (a worker may have kept the stream going: the hint asks
        the broker to give it a moment to come back)."""
        for request_id in [*self._requests, *self._mmi]:
            self._resend(request_id)

    def _resend(self, request_id: bytes) -> None:
        """Send a request in flight (resumed after the tokens received) or an MMI question again."""
        call = self._mmi.get(request_id)
        if call is not None:
            self._send(p.client_request(call.service, list(call.body), request_id))
            return
        request = self._requests.get(request_id)
        if request is None:
            return  # it ended meanwhile
        body = request._resume_body()
        if body is None:
            request._end(MeshError(p.WORKER_FAILED, "the connection to the broker was lost mid-stream"))
            return
        request.status, request.unacknowledged_chunks = {}, 0
        hint = request.hint
        if hint is not None and hint.stream is not None:
            hint = replace(hint, attach=True)
        self._send(p.client_request(request.model, [body], request.id, hint))

    def _expire(self, now: float) -> None:
        refusal = self._refusal()
        for request in list(self._requests.values()):
            if refusal is not None:
                request._end(refusal)
            elif not request.acknowledged and now - request.sent_at >= self.connect_timeout and not self._connected:
                self._send(p.client_cancel(request.id))
                request._end(self._unreachable())
            elif now >= request.deadline:
                self._send(p.client_cancel(request.id))
                request._end(
                    MeshError(p.QUEUE_TIMEOUT, f"no complete answer within {request.deadline - request.sent_at:g} s")
                )
        for request_id, call in list(self._mmi.items()):
            if refusal is not None or now - call.sent_at >= self.connect_timeout:
                del self._mmi[request_id]
                call.done, call.error = True, refusal or self._unreachable()

    def known_unreachable(self) -> BrokerUnreachable | None:
        """Why the broker cannot be reached right now, when this client already knows: its handshake refused this
        client, the last connection attempt failed, or the connection was lost. None while connected, and while the
        first attempt is still under way (a slow network: only ``connect_timeout`` tells)."""
        if self._connected:
            return None
        reason = self._handshake_error or self._no_connection
        return None if reason is None else BrokerUnreachable(reason)

    def _refusal(self) -> BrokerUnreachable | None:
        """The broker's handshake refused this client (a key it does not list, a wrong broker key, CURVE on one
        side only): final until a handshake succeeds, so everything fails at once rather than at a timeout."""
        if self._connected or self._handshake_error is None:
            return None
        return BrokerUnreachable(self._handshake_error)

    def _unreachable(self) -> BrokerUnreachable:
        if self._ever_connected:
            return BrokerUnreachable(f"the broker at {self.broker} did not answer within {self.connect_timeout:g} s")
        return BrokerUnreachable(
            f"cannot reach the broker at {self.broker} within {self.connect_timeout:g} s (is qmesh-broker running?)"
        )


def _settle(call: MMICall, body: list[bytes]) -> None:
    """File the broker's FINAL to an MMI call: its answer, or the error the broker sent instead (403)."""
    call.done = True
    try:
        fields = p.unpack_map(body[0]) if len(body) == 1 else {}
    except p.ProtocolError:  # not a map: a plain answer such as mmi.service's b"200"
        fields = {}
    call.error = _error_in(fields)
    if call.error is None:
        try:
            call.answer = _MMI_ANSWERS[call.service](body)
        except p.ProtocolError as exc:
            call.error = exc


def _error_in(fields: dict[str, Any]) -> MeshError | None:
    """The error of an error FINAL, ``{"error": {"code": int, "message": str}}``; None for any other body."""
    error = fields.get("error")
    if not isinstance(error, dict) or not isinstance(error.get("code"), int):
        return None
    param = error.get("param")  # the part of the request at fault, if the error names one
    message = str(error.get("message", "unknown error"))
    return MeshError(error["code"], message, param if isinstance(param, str) else None)


def _vectors(value: Any) -> list[list[float]] | None:
    """An embeddings FINAL's vectors (each little-endian float32 bytes); None if it carries none, or not those."""
    if not isinstance(value, list) or not all(isinstance(vector, bytes) for vector in value):
        return None
    try:
        return [unpack_vector(vector) for vector in value]
    except ValueError:
        return None


class Chat:
    """A conversation: each ``send`` carries the whole history, and the answer joins it once complete. It is a
    session of its own (``session``), so its turns stay on the llama-server that holds the history."""

    def __init__(self, client: QMeshClient, model: str, system: str | None = None) -> None:
        self.client = client
        self.model = model
        self.system = system
        self.history: list[dict[str, str]] = []
        self.session = uuid.uuid4().hex

    def send(self, message: str, **options: Any) -> Iterator[Chunk]:
        messages = [*self.history, {"role": "user", "content": message}]
        parts: list[str] = []
        options.setdefault("session", self.session)
        for chunk in self.client.stream(model=self.model, messages=messages, system=self.system, **options):
            parts.append(chunk.text)
            yield chunk
        self.history = [*messages, {"role": "assistant", "content": "".join(parts)}]

    def ask(self, message: str, **options: Any) -> str:
        return "".join(chunk.text for chunk in self.send(message, **options))


def routing_hint(generation: GenerationRequest, session: str | None = None) -> p.RoutingHint:
    """What the broker routes by: the prefix hashes of the conversation (or of a raw prompt), the session, and
    the generation's stream id."""
    text = (generation.prompt or "") if generation.raw else conversation_text(generation.chat_messages())
    return p.RoutingHint(prefix_hashes(text), session, stream=generation.stream)


class Embeddings(list[list[float]]):
    """What ``embed`` returns: one vector per text, in order. ``prompt_tokens``: the tokens of all the texts;
    ``parts``: the result of each request the batch was split into, in order (``worker`` names who embedded it)."""

    def __init__(self, vectors: list[list[float]], prompt_tokens: int, parts: list[Result]) -> None:
        super().__init__(vectors)
        self.prompt_tokens = prompt_tokens
        self.parts = parts


class EmbeddingBatch:
    """Texts to embed, in flight as ``parts``: one Request each, for a slice of the texts in order."""

    def __init__(self, client: QMeshClient, model: str, parts: list[Request], error: MeshError | None = None) -> None:
        self.client = client
        self.model = model
        self.parts = parts
        self.final = None if error is None else Result(text="", model=model, error=error)

    def outcome(self) -> Result | None:
        """The whole batch's Result (every vector in order, the prompt tokens of all parts, the workers that served
        them) once every part has ended, or the first error once one part failed (the others are then cancelled);
        None while parts are in flight. Never waits."""
        if self.final is not None:
            return self.final
        ended = [part for part in self.parts if part.final is not None]
        error = next((error for error in map(_embedding_error, ended) if error is not None), None)
        if error is None and len(ended) < len(self.parts):
            return None
        if error is not None:
            self.cancel()
            self.final = Result(text="", model=self.model, error=error)
            return self.final
        results = [part.result() for part in self.parts]  # all ended: none waits
        self.final = Result(
            text="",
            model=self.model,
            worker=", ".join(dict.fromkeys(result.worker for result in results if result.worker)),
            prompt_tokens=sum(result.prompt_tokens or 0 for result in results),
            embeddings=[vector for result in results for vector in result.embeddings or []],
        )
        return self.final

    def result(self) -> Result:
        """Wait for the end; errors are in ``Result.error``, not raised."""
        while (outcome := self.outcome()) is None:
            self.client.poll(0.5)
        return outcome

    def cancel(self) -> None:
        for part in self.parts:
            self.client.cancel(part)


def _embedding_error(part: Request) -> MeshError | None:
    """What went wrong with an ended part of a batch: its error, or vectors that do not match its texts."""
    result = part.result()
    if result.error is not None:
        return result.error
    assert isinstance(part.generation, EmbeddingRequest)
    texts, vectors = len(part.generation.inputs), len(result.embeddings or [])
    if vectors != texts:
        return MeshError(p.WORKER_FAILED, f"worker {result.worker} sent {vectors} embeddings for {texts} texts")
    return None


def split_texts(texts: list[str], parts: int) -> list[list[str]]:
    """``texts`` in order, cut into ``parts`` runs (at least one, at most one per text) of about equal characters:
    the time a llama-server takes follows the tokens."""
    parts = max(1, min(parts, len(texts)))
    ends = list(itertools.accumulate(map(len, texts)))  # ends[i]: the characters of texts[: i + 1]
    cuts = [0]
    for part in range(1, parts):
        cut = cuts[-1] + 1
        while cut < len(texts) - (parts - part) and ends[cut - 1] < ends[-1] * part / parts:
            cut += 1
        cuts.append(cut)
    cuts.append(len(texts))
    return [texts[start:end] for start, end in itertools.pairwise(cuts)]
