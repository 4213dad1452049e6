"""The client side of model transfers (``docs/PROTOCOL.md``, section 12): pulling a model from the mesh into a
models folder, and pushing one into the broker's store. ``qmesh-worker`` pulls the model it lacks with it, and
``qmesh-models pull`` and ``push`` are thin commands around it.

A pull asks the broker for the model by name, learns its sha256 and size, and asks for chunks in order, a window of
them in flight (``common.transfer.Download``). The bytes go to a hidden file named by the model's content, hashed
as they are written, and the file is renamed into place only once its sha256 matches. An interrupted pull leaves
that file behind, and the next one goes on from its bytes. A holder that vanished, a transfer that stalled or bytes
that did not verify mean another attempt (the broker then takes another holder); after a few, a clear error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import zmq
from zmq.utils.monitor import recv_monitor_message

from qmesh.common import protocol as p
from qmesh.common.endpoints import broker_endpoints
from qmesh.common.errors import TransferFailed
from qmesh.common.fastio import recv_frames, send_frames
from qmesh.common.keys import HANDSHAKE_EVENTS, CurveClientKeys, HandshakeWatch
from qmesh.common.modelfiles import DigestCache, IncomingFile, free_bytes, partial_path, space_problem
from qmesh.common.transfer import Download, Progress, check_model_name

log = logging.getLogger(__name__)

ATTEMPTS = 4  # pulls of one model before giving up
RETRY_DELAYS = (0.5, 2.0, 5.0)  # seconds before the second, third, fourth attempt
CONNECT_TIMEOUT = 10.0  # seconds for the broker's first answer
STALL_TIMEOUT = 30.0  # seconds without a byte before an attempt is given up
# Codes after which another attempt may succeed: the holders went away, a limit on transfers, a stall.
RETRYABLE = frozenset({p.WORKER_FAILED, p.TOO_MANY_REQUESTS, p.CLIENT_STALLED})


@dataclass(slots=True, frozen=True)
class PullResult:
    model: p.ModelInfo
    path: Path
    received: int  # bytes that came through the mesh in this run (every attempt)
    resumed_at: int  # bytes already on disk when this run began
    seconds: float
    attempts: int


class _Retry(Exception):
    """An attempt failed in a way another attempt may not."""


class _Elsewhere(Exception):
    """This broker does not serve (the passive one of a pair, or silent): the other one may."""


class TransferLink:
    """One DEALER to the broker for transfers, with this side's CURVE keys; a refused handshake ends every wait at
    once with the reason, as the SDK's does."""

    def __init__(
        self,
        broker: str,
        curve: CurveClientKeys | None = None,
        context: zmq.Context | None = None,
        broker_index: int = 0,
    ) -> None:
        self.broker = broker
        self._socket = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES + 64 * 1024)
        self._socket.setsockopt(zmq.RCVHWM, 0)  # the window bounds what is queued, not a high-water mark
        if curve is not None:
            curve.apply(self._socket, broker_index)
        self._monitor = self._socket.get_monitor_socket(HANDSHAKE_EVENTS)
        self._handshakes = HandshakeWatch(broker, curve is not None)
        try:
            self._socket.connect(broker)
        except zmq.ZMQError as exc:
            self.close()
            raise TransferFailed(f"bad broker address {broker!r}: {exc}") from exc
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def send(self, frames: list[bytes]) -> None:
        try:
            send_frames(self._socket, frames)
        except zmq.Again as exc:  # nothing connected yet and the queue is full: the broker is not there
            raise TransferFailed(f"cannot reach the broker at {self.broker}") from exc

    def receive(self, timeout: float) -> p.TransferReply | None:
        """The next transfer reply, or None after ``timeout`` seconds without one."""
        deadline = time.monotonic() + timeout
        while True:
            events = dict(self._poller.poll(max(0.0, deadline - time.monotonic()) * 1000))
            if self._monitor in events:
                event = recv_monitor_message(self._monitor)
                failure = self._handshakes.refusal(event["event"], event["value"])
                if failure is not None:
                    raise TransferFailed(failure)
            if self._socket in events:
                try:
                    return p.parse_transfer_reply(recv_frames(self._socket))
                except p.ProtocolError as exc:
                    log.warning("dropped a malformed transfer reply: %s", exc)
            if time.monotonic() >= deadline:
                return None

    def close(self) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)


class ProgressReport:
    """A transfer's progress for the person running it: a line rewritten in place on a terminal (``stream``, stderr
    when it is one), and a log line every ``log_every`` seconds and at the end."""

    def __init__(self, stream: TextIO | None = None, log_every: float = 5.0) -> None:
        self.stream = stream if stream is not None else (sys.stderr if sys.stderr.isatty() else None)
        self.log_every = log_every
        self._shown = self._logged = float("-inf")

    def __call__(self, progress: Progress, now: float, final: bool = False) -> None:
        line = progress.line(now)
        if self.stream is not None and (final or now - self._shown >= 0.25):
            self._shown = now
            self.stream.write(f"\r\033[K{line}" + ("\n" if final else ""))
            self.stream.flush()
        if final or now - self._logged >= self.log_every:
            self._logged = now
            log.info("%s", line)


def pull_model(
    name: str,
    folder: Path,
    broker: str,
    *,
    curve: CurveClientKeys | None = None,
    sha256: str | None = None,
    digests: DigestCache | None = None,
    report: Callable[[Progress, float, bool], None] | None = None,
    free_space: Callable[[Path], int] = free_bytes,
    connect_timeout: float = CONNECT_TIMEOUT,
    stall_timeout: float = STALL_TIMEOUT,
    attempts: int = ATTEMPTS,
    context: zmq.Context | None = None,
) -> PullResult:
    """Pull model ``name`` (exactly this content, if ``sha256`` is given) into ``folder/NAME.gguf``.

    ``broker`` may name a pair (``tcp://A:5555,tcp://B:5556``): the pull goes to the one that serves. ``digests``
    learns the sha256 of the file written, so nothing hashes it again; ``report`` is called with the progress as
    bytes arrive; ``free_space`` says how many bytes are free in a folder (the check before the bytes come: tests
    pass a small figure). Raises TransferFailed with a message that names the model and the cause.
    """
    check_model_name(name)
    endpoints = broker_endpoints(broker)
    started, received, resumed_at, last = time.monotonic(), 0, None, ""
    attempt, turn = 0, 0  # attempts made; brokers of a pair asked in this attempt
    link = TransferLink(endpoints[0], curve, context)
    try:
        while attempt < attempts:
            others_left = turn + 1 < len(endpoints)
            pull = _Pull(link, name, folder, sha256, report, free_space, connect_timeout, stall_timeout, others_left)
            try:
                path = pull.run()
            except _Elsewhere:  # the other broker of the pair, at once
                turn += 1
                link.close()
                link = TransferLink(endpoints[turn % len(endpoints)], curve, context, turn % len(endpoints))
                continue
            except _Retry as exc:
                attempt, turn, last = attempt + 1, 0, str(exc)
                if attempt < attempts:
                    delay = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS)) - 1]
                    log.warning("pull of %s: %s; trying again in %.1f s", name, last, delay)
                    time.sleep(delay)
                continue
            finally:  # whatever ended it, what this pull received counts, from a broker of a pair that left too
                received += pull.received
                resumed_at = pull.resumed_at if resumed_at is None else resumed_at
            assert pull.model is not None
            if digests is not None:
                digests.remember(path, pull.model.sha256)
            return PullResult(pull.model, path, received, resumed_at, time.monotonic() - started, attempt + 1)
    finally:
        link.close()
    raise TransferFailed(f"could not pull model {name!r} from the mesh after {attempts} attempts: {last}")


class _Pull:
    """One attempt: one transfer from FETCH to END."""

    def __init__(
        self,
        link: TransferLink,
        name: str,
        folder: Path,
        sha256: str | None,
        report: Callable[[Progress, float, bool], None] | None,
        free_space: Callable[[Path], int],
        connect_timeout: float,
        stall_timeout: float,
        others_left: bool,
    ) -> None:
        """``others_left``: another broker of a pair may serve if this one does not."""
        self.link, self.name, self.folder, self.sha256 = link, name, folder, sha256
        self.report, self.free_space = report, free_space
        self.connect_timeout, self.stall_timeout = connect_timeout, stall_timeout
        self.transfer_id = os.urandom(8)
        self.model: p.ModelInfo | None = None
        self.received = 0
        self.resumed_at = 0
        self.others_left = others_left
        self.silent = False  # the broker did not answer at all

    def run(self) -> Path:
        link, transfer_id = self.link, self.transfer_id
        link.send(p.model_fetch(transfer_id, self.name, self.sha256))
        try:
            offer = self._next(self.connect_timeout, f"no answer from the broker at {link.broker}")
        except TransferFailed as exc:
            if self.others_left and self.silent:
                raise _Elsewhere from exc
            raise
        if offer.command != p.C_OFFER or offer.model is None:
            raise TransferFailed(f"the broker answered a pull with {offer.command!r}, not an offer")
        model = self.model = offer.model
        if model.name != self.name:
            raise TransferFailed(f"asked for model {self.name!r}, the broker offered {model.name!r}")
        partial = partial_path(self.folder, model)
        have = partial.stat().st_size if partial.is_file() else 0
        problem = space_problem(self.folder, model, min(have, model.size), self.free_space(self.folder))
        if problem is not None:  # said before a byte is written
            link.send(p.transfer_end(transfer_id, p.OUTCOME_CANCELLED))
            raise TransferFailed(problem)
        incoming = IncomingFile(self.folder, model)
        self.resumed_at = incoming.have
        if incoming.have:
            log.info("pull of %s resumes at %.1f of %.1f MB", model.name, incoming.have / 1e6, model.size / 1e6)
        try:
            self._receive(incoming, Download(model.size, incoming.have, offer.chunk, offer.window))
        except BaseException:
            incoming.close()  # the bytes stay: the next attempt (or run) goes on from them
            _end_quietly(link, transfer_id)
            raise
        if incoming.finish():
            link.send(p.transfer_end(transfer_id, p.OUTCOME_OK))
            return incoming.final_path
        # Bytes from before a resume may be the bad ones (a crash mid-write): blame the holders only for a whole run.
        link.send(p.transfer_end(transfer_id, p.OUTCOME_CANCELLED if self.resumed_at else p.OUTCOME_MISMATCH))
        raise _Retry(f"the bytes received do not hash to sha256 {model.sha256}; they were dropped")

    def _receive(self, incoming: IncomingFile, download: Download) -> None:
        link, transfer_id, model = self.link, self.transfer_id, incoming.model
        progress = Progress(f"pulling {model.name}", model.size, incoming.have, time.monotonic())
        while not download.complete:
            for offset, length in download.requests():
                link.send(p.chunk_request(transfer_id, offset, length))
            reply = self._next(self.stall_timeout, f"no bytes for {self.stall_timeout:g} s")
            if reply.command != p.C_DATA:
                raise TransferFailed(f"the broker answered a chunk request with {reply.command!r}")
            try:
                pieces = download.on_data(reply.offset, reply.data)
            except TransferFailed as exc:
                raise _Retry(str(exc)) from exc
            for piece in pieces:
                incoming.append(piece)
            self.received += len(reply.data)
            progress.done = download.written
            if self.report is not None:
                self.report(progress, time.monotonic(), download.complete)

    def _next(self, timeout: float, silence: str) -> p.TransferReply:
        """The next reply on this transfer; an ENDED is raised, as final or retryable by its code."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            reply = self.link.receive(left)
            if reply is None:
                break
            if reply.transfer_id != self.transfer_id:
                continue  # a late answer on an earlier attempt's transfer
            if reply.command == p.C_ENDED:
                code, message = reply.error or (p.WORKER_FAILED, "the broker ended the transfer")
                if code == p.NOT_ACTIVE and self.others_left:  # passive, or it stepped down mid-pull
                    raise _Elsewhere(message)
                if code in RETRYABLE:
                    raise _Retry(f"{code}: {message}")
                raise TransferFailed(f"cannot pull model {self.name!r}: {message}")
            return reply
        if self.model is None:
            self.silent = True
            raise TransferFailed(f"cannot pull model {self.name!r}: {silence} (is qmesh-broker running there?)")
        raise _Retry(silence)


def push_model(
    path: Path,
    name: str,
    broker: str,
    digests: DigestCache,
    *,
    curve: CurveClientKeys | None = None,
    report: Callable[[Progress, float, bool], None] | None = None,
    connect_timeout: float = CONNECT_TIMEOUT,
    stall_timeout: float = STALL_TIMEOUT,
    context: zmq.Context | None = None,
) -> p.ModelInfo:
    """Push the file at ``path`` into the broker's store as model ``name`` (``broker`` may name a pair: the push goes
    to the one that serves); returns the model as stored. The store acknowledges what it wrote; no more than a window
    of chunks is ever unacknowledged. Raises TransferFailed."""
    check_model_name(name)
    digest = digests.digest(path)
    model = p.ModelInfo(name, digest.sha256, digest.size)
    endpoints = broker_endpoints(broker)
    for index, endpoint in enumerate(endpoints):
        link = TransferLink(endpoint, curve, context, index)
        transfer_id = os.urandom(8)
        try:
            link.send(p.model_push(transfer_id, model))
            reply = _push_reply(link, transfer_id, connect_timeout)
            passive = reply is not None and reply.error is not None and reply.error[0] == p.NOT_ACTIVE
            if (reply is None or passive) and index + 1 < len(endpoints):
                continue  # the other broker of the pair
            if reply is None:
                raise TransferFailed(f"cannot push: no answer from the broker at {endpoint}")
            return _push_bytes(link, transfer_id, path, model, reply, report, stall_timeout)
        except BaseException:
            _end_quietly(link, transfer_id)
            raise
        finally:
            link.close()
    raise AssertionError("broker_endpoints names at least one broker")


def _push_bytes(
    link: TransferLink,
    transfer_id: bytes,
    path: Path,
    model: p.ModelInfo,
    reply: p.TransferReply,
    report: Callable[[Progress, float, bool], None] | None,
    stall_timeout: float,
) -> p.ModelInfo:
    """The bytes of a push the broker answered with ``reply``: from its offer's offset, a window at a time."""
    if reply.command == p.C_OFFER:
        sent = acked = reply.offset
        progress = Progress(f"pushing {model.name}", model.size, reply.offset, time.monotonic())
        with open(path, "rb", buffering=0) as handle:
            while reply.command != p.C_ENDED:
                while sent < model.size and sent - acked < reply.chunk * reply.window:
                    data = os.pread(handle.fileno(), min(reply.chunk, model.size - sent), sent)
                    if not data:
                        raise TransferFailed(f"{path} is shorter than the {model.size} bytes it had when hashed")
                    link.send(p.push_chunk(transfer_id, sent, data))
                    sent += len(data)
                answer = _push_reply(link, transfer_id, stall_timeout)
                if answer is None:
                    raise TransferFailed(f"cannot push: no answer from the broker for {stall_timeout:g} s")
                if answer.command == p.C_ACK:
                    acked = progress.done = answer.offset
                    if report is not None:
                        report(progress, time.monotonic(), acked == model.size)
                elif answer.command == p.C_ENDED:
                    reply = answer
                else:
                    raise TransferFailed(f"the broker answered a push's bytes with {answer.command!r}")
    if reply.command != p.C_ENDED:
        raise TransferFailed(f"the broker answered a push with {reply.command!r}")
    if reply.error is not None:
        raise TransferFailed(f"the broker refused the push: {reply.error[1]}")
    return reply.model or model  # stored (or the store had it already)


def _end_quietly(link: TransferLink, transfer_id: bytes) -> None:
    """Tell the broker a transfer is given up, if it can still be told (so it frees the holder at once)."""
    with contextlib.suppress(TransferFailed):
        link.send(p.transfer_end(transfer_id, p.OUTCOME_CANCELLED))


def _push_reply(link: TransferLink, transfer_id: bytes, timeout: float) -> p.TransferReply | None:
    """The broker's next answer on this push, or None after ``timeout`` seconds of silence."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        reply = link.receive(left)
        if reply is None:
            return None
        if reply.transfer_id == transfer_id:
            return reply
    return None
