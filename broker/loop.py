"""The broker's socket loop: one ROUTER socket around ``BrokerCore``. It only moves bytes and reads the clock."""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import zmq

from qmesh.broker.core import BrokerConfig, BrokerCore, Outgoing
from qmesh.common import protocol as p
from qmesh.common.errors import QMeshError
from qmesh.common.fastio import recv_routed, send_routed

if TYPE_CHECKING:
    from qmesh.broker.metrics import BrokerMetrics
    from qmesh.broker.security import BrokerSecurity

log = logging.getLogger(__name__)

MAX_POLL_MS = 250  # how often a stop request is noticed when nothing else happens
DRAIN_BATCH = 2000  # messages handled per wake-up before timers get a turn


class Broker:
    """Binds a ROUTER socket and runs the core until ``stop()``. ``run()`` may be called in any one thread."""

    def __init__(
        self,
        bind: str,
        config: BrokerConfig | None = None,
        context: zmq.Context | None = None,
        metrics: BrokerMetrics | None = None,
        security: BrokerSecurity | None = None,
    ) -> None:
        self.config = config or BrokerConfig()
        self.core = BrokerCore(self.config, time.monotonic())
        self.metrics = metrics
        if metrics is None:
            # Nobody reads the records: a zero-length deque drops each one as it is appended, at no cost.
            self.core.finished = deque(maxlen=0)
        self._context = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._reload_requested = threading.Event()
        # A byte on this pair wakes the poll, so a reload does not wait for the next timer (up to a heartbeat).
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self.security = security
        self.socket = self._context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unroutable send raises instead of vanishing
        self.socket.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES + 64 * 1024)
        self.socket.setsockopt(zmq.SNDHWM, 100_000)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        if security is not None:
            security.start(self._context)  # the ZAP handler must run before the socket binds
            security.configure(self.socket)
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.socket.close()
            if security is not None:
                security.stop()
            raise OSError(f"cannot bind the broker to {bind}: {exc}") from exc
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def stop(self) -> None:
        self._stop.set()

    def reload_keys(self) -> None:
        """Re-read the allow-lists at once (SIGHUP); safe to call from a signal handler or from another thread."""
        self._reload_requested.set()
        with contextlib.suppress(OSError):  # full: a wake-up is already pending; closed: the loop has ended
            self._wake_writer.send(b"\0")

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(self._wake_reader, zmq.POLLIN)
        log.info("broker listening on %s", self.endpoint)
        try:
            while not self._stop.is_set():
                timeout = (self.core.next_wakeup() - time.monotonic()) * 1000
                ready = dict(poller.poll(min(MAX_POLL_MS, max(0, timeout))))
                if self.socket in ready:
                    self._drain()
                if self._wake_reader.fileno() in ready:  # pyzmq names a plain socket by its descriptor
                    with contextlib.suppress(BlockingIOError):
                        self._wake_reader.recv(4096)
                    self._reload_keys_if_needed()
                now = time.monotonic()
                if now >= self.core.next_wakeup():
                    self._send(self.core.tick(now), now)
                    self._reload_keys_if_needed()
                if self.metrics is not None:
                    self.metrics.update(self.core, now)  # once per wake-up, not per message
        finally:
            self.socket.close(linger=0)
            self._wake_reader.close()
            self._wake_writer.close()
            if self.security is not None:
                self.security.stop()
            log.info("broker stopped")

    def _reload_keys_if_needed(self) -> None:
        if self.security is None:
            return
        try:
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                self.security.reload()
            else:
                self.security.reload_if_changed()
        except QMeshError as exc:  # a bad key file must not take the broker down: keep the lists it has
            log.error("allow-lists not reloaded: %s", exc)

    def _drain(self) -> None:
        """Handle what is waiting, but give the timers (heartbeats, expiry) their turn under a flood."""
        socket, core, security = self.socket, self.core, self.security
        wakeup = core.next_wakeup()
        peer = None
        for count in range(DRAIN_BATCH):
            try:
                if security is None:
                    identity, frames = recv_routed(socket)
                else:  # frames as zmq.Frame, which carry the sender's authenticated key
                    raw = socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    peer = security.peer(raw[1].get("User-Id") if len(raw) > 1 else "")
                    identity, *frames = [frame.bytes for frame in raw]
            except zmq.Again:
                return
            now = time.monotonic()
            if count % 64 == 63 and now >= wakeup:
                self._send(core.tick(now), now)
                wakeup = core.next_wakeup()
            out = core.on_message(identity, frames, now, peer)
            if out:
                self._send(out, now)

    def _send(self, out: list[Outgoing], now: float) -> None:
        socket, index = self.socket, 0
        while index < len(out):  # the list may grow: a peer found gone produces messages of its own
            identity, frames = out[index]
            index += 1
            try:
                send_routed(socket, identity, frames)
            except zmq.ZMQError as exc:
                if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                    raise
                # Unreachable peer, or one so far behind that its queue is full: treat it as gone rather than
                # dropping a message silently. Its requests are cancelled (client) or requeued (worker).
                reason = "unreachable" if exc.errno == errno.EHOSTUNREACH else "not reading (send queue full)"
                log.warning("peer %s %s", identity.hex(), reason)
                out.extend(self.core.on_unreachable(identity, now))
