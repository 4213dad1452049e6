"""A worker thread's connection to the broker: one DEALER, and the one place where other threads may use it.

The loop thread opens, reads and closes the connection. Slot threads send their PARTIALs on it themselves: one
thread wake-up per token instead of two (handing each chunk to the loop thread cost about 0.1 ms of CPU per
token; ``docs/BENCHMARKS.md``, "worker chunk path"). ZeroMQ sockets are not thread-safe, but may be shared
with a full memory barrier around every use, so every call on the DEALER here is made holding ``_lock``, and
the loop never waits inside libzmq: it polls the socket's ZMQ_FD and the ``wakeup`` eventfd (``poll_fds``).
A send processes the socket's pending commands and may take the ZMQ_FD's signal, so a chunk send that finds a
broker message waiting rings ``wakeup`` instead.

A send the DEALER refuses (its queue to the broker is full) marks the connection ``broken``: nothing after a
lost message may reach the broker, so the loop replaces the connection and the broker resumes our requests
from what it did receive. A chunk of an earlier connection is never sent on a later one.
"""

from __future__ import annotations

import logging
import os
import threading

import zmq
from zmq.utils.monitor import recv_monitor_message

from qmesh.common import protocol as p
from qmesh.common.fastio import recv_frames, send_frames
from qmesh.common.keys import HANDSHAKE_EVENTS, CurveClientKeys, HandshakeWatch
from qmesh.worker.generation import Job

log = logging.getLogger(__name__)

_POLLIN = int(zmq.POLLIN)
_EVENTS = int(zmq.EVENTS)


class Wakeup:
    """An eventfd another thread rings to wake the loop thread's poll; open while the loop runs."""

    def __init__(self) -> None:
        self.fd = -1
        self._lock = threading.Lock()  # ring() after close() must not write to a reused descriptor

    def open(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def ring(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.eventfd_write(self.fd, 1)

    def clear(self) -> bool:
        """Reset; True if it had been rung."""
        try:
            return os.eventfd_read(self.fd) > 0
        except BlockingIOError:
            return False

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class BrokerLink:
    def __init__(self, context: zmq.Context, wakeup: Wakeup, curve: CurveClientKeys | None = None) -> None:
        self.context = context
        self.endpoint = ""  # of the open (or last) connection
        self.curve = curve
        self.wakeup = wakeup
        self.connection = 0  # the number of the open connection, 0 when none is open
        self.broken = False
        self.chunks_sent = 0  # PARTIALs sent (one token each from llama-server): tokens/s in heartbeats
        self._lock = threading.Lock()
        self._dealer: zmq.Socket | None = None
        self._handshake_events: zmq.Socket | None = None
        self._handshakes = HandshakeWatch("")

    # ------------------------------------------------------------------------------------------ loop thread

    def open(self, connection: int, endpoint: str, broker_index: int = 0) -> None:
        """A new DEALER (a new routing id) to ``endpoint``, broker number ``broker_index`` of ``--broker`` (whose
        CURVE key it expects), for connection number ``connection``."""
        with self._lock:
            assert self._dealer is None, "open() while a connection is open"
            dealer = self.context.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES + 64 * 1024)
            if self.curve is not None:
                self.curve.apply(dealer, broker_index)
            self._handshake_events = dealer.get_monitor_socket(
                HANDSHAKE_EVENTS | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
            )
            self.endpoint = endpoint
            self._handshakes = HandshakeWatch(endpoint, self.curve is not None)
            dealer.connect(endpoint)
            self._dealer, self.connection, self.broken = dealer, connection, False

    def close(self, flush: bool) -> None:
        """Close the connection; ``flush`` gives what was just sent a moment (200 ms at most) to leave."""
        with self._lock:
            if self._dealer is None:
                return
            assert self._handshake_events is not None
            self._dealer.disable_monitor()
            self._handshake_events.close(linger=0)
            self._dealer.close(linger=200 if flush else 0)
            self._dealer, self._handshake_events, self.connection = None, None, 0

    def send(self, frames: list[bytes]) -> bool:
        """Send without blocking; False if the connection is closed or broken (this send may have broken it)."""
        with self._lock:
            return self._send(frames)

    def receive(self) -> list[list[bytes]]:
        """Everything the broker sent that is waiting."""
        messages: list[list[bytes]] = []
        with self._lock:
            while self._dealer is not None:
                try:
                    messages.append(recv_frames(self._dealer))
                except zmq.Again:
                    break
        return messages

    def poll_fds(self) -> list[int | zmq.Socket]:
        """What the loop polls for input: the DEALER's ZMQ_FD (the descriptor only: no libzmq call outside the
        lock), its handshake monitor and the wake-up eventfd. Changes with every ``open``."""
        with self._lock:
            if self._dealer is None:
                return [self.wakeup.fd]
            assert self._handshake_events is not None
            return [self._dealer.getsockopt(zmq.FD), self._handshake_events, self.wakeup.fd]

    def connection_events(self) -> tuple[str | None, bool]:
        """(why the broker refused the secure handshake, if it did: a refusal that retrying cannot fix; whether the
        connection closed under us or could not be made: the broker's process died, or its machine is gone)."""
        gone = False
        with self._lock:
            while self._handshake_events is not None and self._handshake_events.poll(0):
                message = recv_monitor_message(self._handshake_events)
                event = message["event"]
                failure = self._handshakes.refusal(event, message["value"])  # the value tells a mechanism mismatch
                if failure is not None:
                    return failure, gone
                gone |= event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECT_RETRIED)
        return None, gone

    # ------------------------------------------------------------------------------------------ slot threads

    def send_chunk(self, job: Job, body: bytes, tokens: int) -> bool:
        """A slot thread's PARTIAL of ``job``: kept in ``job.sent`` (a stream may outlive its broker), and sent only
        on the connection the job belongs to. Rings the loop when the send found a broker message waiting or broke
        the connection."""
        with self._lock:
            if job.stream_id is not None:  # only a named stream can be handed to another broker
                job.sent.append((body, tokens))
            if job.connection != self.connection:
                return False  # a request of an earlier connection (or one kept while there is no broker)
            was_broken = self.broken
            sent = self._send(p.worker_reply(False, job.route_key, [body]))
            if sent:
                self.chunks_sent += 1
                assert self._dealer is not None
                wake = bool(self._dealer.getsockopt(_EVENTS) & _POLLIN)  # a message is waiting: the loop must look
            else:
                wake = self.broken and not was_broken  # this chunk broke the connection
        if wake:
            self.wakeup.ring()
        return sent

    def rebind(self, job: Job, route_key: bytes, connection: int, delivered_tokens: int) -> int:
        """Hand a generation kept running to a new broker connection, where its client asked for it again having
        received ``delivered_tokens`` tokens: the PARTIALs after those are sent at once (the slot thread's next
        ones follow on the new connection). Returns how many were sent."""
        with self._lock:
            job.route_key, job.connection = route_key, connection
            skipped, resent = 0, 0
            for body, tokens in job.sent:
                if skipped < delivered_tokens:
                    skipped += tokens
                    continue
                if not self._send(p.worker_reply(False, route_key, [body])):
                    break
                resent += 1
            return resent

    # ------------------------------------------------------------------------------------------ internals

    def _send(self, frames: list[bytes]) -> bool:
        if self._dealer is None or self.broken:
            return False
        try:
            send_frames(self._dealer, frames)
        except zmq.Again:
            log.warning("the broker at %s is not taking messages", self.endpoint)
            self.broken = True
            return False
        return True
