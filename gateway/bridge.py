"""The bridge between the gateway's asyncio event loop and the single-threaded, pump-driven SDK.

One thread owns one ``QMeshClient``, so every HTTP request shares one broker connection. The event loop never
touches the client: it puts commands (plain callables) on a thread-safe queue and sends one byte on an inproc
PUSH socket; the bridge's poller watches that socket beside the broker connection, so a new request or a
cancel is acted on at once instead of at the next poll timeout. After each wake-up the bridge hands the new
chunks and finished results of all its requests to the event loop in one ``call_soon_threadsafe`` batch, where
they land in each request's ``asyncio.Queue``.

Every few seconds the bridge asks the broker for its model table without waiting for the answer, so the SDK knows
each model's context and refuses at once (400) a request whose max_tokens cannot fit.

A request (or a model listing) that arrives while the bridge knows it has no broker (a refused or lost connection,
a refused handshake) fails at once with BrokerUnreachable, a 503: HTTP clients retry a 503 themselves. Requests
already in flight keep what the SDK gives them (streams resume after a broker restart).

Flow control: the SDK grants the worker credit as chunks reach this thread, not as the HTTP client reads
them, so a slow HTTP client costs the gateway at most one answer's text in memory (bounded by max_tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
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

POLL_SECONDS = 0.25  # upper bound between deadline checks and stop checks when nothing arrives
MODELS_REFRESH_SECONDS = 2.0  # how old the model table (each model's context) may get before it is asked again
_ids = itertools.count()
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)  # ints: no enum arithmetic per turn


@dataclass(slots=True)
class Delta:
    """What arrived of a generation since the last event: text, and its tokens' log-probabilities if asked for."""

    text: str
    logprobs: list[dict[str, Any]]


Event = Delta | Result  # new text, or the end of the generation (``Result.error`` set if it failed)
Command = Callable[[QMeshClient], None]
ModelTable = dict[str, dict[str, Any]]


class BridgedRequest:
    """A request sent through the bridge, as the event loop sees it: ``await next()`` until a ``Result``."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.finished = False  # the loop has taken the Result
        self.request: Request | None = None  # bridge thread only
        self.batch: EmbeddingBatch | None = None  # bridge thread only: an embeddings request's (its one event: the end)

    async def next(self) -> Event:
        event = await self.events.get()
        if isinstance(event, Result):
            self.finished = True
        return event


class Bridge:
    """Owns the broker connection in its own thread; ``submit``, ``cancel`` and ``stop`` are called from the loop."""

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
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._active: dict[bytes, BridgedRequest] = {}
        self._batches: list[BridgedRequest] = []  # embeddings requests in flight
        self._listings: list[tuple[MMICall, asyncio.Future[ModelTable]]] = []  # model listings awaiting the broker
        self._refresh: MMICall | None = None  # the bridge's own last question for the model table
        self._next_refresh = 0.0
        self._observers: list[Command] = []  # run on every turn of the bridge thread (the dashboard's sampler)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._started = threading.Event()
        self._failure: QMeshError | None = None
        endpoint = f"inproc://qmesh-gateway-wake-{next(_ids)}"
        self._wake_rx = self._context.socket(zmq.PULL)
        self._wake_rx.bind(endpoint)
        self._wake_tx = self._context.socket(zmq.PUSH)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(endpoint)
        self._wake_lock = threading.Lock()  # the PUSH socket is shared by whoever calls in
        self._thread = threading.Thread(target=self._run, name="qmesh-gateway-bridge", daemon=True)

    # ------------------------------------------------------------------------------------ event-loop side

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Connect (in the bridge thread) and deliver events to ``loop``; raises QMeshError for a bad address."""
        self._loop = loop
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """Cancel what is in flight (each request ends with a 499 Result) and close the connection."""
        self._stopping = True
        if self._thread.is_alive():
            self._wake()
            self._thread.join(timeout=10)
        elif self._thread.ident is None:  # never started
            self._wake_rx.close(linger=0)
        with self._wake_lock:
            self._wake_tx.close(linger=0)

    def submit(self, model: str, **options: Any) -> BridgedRequest:
        """Send a request (``QMeshClient.submit`` options); its events arrive in ``BridgedRequest.events``."""
        bridged = BridgedRequest(model)
        if self._stopping or not self._thread.is_alive():
            error = MeshError(p.QUEUE_FULL, "the gateway is shutting down")
            bridged.events.put_nowait(Result(text="", model=model, error=error))
            return bridged
        self._call(lambda client: self._submit(client, bridged, options))
        return bridged

    async def models(self) -> ModelTable:
        """The broker's model table (``QMeshClient.models``), asked on the bridge's connection. Raises
        BrokerUnreachable, or the broker's MeshError (403: the gateway's key is not on the client list)."""
        if self._stopping or not self._thread.is_alive():
            raise MeshError(p.QUEUE_FULL, "the gateway is shutting down")
        listing: asyncio.Future[ModelTable] = asyncio.get_running_loop().create_future()
        self._call(lambda client: self._list_models(client, listing))
        return await listing

    def observe(self, observer: Command) -> None:
        """Run ``observer`` in the bridge thread on every turn of its loop (at least every POLL_SECONDS), so it can
        ask the broker questions on the gateway's one connection; it must never wait. Call before ``start``."""
        self._observers.append(observer)

    def submit_embeddings(self, model: str, inputs: list[str]) -> BridgedRequest:
        """Send texts to embed (``QMeshClient.submit_embeddings``); one event arrives: the Result with the vectors."""
        bridged = BridgedRequest(model)
        if self._stopping or not self._thread.is_alive():
            error = MeshError(p.QUEUE_FULL, "the gateway is shutting down")
            bridged.events.put_nowait(Result(text="", model=model, error=error))
            return bridged
        self._call(lambda client: self._submit_embeddings(client, bridged, inputs))
        return bridged

    def cancel(self, bridged: BridgedRequest) -> None:
        """Stop a generation: the broker tells the worker, which frees its llama-server slot."""
        if not bridged.finished:
            self._call(lambda client: self._cancel(client, bridged))

    def _call(self, command: Command) -> None:
        self._commands.put(command)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock, contextlib.suppress(zmq.Again):  # a full pipe already means "wake up"
            if not self._wake_tx.closed:
                self._wake_tx.send(b"", zmq.NOBLOCK)

    # ------------------------------------------------------------------------------------ bridge thread

    def _run(self) -> None:
        try:
            client = QMeshClient(
                self.broker,
                timeout=self.timeout,
                connect_timeout=self.connect_timeout,
                curve=self.curve,
                context=self._context,
            )
        except QMeshError as exc:
            self._failure = exc
            self._wake_rx.close(linger=0)
            self._started.set()
            return
        client.wake_on(self._wake_rx)  # ``client.poll`` returns as soon as the event loop has work for us
        self._started.set()
        log.info("gateway sends its requests to the broker at %s", self.broker)
        try:
            while not self._stopping:
                client.poll(POLL_SECONDS)
                self._drain_wake()
                self._run_commands(client)
                self._refresh_models(client)
                for observer in self._observers:
                    observer(client)
                self._pump()
        except Exception:  # a bug: fail what is in flight rather than leave HTTP requests hanging
            log.exception("gateway bridge crashed")
        finally:
            self._run_commands(client)  # requests submitted while we stopped end with a 499 below
            for bridged in self._active.values():
                if bridged.request is not None and not bridged.request.done:
                    client.cancel(bridged.request)
            for bridged in self._batches:
                assert bridged.batch is not None
                bridged.batch.cancel()
            shutdown = MeshError(p.QUEUE_FULL, "the gateway is shutting down")
            self._listings = [(_failed_listing(shutdown), listing) for _, listing in self._listings]
            self._pump()
            client.close()
            self._wake_rx.close(linger=0)

    def _drain_wake(self) -> None:
        # Most turns are a chunk's, with no wake-up byte: asking the socket costs less than the Again a recv raises.
        while self._wake_rx.get(_EVENTS) & _POLLIN:
            self._wake_rx.recv(_NOBLOCK)

    def _run_commands(self, client: QMeshClient) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command(client)

    def _submit(self, client: QMeshClient, bridged: BridgedRequest, options: dict[str, Any]) -> None:
        unreachable = client.known_unreachable()
        if unreachable is not None:
            self._deliver([(bridged, None, Result(text="", model=bridged.model, error=unreachable))])
            return
        try:
            bridged.request = client.submit(model=bridged.model, **options)
        except QMeshError as exc:  # the one error submit raises: a body larger than any message the mesh takes
            error = MeshError(p.TOO_LARGE, str(exc))
            self._deliver([(bridged, None, Result(text="", model=bridged.model, error=error))])
            return
        self._active[bridged.request.id] = bridged

    def _submit_embeddings(self, client: QMeshClient, bridged: BridgedRequest, inputs: list[str]) -> None:
        unreachable = client.known_unreachable()
        if unreachable is not None:
            self._deliver([(bridged, None, Result(text="", model=bridged.model, error=unreachable))])
            return
        bridged.batch = client.submit_embeddings(inputs, model=bridged.model)  # spread by the table kept fresh here
        self._batches.append(bridged)

    def _cancel(self, client: QMeshClient, bridged: BridgedRequest) -> None:
        request = bridged.request
        if request is not None and self._active.pop(request.id, None) is not None:
            client.cancel(request)
        if bridged.batch is not None and bridged in self._batches:
            self._batches.remove(bridged)
            bridged.batch.cancel()

    def _refresh_models(self, client: QMeshClient) -> None:
        """Ask for the model table again when it is due and the last question is settled; never waits. Not while
        the broker is known to be unreachable: the question would only wait in the socket's queue."""
        now = time.monotonic()
        if now < self._next_refresh or (self._refresh is not None and not self._refresh.done):
            return
        if client.known_unreachable() is None:
            self._refresh = client.refresh_models()
            self._next_refresh = now + MODELS_REFRESH_SECONDS

    def _list_models(self, client: QMeshClient, listing: asyncio.Future[ModelTable]) -> None:
        unreachable = client.known_unreachable()
        if unreachable is None:
            self._listings.append((client.refresh_models(), listing))
        else:
            self._listings.append((_failed_listing(unreachable), listing))

    def _pump(self) -> None:
        """Hand every settled model listing to the event loop, and every new chunk and result in one batch."""
        settled = [(call, listing) for call, listing in self._listings if call.done]
        if settled:
            self._listings = [entry for entry in self._listings if not entry[0].done]
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody is waiting
                self._loop.call_soon_threadsafe(_settle_all, settled)
        batch: list[tuple[BridgedRequest, Delta | None, Result | None]] = []
        for request_id, bridged in list(self._active.items()):
            request = bridged.request
            assert request is not None
            chunks = request.new_chunks()
            delta = Delta("".join(c.text for c in chunks), [e for c in chunks for e in c.logprobs]) if chunks else None
            if request.final is not None:
                del self._active[request_id]
            if delta is not None or request.final is not None:
                batch.append((bridged, delta, request.final))
        for bridged in list(self._batches):
            assert bridged.batch is not None
            outcome = bridged.batch.outcome()
            if outcome is not None:
                self._batches.remove(bridged)
                batch.append((bridged, None, outcome))
        if batch:
            self._deliver(batch)

    def _deliver(self, batch: list[tuple[BridgedRequest, Delta | None, Result | None]]) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the event loop is already closed: nobody is waiting
            self._loop.call_soon_threadsafe(_put_all, batch)


def _failed_listing(error: MeshError) -> MMICall:
    """A model listing that ends without asking the broker."""
    return MMICall("mmi.services", 0.0, done=True, error=error)


def _settle_all(settled: list[tuple[MMICall, asyncio.Future[ModelTable]]]) -> None:
    """Runs in the event loop."""
    for call, listing in settled:
        if listing.done():  # the HTTP client went away
            continue
        if call.error is not None:
            listing.set_exception(call.error)
        else:
            listing.set_result(call.answer)


def _put_all(batch: list[tuple[BridgedRequest, Delta | None, Result | None]]) -> None:
    """Runs in the event loop."""
    for bridged, delta, final in batch:
        if delta is not None and (delta.text or delta.logprobs):
            bridged.events.put_nowait(delta)
        if final is not None:
            bridged.events.put_nowait(final)
