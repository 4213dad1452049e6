"""One worker thread: a llama-server sidecar with K slots and one connection to the broker.

The thread runs a thin loop around ``WorkerCore`` (``worker.core``), which makes every protocol decision: it
feeds the core what happened (a broker message, a slot that finished, llama-server's health, the clock) and
carries out the effects it returns. K slot threads each run one generation at a time against llama-server
(``worker.generation``) and send their chunks on the broker connection themselves (``worker.link``); a slot
hands its FINAL (or "llama-server is down") back to the loop through ``_slot_events``, after its last chunk.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass

import zmq

from qmesh.common import protocol as p
from qmesh.common.bodies import EmbeddingRequest
from qmesh.common.endpoints import broker_endpoints
from qmesh.common.errors import QMeshError, SidecarError
from qmesh.common.keys import CurveClientKeys, key_fingerprint
from qmesh.common.modelfiles import ModelReader
from qmesh.worker.binary import LlamaServerBinary
from qmesh.worker.core import (
    CancelJob,
    Close,
    Connect,
    Effect,
    Exit,
    GrantCredit,
    Rebind,
    Send,
    SendHeartbeat,
    ServeRead,
    StartJob,
    WorkerConfig,
    WorkerCore,
)
from qmesh.worker.embedding import Embedding
from qmesh.worker.generation import Generation, Job
from qmesh.worker.gguf import kv_bytes_per_token
from qmesh.worker.http_client import LlamaHttpClient
from qmesh.worker.link import BrokerLink, Wakeup
from qmesh.worker.models import ModelFile
from qmesh.worker.monitor import SystemMonitor
from qmesh.worker.process import LlamaProcessManager

log = logging.getLogger(__name__)

MAX_POLL_SECONDS = 0.25  # how often a stop request and llama-server's state are looked at when nothing happens


@dataclass(slots=True)
class WorkerSettings:
    broker: str
    model: ModelFile
    service: str
    binary: LlamaServerBinary
    slots: int = 1
    ctx_size: int = 2048  # tokens of context per slot
    gpu_layers: int = 0
    cpu_threads: int | None = None
    heartbeat_interval: float = 2.5
    liveness: int = 3
    grace: float = 30.0  # seconds in-flight requests may take to finish at shutdown
    load_timeout: float = 120.0
    max_restarts: int = 3  # llama-server restarts in a row before the thread gives up
    pause_after: float = 1.0  # seconds without the client's credit before llama-server is paused
    stall_timeout: float = 60.0  # seconds a stream may wait for the client's credit before it is cancelled (408)
    worker_id: str = ""
    max_reconnect_delay: float = 30.0
    curve: CurveClientKeys | None = None  # own key pair and the broker's public key, when the broker uses CURVE
    cache_ram: int = 0  # MiB of host memory for llama-server's prompt cache (0: none)
    embeddings: bool = False  # serve embeddings (llama-server in embedding mode) instead of chat
    pooling: str = "mean"  # how an embedding worker's llama-server pools token vectors: mean, cls or last
    sidecar_args: tuple[str, ...] = ()  # more llama-server arguments: a split worker's --rpc (worker/split.py)
    split: list[dict[str, object]] | None = None  # READY's "split": the shard hosts its model is spread over


def embedding_args(settings: WorkerSettings) -> tuple[str, ...]:
    """llama-server in embedding mode. It embeds a text in one batch, so a batch holds a whole slot's context:
    any text that fits the context can be embedded."""
    batch = str(settings.ctx_size)
    return ("--embeddings", "--pooling", settings.pooling, "--batch-size", batch, "--ubatch-size", batch)


def _content(model: ModelFile) -> dict[str, object]:
    """READY's sha256 and size of the model file, when known: the mesh knows a model by its content."""
    return {} if model.digest is None else {"sha256": model.digest.sha256, "size": model.digest.size}


def prefix_capacity(settings: WorkerSettings, context: int) -> int:
    """Prompt tokens llama-server keeps: its slots' contexts plus what ``cache_ram`` holds of this model's KV."""
    per_token = kv_bytes_per_token(settings.model.path) if settings.cache_ram > 0 else None
    cached = settings.cache_ram * 2**20 // per_token if per_token else 0
    return settings.slots * context + cached


class SidecarWatch:
    """llama-server's health as the core needs it. After a restart, or once a slot saw it fail, it counts as
    down until it answers /health again."""

    def __init__(self, manager: LlamaProcessManager) -> None:
        self.manager = manager
        self.client = LlamaHttpClient(manager.base_url)
        self.suspect = False
        self._restarts = manager.restarts

    def healthy(self) -> bool:
        manager = self.manager
        if manager.restarts != self._restarts:
            self._restarts = manager.restarts
            self.client = LlamaHttpClient(manager.base_url)  # a restart may have moved it to another port
            self.suspect = True
            return False  # down at least this once, even if it came back between two looks
        if manager.state != "ready":
            return False
        if self.suspect:
            if not manager.is_healthy():
                return False
            self.suspect = False
        return True


class WorkerNode(threading.Thread):
    """Serves one model through the broker until ``stop()``; ``failure`` says why it ended, if it failed."""

    def __init__(self, settings: WorkerSettings, index: int = 0, context: zmq.Context | None = None) -> None:
        super().__init__(name=f"qmesh-worker-{index}", daemon=True)
        self.settings = settings
        self.worker_name = f"{socket.gethostname()}/{os.getpid()}/{index}"
        self.context = context or zmq.Context.instance()
        self.failure: str | None = None
        self.registered = threading.Event()
        self.manager: LlamaProcessManager | None = None
        self.watch: SidecarWatch | None = None
        capability = p.EMBEDDINGS if settings.embeddings else p.CHAT
        info = {
            "slots": settings.slots,
            "name": self.worker_name,
            "worker_id": settings.worker_id,
            "instance": secrets.token_hex(16),  # this worker's, for its life: the broker knows it when it reconnects
            "model_file": settings.model.path.name,
            **_content(settings.model),
            "version": 1,
            "capabilities": [capability],
        }
        if settings.split is not None:
            info["split"] = settings.split
        config = WorkerConfig(
            brokers=broker_endpoints(settings.broker),
            service=settings.service,
            slots=settings.slots,
            info=info,
            heartbeat_interval=settings.heartbeat_interval,
            liveness=settings.liveness,
            grace=settings.grace,
            max_reconnect_delay=settings.max_reconnect_delay,
            capability=capability,
        )
        if settings.curve is not None:
            settings.curve.check_brokers(len(config.brokers))
        self.core = WorkerCore(config, time.monotonic())
        self._model_reader = ModelReader()  # the model's bytes, for the broker's READs (a pull from this worker)
        self._wakeup = Wakeup()
        self.link = BrokerLink(self.context, self._wakeup, settings.curve)
        self._stop_requested = threading.Event()
        self._jobs_to_run: queue.Queue[Job | None] = queue.Queue()
        self._slot_events: queue.SimpleQueue[tuple[Job, bytes | None]] = queue.SimpleQueue()  # None: sidecar down
        self._monitor = SystemMonitor()
        self._rate_mark = (time.monotonic(), 0)

    def stop(self) -> None:
        """Stop taking work, let in-flight requests finish within the grace period, then disconnect."""
        self._stop_requested.set()

    # ------------------------------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        s = self.settings
        self.manager = LlamaProcessManager(
            s.model.path,
            s.binary,
            ctx_size=s.ctx_size * s.slots,
            gpu_layers=s.gpu_layers,
            parallel=s.slots,
            threads=s.cpu_threads,
            load_timeout=s.load_timeout,
            max_restarts=s.max_restarts,
            extra_args=("--cache-ram", str(s.cache_ram), *(embedding_args(s) if s.embeddings else ()), *s.sidecar_args),
        )
        self._wakeup.open()
        slot_threads = [
            threading.Thread(target=self._slot_loop, name=f"{self.name}-slot-{i}", daemon=True) for i in range(s.slots)
        ]
        try:
            self.manager.start()
            self.watch = SidecarWatch(self.manager)
            # READY tells the mesh how much fits in one request, as llama-server itself reports it, and how many
            # prompt tokens its slots and its host-memory prompt cache hold (what the broker's prefix index tracks).
            context = self.watch.client.slot_context()
            self.core.config.info["context"] = context
            self.core.config.info["prefix_capacity"] = prefix_capacity(s, context)
            if s.model.digest is not None:  # workers that lack the model may pull it from this one
                self._model_reader.add(s.model.path, s.model.digest)
            for thread in slot_threads:
                thread.start()
            self._serve()
        except QMeshError as exc:
            self._apply(self.core.fail(str(exc), time.monotonic()))
        except Exception as exc:  # a bug: report it rather than let the thread vanish silently
            log.exception("%s crashed", self.worker_name)
            self._apply(self.core.fail(f"internal error: {exc!r}", time.monotonic()))
        finally:
            for _ in slot_threads:
                self._jobs_to_run.put(None)
            for thread in slot_threads:
                if thread.is_alive():
                    thread.join(timeout=5)
            self.link.close(flush=False)
            self.manager.stop()
            self._model_reader.close()
            self.registered.clear()
            self._wakeup.close()

    # ------------------------------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        core, link = self.core, self.link
        poller, polled = zmq.Poller(), -1
        while not core.stopped:
            now = time.monotonic()
            if self._stop_requested.is_set():
                self._apply(core.stop(now))
            self._apply(self._sidecar_state(now))
            if core.stopped:
                return
            if polled != link.connection:  # a new connection: poll its descriptors instead of the old ones
                poller, polled = zmq.Poller(), link.connection
                for item in link.poll_fds():
                    poller.register(item, zmq.POLLIN)
            poller.poll(1000 * min(max(core.next_wakeup() - time.monotonic(), 0.0), MAX_POLL_SECONDS))
            self._wakeup.clear()
            now = time.monotonic()
            for frames in link.receive():  # whatever woke us: a slot's send may have taken the DEALER's signal
                self._apply(core.on_broker_message(frames, now))
            self._take_slot_events(now)
            refusal, gone = link.connection_events()
            if refusal is not None:
                self._apply(core.fail(self._with_key(refusal), now, leave=False))
            elif gone:
                self._apply(core.on_broker_gone(now))
            self._apply(core.tick(now))

    def _sidecar_state(self, now: float) -> list[Effect]:
        assert self.manager is not None and self.watch is not None
        if self.manager.state == "failed":
            return self.core.fail(f"llama-server failed for good: {self.manager.failure}", now)
        return self.core.on_sidecar(self.watch.healthy(), now)

    def _take_slot_events(self, now: float) -> None:
        while True:
            try:
                job, final = self._slot_events.get_nowait()
            except queue.Empty:
                return
            if final is None:  # the slot found llama-server down: leave now, register again once it answers
                assert self.watch is not None
                self.watch.suspect = True
                self._apply(self.core.on_sidecar(False, now))
            else:
                self._apply(self.core.on_job_finished(job, final, now))

    def _apply(self, effects: list[Effect]) -> None:
        link = self.link
        for effect in effects:
            match effect:
                case Send(frames):
                    link.send(frames)
                case SendHeartbeat(busy, draining):
                    link.send(p.heartbeat(self._load(busy, draining)))
                case Connect(connection, endpoint):
                    link.open(connection, endpoint, self.core.config.brokers.index(endpoint))
                case Close(flush):
                    link.close(flush)
                case StartJob(job):
                    self._jobs_to_run.put(job)
                case CancelJob(job):
                    job.cancel()
                case GrantCredit(job, credit):
                    job.grant(credit)
                case Rebind(job, route_key, connection, delivered_tokens, window):
                    resent = link.rebind(job, route_key, connection, delivered_tokens)
                    job.reset_credit(max(0, window - resent))
                case ServeRead(read_key, read):
                    link.send(self._model_reader.answer(read_key, read))
                    self._wakeup.ring()  # the send may have taken the socket's signal of the next READ: look again
                case Exit(failure):
                    self.failure = failure
        if self.core.registered:
            self.registered.set()
        else:
            self.registered.clear()
        if link.broken and link.connection == self.core.connection:  # a send above, or a slot's, was refused
            self._apply(self.core.on_connection_lost("the broker stopped taking our messages", time.monotonic()))

    def _load(self, busy: int, draining: bool) -> dict[str, object]:
        assert self.manager is not None
        sample = self._monitor.sample(self.manager.state == "ready")
        now, chunks, (since, sent) = time.monotonic(), self.link.chunks_sent, self._rate_mark
        self._rate_mark = (now, chunks)
        return {
            "health": sample.health,
            "busy": busy,
            "cpu": sample.cpu_percent,
            "memory": sample.memory_percent,
            "draining": draining,
            "tokens_per_second": round((chunks - sent) / max(now - since, 1e-3), 1),
            "host": socket.gethostname(),
        }

    def _with_key(self, refusal: str) -> str:
        curve = self.settings.curve
        key = "" if curve is None else f"this worker's key {key_fingerprint(curve.own.public)}..., "
        return f"{refusal} ({key}model {self.settings.service!r})"

    # ------------------------------------------------------------------------------------------ slots

    def _slot_loop(self) -> None:
        while (job := self._jobs_to_run.get()) is not None:
            self._run(job)

    def _run(self, job: Job) -> None:
        assert self.manager is not None and self.watch is not None
        link, events, wakeup = self.link, self._slot_events, self._wakeup

        def send_chunk(body: bytes, tokens: int) -> None:
            link.send_chunk(job, body, tokens)

        def send_final(body: bytes | None) -> None:  # through the loop thread, after every chunk this thread sent
            events.put((job, body))
            wakeup.ring()

        runner: Generation | Embedding
        digest = self.settings.model.digest
        sha256 = digest.sha256 if digest is not None else None
        if isinstance(job.request, EmbeddingRequest):
            name, model = self.worker_name, self.settings.service
            runner = Embedding(job, self.watch.client, send_final, worker_name=name, model=model, model_sha256=sha256)
        else:
            runner = Generation(
                job,
                self.watch.client,
                send_chunk,
                send_final,
                worker_name=self.worker_name,
                model=self.settings.service,
                pause_after=self.settings.pause_after,
                stall_timeout=self.settings.stall_timeout,
                model_sha256=sha256,
            )
        try:
            runner.run()
        except SidecarError as exc:
            if job.cancelled.is_set():
                send_final(p.error_body(p.CANCELLED, "cancelled"))
            elif not self.manager.is_healthy():
                send_final(None)  # the loop leaves the broker, which resumes the request elsewhere
            else:
                send_final(p.error_body(p.WORKER_FAILED, f"llama-server error: {exc}"))
        except Exception as exc:
            log.exception("%s: generation failed", self.worker_name)
            send_final(p.error_body(p.WORKER_FAILED, f"worker error: {exc!r}"))
