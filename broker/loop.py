"""The broker's socket loop: one ROUTER socket around ``BrokerCore``. It only moves bytes and reads the clock.

A broker of a pair (``PairSettings``) also has the HA link: a PUB socket its peer subscribes to, and a SUB socket
on the peer's. ``PairCore`` decides whether it is active; while it is not, every client and worker message is a
vote (which may make it active) or gets the core's "not active" answer.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import zmq
from zmq.utils.monitor import recv_monitor_message

from qmesh.broker.core import BrokerConfig, BrokerCore, Outgoing
from qmesh.broker.pair import PairCore, PairState, Role
from qmesh.broker.transfers import STORE
from qmesh.common import protocol as p
from qmesh.common.errors import QMeshError
from qmesh.common.fastio import recv_routed, send_routed

if TYPE_CHECKING:
    from qmesh.broker.metrics import BrokerMetrics
    from qmesh.broker.models_store import ModelStore
    from qmesh.broker.security import BrokerSecurity

log = logging.getLogger(__name__)

MAX_POLL_MS = 250  # how often a stop request is noticed when nothing else happens
DRAIN_BATCH = 2000  # messages handled per wake-up before timers get a turn


@dataclass(slots=True, frozen=True)
class PairSettings:
    """This broker's place in a primary/backup pair (``--ha``, ``--ha-bind``, ``--ha-peer``)."""

    role: Role
    bind: str  # where this broker publishes its state
    peer: str  # where the peer publishes its state
    peer_key: bytes | None = None  # the peer's CURVE public key (z85), when the brokers use CURVE


class Broker:
    """Binds a ROUTER socket and runs the core until ``stop()``. ``run()`` may be called in any one thread."""

    def __init__(
        self,
        bind: str,
        config: BrokerConfig | None = None,
        context: zmq.Context | None = None,
        metrics: BrokerMetrics | None = None,
        security: BrokerSecurity | None = None,
        pair: PairSettings | None = None,
        store: ModelStore | None = None,
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
        self.store = store  # the broker's own models (--models-dir; its owner closes it): the core's frames to STORE
        if store is not None:
            self.core.transfers.set_store(list(store.models.values()))
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
        self.pair: PairCore | None = None
        if pair is not None:
            self._open_pair(pair)

    def _open_pair(self, settings: PairSettings) -> None:
        self.pair = PairCore(settings.role, time.monotonic(), self.config.heartbeat_interval, self.config.liveness)
        self.core.pair_role = settings.role.value
        self._ha_pub = self._context.socket(zmq.PUB)
        self._ha_pub.setsockopt(zmq.LINGER, 0)
        self._ha_sub = self._context.socket(zmq.SUB)
        self._ha_sub.setsockopt(zmq.LINGER, 0)
        self._ha_sub.setsockopt(zmq.SUBSCRIBE, b"")
        # A peer silent for ``liveness`` heartbeats (its machine cut off) is hung up on and dialled again at once,
        # each attempt given as long: when the network heals, the brokers hear each other within a heartbeat, and
        # two actives settle at once. The old connection would carry the peer's states again only when TCP's backed
        # off retransmission timer fires (seconds after a short cut, minutes after a long one).
        ttl_ms = round(self.config.heartbeat_interval * self.config.liveness * 1000)
        self._ha_sub.setsockopt(zmq.HEARTBEAT_IVL, round(self.config.heartbeat_interval * 1000))
        self._ha_sub.setsockopt(zmq.HEARTBEAT_TIMEOUT, ttl_ms)
        self._ha_sub.setsockopt(zmq.CONNECT_TIMEOUT, ttl_ms)
        if self.security is not None:  # the link is encrypted; only the real peer, holding its secret, can publish
            self.security.configure_ha_link(self._ha_pub, self._ha_sub, settings.peer_key)
        self._ha_events = self._ha_sub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            self._ha_pub.bind(settings.bind)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind the broker pair's HA link to {settings.bind}: {exc}") from exc
        self._ha_sub.connect(settings.peer)
        log.info(
            "broker pair: %s, publishing on %s, listening to %s", settings.role.value, settings.bind, settings.peer
        )

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
        if self.pair is not None:
            poller.register(self._ha_sub, zmq.POLLIN)
            poller.register(self._ha_events, zmq.POLLIN)
        log.info("broker listening on %s", self.endpoint)
        try:
            while not self._stop.is_set():
                timeout = (self._next_wakeup() - time.monotonic()) * 1000
                ready = dict(poller.poll(min(MAX_POLL_MS, max(0, timeout))))
                if self.pair is not None:  # first: a broker that woke from a freeze hears of a newer epoch first
                    self._drain_pair(ready)
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
                if self.pair is not None and self.pair.tick(now):
                    self._ha_pub.send_multipart(p.pair_state(self.pair.state.value, self.pair.epoch))
                if self.metrics is not None:
                    self.metrics.update(self.core, now, self.pair)  # once per wake-up, not per message
        finally:
            self.socket.close(linger=0)
            if self.pair is not None:
                self._ha_sub.disable_monitor()
                for ha_socket in (self._ha_events, self._ha_sub, self._ha_pub):
                    ha_socket.close(linger=0)
            self._wake_reader.close()
            self._wake_writer.close()
            if self.security is not None:
                self.security.stop()
            log.info("broker stopped")

    def _next_wakeup(self) -> float:
        wakeup = self.core.next_wakeup()
        return wakeup if self.pair is None else min(wakeup, self.pair.next_wakeup())

    def _drain_pair(self, ready: dict[object, int]) -> None:
        """The peer's announcements, and its HA link closing (its process died), into the pair's state machine."""
        assert self.pair is not None
        was_active = self.pair.active
        # Announcements first, whether or not the poll saw them: those queued when the link closed were sent before
        # the peer died, and heard after its death they would make it look alive for ``liveness`` more heartbeats.
        if self._ha_sub in ready or self._ha_events in ready:
            with contextlib.suppress(zmq.Again):
                while True:
                    frames = self._ha_sub.recv_multipart(zmq.NOBLOCK)
                    try:
                        state, epoch = p.parse_pair_state(frames)
                    except p.ProtocolError as exc:
                        log.warning("dropped a malformed message on the HA link: %s", exc)
                        continue
                    self.pair.on_peer(PairState(state), epoch, time.monotonic())
        if self._ha_events in ready:
            with contextlib.suppress(zmq.Again):
                while True:
                    if recv_monitor_message(self._ha_events, zmq.NOBLOCK)["event"] == zmq.EVENT_DISCONNECTED:
                        self.pair.on_peer_gone(time.monotonic())
        self._follow_pair(was_active)

    def _follow_pair(self, was_active: bool) -> None:
        """Carry a change of the pair's state into the core: a takeover gives it the new epoch; stepping down hands
        every worker and client to the peer."""
        assert self.pair is not None
        now = time.monotonic()
        if self.pair.active and not was_active:
            self.core.epoch = self.pair.epoch
        elif was_active and not self.pair.active:
            self._send(self.core.step_down(now), now)

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
        socket, core, security, pair = self.socket, self.core, self.security, self.pair
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
            if pair is None or pair.active:
                out = core.on_message(identity, frames, now, peer)
            elif pair.on_vote(now):  # a client or worker asked, and the peer is gone: this broker takes over
                self._follow_pair(False)
                out = core.on_message(identity, frames, now, peer)
            else:
                out = core.answer_passive(identity, frames, pair.epoch)
            if out:
                self._send(out, now)

    def _send(self, out: list[Outgoing], now: float) -> None:
        socket, store, index = self.socket, self.store, 0
        while index < len(out):  # the list may grow: a peer found gone produces messages of its own
            identity, frames = out[index]
            index += 1
            if store is not None and identity == STORE:  # the store answers at once, in this thread
                for reply in store.handle(frames):
                    out.extend(self.core.transfers.on_store_reply(reply, now))
                continue
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
