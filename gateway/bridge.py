"""The bridge between the gateway's asyncio event loop and the pump-driven SDK, in the event loop's own thread.

One ``QMeshClient`` serves every HTTP request, so they all share one broker connection. The event loop watches the
client's sockets (their ``zmq.FD``) and runs a turn of the bridge whenever one is readable, and at least every
POLL_SECONDS: the client's ``poll(0)``, then the new chunks and finished results of every request go straight into
each request's ``asyncio.Queue``. A new request or a cancel is sent at once, by the coroutine that asks for it. No
thread and no hand-over between threads: a token costs the gateway one wake-up (a thread driving the client used
to hand every batch of chunks to the loop, which woke a second thread per token).

Every few seconds the bridge asks the broker for its model table without waiting for the answer, so the SDK knows
each model's context and refuses at once (400) a request whose max_tokens cannot fit.

A request (or a model listing) that arrives while the bridge knows it has no broker (a refused or lost connection,
a refused handshake) fails at once with BrokerUnreachable, a 503: HTTP clients retry a 503 themselves. Requests
already in flight keep what the SDK gives them (streams resume after a broker restart).

Flow control: the SDK grants the worker credit as chunks reach the bridge, not as the HTTP client reads them, so a
slow HTTP client costs the gateway at most one answer's text in memory (bounded by max_tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from qmesh.client.sdk import EmbeddingBatch, MMICall, QMeshClient, Request, Result
from qmesh.common import protocol as p
from qmesh.common.errors import MeshError, QMeshError
from qmesh.common.keys import CurveClientKeys

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # upper bound between two turns when nothing arrives: deadlines, the model table, the dashboard
MODELS_REFRESH_SECONDS = 2.0  # how old the model table (each model's context) may get before it is asked again
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # ints: no enum arithmetic per turn


@dataclass(slots=True)
class Delta:
    """What arrived of a generation since the last event: text, and its tokens' log-probabilities if asked for."""

    text: str
    logprobs: list[dict[str, Any]]


Event = Delta | Result  # new text, or the end of the generation (``Result.error`` set if it failed)
Observer = Callable[[QMeshClient], None]
ModelTable = dict[str, dict[str, Any]]


class BridgedRequest:
    """A request sent through the bridge, as the event loop sees it: ``await next()`` until a ``Result``."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False  # the loop has taken the Result
        self.request: Request | None = None
        self.batch: EmbeddingBatch | None = None  # an embeddings request's (its one event: the end)

    def ended(self, error: MeshError) -> BridgedRequest:
        """This request, ended before it was sent: its one event is a Result with ``error``."""
        self.events.put_nowait(Result(text="", model=self.model, error=error))
        return self

    async def next(self) -> Event:
        event = await self.events.get()
        if isinstance(event, Result):
            self.finished = True
        return event


class Bridge:
    """Drives one broker connection from the event loop it is started in; every method is called in that loop."""

    def __init__(
        self,
        broker: str,
        *,
        timeout: float = 300.0,
        connect_timeout: float = 10.0,
        curve: CurveClientKeys | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.broker = broker
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.curve = curve
        self._context = context or zmq.Context.instance()
        self._client: QMeshClient | None = None
        self._active: dict[bytes, BridgedRequest] = {}
        self._batches: list[BridgedRequest] = []  # embeddings requests in flight
        self._listings: list[tuple[MMICall, asyncio.Future[ModelTable]]] = []  # model listings awaiting the broker
        self._refresh: MMICall | None = None  # the bridge's own last question for the model table
        self._next_refresh = 0.0
        self._observers: list[Observer] = []  # run on every turn (the dashboard's sampler)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched: list[zmq.Socket] = []  # the client's sockets whose FD the loop watches, and those FDs
        self._fds: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._stopping = False

    # ------------------------------------------------------------------------------------ the gateway's side

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect and deliver events in ``loop`` (the running one); raises QMeshError for a bad address."""
        self._loop = loop
        self._client = QMeshClient(
            self.broker,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            curve=self.curve,
            context=self._context,
        )
        log.info("gateway sends its requests to the broker at %s", self.broker)
        self._tick()

    def stop(self) -> None:
        """Cancel what is in flight (each request ends with a 499 Result) and close the connection."""
        self._stopping = True
        client = self._client
        if client is None:
            return
        self._client = None
        if self._timer is not None:
            self._timer.cancel()
        self._watch([])
        for bridged in self._active.values():
            if bridged.request is not None and not bridged.request.done:
                client.cancel(bridged.request)
        for bridged in self._batches:
            assert bridged.batch is not None
            bridged.batch.cancel()
        for _, listing in self._listings:
            if not listing.done():  # else the HTTP client went away
                listing.set_exception(_shutting_down())
        self._listings = []
        self._pump()
        client.close()

    def submit(self, model: str, **options: Any) -> BridgedRequest:
        """Send a request (``QMeshClient.submit`` options); its events arrive in ``BridgedRequest.events``."""
        bridged = BridgedRequest(model)
        try:
            client = self._usable_client()
        except MeshError as exc:
            return bridged.ended(exc)
        try:
            bridged.request = client.submit(model=model, **options)
        except QMeshError as exc:  # the one error submit raises: a body larger than any message the mesh takes
            return bridged.ended(MeshError(p.TOO_LARGE, str(exc)))
        self._active[bridged.request.id] = bridged
        self._turn()
        return bridged

    async def models(self) -> ModelTable:
        """The broker's model table (``QMeshClient.models``), asked on the bridge's connection. Raises
        BrokerUnreachable, or the broker's MeshError (403: the gateway's key is not on the client list)."""
        client = self._usable_client()
        listing: asyncio.Future[ModelTable] = asyncio.get_running_loop().create_future()
        self._listings.append((client.refresh_models(), listing))
        self._turn()
        return await listing

    def observe(self, observer: Observer) -> None:
        """Run ``observer`` on every turn (at least every POLL_SECONDS), so it can ask the broker questions on the
        gateway's one connection; it must never wait. Call before ``start``."""
        self._observers.append(observer)

    def submit_embeddings(self, model: str, inputs: list[str]) -> BridgedRequest:
        """Send texts to embed (``QMeshClient.submit_embeddings``); one event arrives: the Result with the vectors."""
        bridged = BridgedRequest(model)
        try:
            client = self._usable_client()
        except MeshError as exc:
            return bridged.ended(exc)
        bridged.batch = client.submit_embeddings(inputs, model=model)  # spread by the table kept fresh here
        self._batches.append(bridged)
        self._turn()
        return bridged

    def _usable_client(self) -> QMeshClient:
        """The client to send on; raises MeshError when nothing can be sent: the gateway is shutting down, or the
        client already knows it has no broker (BrokerUnreachable)."""
        client = self._client
        if client is None or self._stopping:
            raise _shutting_down()
        unreachable = client.known_unreachable()
        if unreachable is not None:
            raise unreachable
        return client

    def cancel(self, bridged: BridgedRequest) -> None:
        """Stop a generation: the broker tells the worker, which frees its llama-server slot."""
        client = self._client
        if bridged.finished or client is None:
            return
        request = bridged.request
        if request is not None and self._active.pop(request.id, None) is not None:
            client.cancel(request)
        if bridged.batch is not None and bridged in self._batches:
            self._batches.remove(bridged)
            bridged.batch.cancel()
        self._turn()

    # ------------------------------------------------------------------------------------ turns

    def _tick(self) -> None:
        """A turn at least every POLL_SECONDS, whatever arrives."""
        self._turn()
        if self._client is not None and self._loop is not None:
            self._timer = self._loop.call_later(POLL_SECONDS, self._tick)

    def _turn(self) -> None:
        """Read everything the client's sockets hold and hand it on. Their FDs signal edges only (a send may take
        the signal of a message that arrived meanwhile), so a turn ends only once the sockets say nothing waits."""
        client = self._client
        if client is None:
            return
        try:
            while True:
                client.poll(0)
                self._refresh_models(client)
                for observer in self._observers:
                    observer(client)
                self._pump()
                if not any(socket.get(_EVENTS) & _POLLIN for socket in client.watched()):
                    break
            self._watch(client.watched())
        except Exception:  # a bug: fail what is in flight rather than leave HTTP requests hanging
            log.exception("gateway bridge crashed")
            self.stop()

    def _watch(self, sockets: list[zmq.Socket]) -> None:
        """Watch these sockets' FDs (new ones after the client moved to the other broker of a pair)."""
        if sockets == self._watched:
            return
        assert self._loop is not None
        for fd in self._fds:
            with contextlib.suppress(OSError, ValueError):  # closed with its connection already
                self._loop.remove_reader(fd)
        self._watched, self._fds = list(sockets), [socket.get(zmq.FD) for socket in sockets]
        for fd in self._fds:
            self._loop.add_reader(fd, self._turn)

    def _refresh_models(self, client: QMeshClient) -> None:
        """Ask for the model table again when it is due and the last question is settled; never waits. Not while
        the broker is known to be unreachable: the question would only wait in the socket's queue."""
        now = time.monotonic()
        if now < self._next_refresh or (self._refresh is not None and not self._refresh.done):
            return
        if client.known_unreachable() is None:
            self._refresh = client.refresh_models()
            self._next_refresh = now + MODELS_REFRESH_SECONDS

    def _pump(self) -> None:
        """Settle every answered model listing; put every new chunk and result in its request's queue."""
        if self._listings:
            settled = [(call, listing) for call, listing in self._listings if call.done]
            if settled:
                self._listings = [entry for entry in self._listings if not entry[0].done]
                _settle_all(settled)
        for request_id, bridged in list(self._active.items()):
            request = bridged.request
            assert request is not None
            chunks = request.new_chunks()
            if chunks:
                text, logprobs = "".join(c.text for c in chunks), [e for c in chunks for e in c.logprobs]
                if text or logprobs:
                    bridged.events.put_nowait(Delta(text, logprobs))
            if request.final is not None:
                del self._active[request_id]
                bridged.events.put_nowait(request.final)
        for bridged in list(self._batches):
            assert bridged.batch is not None
            outcome = bridged.batch.outcome()
            if outcome is not None:
                self._batches.remove(bridged)
                bridged.events.put_nowait(outcome)


def _shutting_down() -> MeshError:
    return MeshError(p.QUEUE_FULL, "the gateway is shutting down")


def _settle_all(settled: list[tuple[MMICall, asyncio.Future[ModelTable]]]) -> None:
    for call, listing in settled:
        if listing.done():  # the HTTP client went away
            continue
        if call.error is not None:
            listing.set_exception(call.error)
        else:
            listing.set_result(call.answer)
