"""A shard host: llama.cpp's rpc-server as a supervised sidecar, offered to the mesh through the broker (issue 19).

``qmesh-shard`` runs one ``ShardHost``: it starts rpc-server on loopback (``RpcServerManager``: the process
manager of llama-server, with its guarantees: health, restarts, never outliving its manager), registers its
memory, device and machine with the broker (SHARD READY) and heartbeats like a worker. The broker gives it to at
most one split worker at a time (ASSIGN) and takes it back (RELEASE); after a release the host restarts its
rpc-server, so that nothing of the last worker stays on it, and registers again.

rpc-server speaks llama.cpp's RPC protocol: no authentication, no encryption. With CURVE keys the host keeps it on
loopback and offers the exit of a CurveZMQ bridge (common/tunnel.py) that admits only the key of the worker that
holds it; without keys rpc-server itself is offered, and only on loopback unless the operator says ``--insecure``.

``ShardLink`` is the connection a shard peer keeps to the broker: this host's, and a split worker's lease
(worker/split.py).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass

import zmq
from zmq.utils.monitor import recv_monitor_message

from qmesh.common import protocol as p
from qmesh.common.endpoints import broker_endpoints
from qmesh.common.errors import QMeshError, SidecarStartError
from qmesh.common.keys import HANDSHAKE_EVENTS, CurveClientKeys, HandshakeWatch
from qmesh.common.tunnel import Exit
from qmesh.worker.binary import LlamaServerBinary
from qmesh.worker.core import FATAL_REFUSALS
from qmesh.worker.http_client import LlamaHttpClient
from qmesh.worker.process import READY, LlamaProcessManager

log = logging.getLogger(__name__)

MAX_POLL_SECONDS = 0.25  # how often a stop request and rpc-server's state are looked at when nothing happens
_DEVICE_LINE = re.compile(r"^\s+(\S+): (.*) \((\d+) MiB, (\d+) MiB free\)$")  # rpc-server's "Devices:" list


@dataclass(slots=True, frozen=True)
class Device:
    """A device as rpc-server lists it at start: its name (what ``-d`` takes) and its free memory in MiB."""

    name: str
    free: int


class RpcServerManager(LlamaProcessManager):
    """rpc-server on ``host:port`` with ``threads`` CPU threads, computing on ``device`` (None: rpc-server's own
    choice, a GPU where it finds one); supervised as llama-server is. Up once it takes a TCP connection."""

    program = "rpc-server"

    def __init__(
        self,
        binary: LlamaServerBinary,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        threads: int | None = None,
        device: str | None = "CPU",
        load_timeout: float = 30.0,
        max_restarts: int = 3,
    ) -> None:
        super().__init__(
            binary.path,
            binary,
            host=host,
            port=port,
            threads=threads,
            load_timeout=load_timeout,
            max_restarts=max_restarts,
        )
        self.device = device

    def command(self) -> list[str]:
        cmd = [str(self.binary.path), "-H", self.host, "-p", str(self.port)]
        if self.threads is not None:
            cmd += ["-t", str(self.threads)]
        return cmd + (["-d", self.device] if self.device else [])

    def probe(self, client: LlamaHttpClient | None = None) -> bool:
        """rpc-server has no health endpoint (``client`` goes unused): it is up when it takes a connection (which it
        closes at once) and has listed its devices (its output reaches us once it serves its first connection: the
        probe's)."""
        try:
            socket.create_connection((self.host, self.port), timeout=0.5).close()
        except OSError:
            return False
        return bool(self.devices())

    @property
    def base_url(self) -> str:
        """Where rpc-server listens, as llama-server's ``--rpc`` names it."""
        return f"{self.host}:{self.port}"

    def is_healthy(self) -> bool:
        return self.state == READY and self.pid is not None and self.probe()

    def devices(self) -> list[Device]:
        """The devices rpc-server said it serves, as it started this time."""
        found = []
        for line in self.output_tail(200):
            match = _DEVICE_LINE.match(line)
            if match:
                found.append(Device(match[1], int(match[4])))
        return found


# ---------------------------------------------------------------------------------------------- the broker link


class ShardLink:
    """A shard peer's connection to the broker: a DEALER of its own, a hello the broker answers (SHARD READY: a
    HEARTBEAT; SHARD REQUEST: a GRANT), heartbeats each interval both ways. ``lost`` says why the connection
    cannot go on (the broker fell silent, said DISCONNECT, or refused the key); the owner then closes it. With the
    endpoints of a broker pair, each new connection goes to the next one: the active broker is the one that answers.
    """

    def __init__(
        self,
        endpoints: tuple[str, ...],
        curve: CurveClientKeys | None,
        heartbeat_interval: float,
        liveness: int,
        context: zmq.Context | None = None,
    ) -> None:
        self.endpoints = endpoints
        self.endpoint = endpoints[-1]  # the one of the current (or last) connection
        self.curve = curve
        self.interval = heartbeat_interval
        self.ttl = heartbeat_interval * liveness
        self.context = context or zmq.Context.instance()
        self.answered = False  # the broker answered the hello on this connection
        self.lost: str | None = None
        self.fatal: str | None = None  # a refusal that retrying cannot fix
        self._dealer: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._handshakes = HandshakeWatch(self.endpoint)
        self._broker_expires = 0.0
        self._next_heartbeat = 0.0

    @property
    def is_open(self) -> bool:
        return self._dealer is not None

    def open(self, hello: list[bytes]) -> None:
        self.close(leave=False)
        dealer = self.context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, p.MAX_BODY_BYTES + 64 * 1024)
        index = (self.endpoints.index(self.endpoint) + 1) % len(self.endpoints)
        self.endpoint = self.endpoints[index]
        if self.curve is not None:
            self.curve.apply(dealer, index)
        self._monitor = dealer.get_monitor_socket(HANDSHAKE_EVENTS)
        self._handshakes = HandshakeWatch(self.endpoint, self.curve is not None)
        dealer.connect(self.endpoint)
        self._dealer, self.answered, self.lost = dealer, False, None
        now = time.monotonic()
        self._broker_expires, self._next_heartbeat = now + self.ttl, now + self.interval
        self.send(hello)

    def send(self, frames: list[bytes]) -> None:
        if self._dealer is None:
            return
        try:
            self._dealer.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            self.lost = f"the broker at {self.endpoint} is not taking messages"

    def close(self, leave: bool) -> None:
        """Close the connection; ``leave``: say DISCONNECT first, so the broker acts at once."""
        if self._dealer is None:
            return
        if leave:
            self.send(p.disconnect())
        assert self._monitor is not None
        self._dealer.disable_monitor()
        self._monitor.close(linger=0)
        self._dealer.close(linger=200 if leave else 0)
        self._dealer = self._monitor = None

    def poll(self, timeout: float) -> list[p.ToShardPeer]:
        """Wait up to ``timeout`` seconds for the broker; return what it sent. Sends the heartbeats that are due."""
        if self._dealer is None:
            time.sleep(timeout)
            return []
        assert self._monitor is not None
        now = time.monotonic()
        wait = max(0.0, min(timeout, self._next_heartbeat - now, self._broker_expires - now))
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        ready = dict(poller.poll(wait * 1000))
        messages = []
        if self._monitor in ready:
            while self._monitor.poll(0):
                event = recv_monitor_message(self._monitor)
                failure = self._handshakes.refusal(event["event"], event["value"])  # the value tells a mismatch
                if failure is not None:
                    self.fatal = self.lost = failure
        while True:
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._broker_expires = time.monotonic() + self.ttl
            try:
                message = p.parse_for_shard_peer(frames)
            except p.ProtocolError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            if message.command == p.W_DISCONNECT:
                if message.refusal is not None and message.refusal[0] in FATAL_REFUSALS:
                    self.fatal = f"the broker at {self.endpoint} refused this key: {message.refusal[1]}"
                self.lost = self.fatal or "the broker asked us to register again"
                return messages
            self.answered = self.answered or message.command in (p.W_HEARTBEAT, p.W_SHARD_GRANT)
            messages.append(message)
        now = time.monotonic()
        if now >= self._broker_expires and self.lost is None:
            self.lost = f"no word from the broker at {self.endpoint} for {self.ttl:g} s"
        if now >= self._next_heartbeat:
            self.send(p.heartbeat())
            self._next_heartbeat = now + self.interval
        return messages


# ---------------------------------------------------------------------------------------------- the shard host


@dataclass(slots=True)
class ShardSettings:
    broker: str
    binary: LlamaServerBinary  # rpc-server
    name: str = ""  # unique in the mesh; default "machine/pid"
    memory: int | None = None  # MiB offered; default: the device's free memory when rpc-server starts
    threads: int | None = None  # rpc-server's CPU threads
    gpu: bool = False  # compute on a GPU (rpc-server's choice) instead of the CPU
    curve: CurveClientKeys | None = None  # with keys: rpc-server stays on loopback, behind the CURVE bridge
    bridge_bind: str = "tcp://127.0.0.1:*"  # where the bridge's exit listens (with keys)
    rpc_host: str = "127.0.0.1"  # where rpc-server listens (without keys; non-loopback needs the operator's insecure)
    rpc_port: int | None = None
    advertise: str | None = None  # host:port split workers are told, when they reach this host another way
    heartbeat_interval: float = 2.5
    liveness: int = 3
    max_restarts: int = 3  # rpc-server restarts in a row before the host gives up


class ShardHost(threading.Thread):
    """Offers one rpc-server to the mesh until ``stop()``; ``failure`` says why it ended, if it failed."""

    def __init__(self, settings: ShardSettings, context: zmq.Context | None = None) -> None:
        super().__init__(name="qmesh-shard", daemon=True)
        self.settings = settings
        self.host_name = settings.name or f"{socket.gethostname()}/{os.getpid()}"
        self.failure: str | None = None
        self.registered = threading.Event()
        self.worker: str | None = None  # the split worker that holds this host now
        self.manager = RpcServerManager(
            settings.binary,
            host="127.0.0.1" if settings.curve is not None else settings.rpc_host,
            port=settings.rpc_port,
            threads=settings.threads,
            device=None if settings.gpu else "CPU",
            max_restarts=settings.max_restarts,
        )
        endpoints = broker_endpoints(settings.broker)
        self.link = ShardLink(endpoints, settings.curve, settings.heartbeat_interval, settings.liveness, context)
        self.bridge: Exit | None = None
        self.offer: p.ShardOffer | None = None
        self._stop_requested = threading.Event()

    def stop(self) -> None:
        self._stop_requested.set()

    def run(self) -> None:
        try:
            self.manager.start()
            if self.settings.curve is not None:
                self.bridge = Exit(self.settings.bridge_bind, self.settings.curve.own, self._rpc_address())
                self.bridge.start()
            self._serve()
        except (QMeshError, OSError) as exc:
            self.failure = str(exc)
            log.error("shard host %s: %s", self.host_name, exc)
        except Exception as exc:  # a bug: report it rather than let the thread vanish silently
            log.exception("shard host %s crashed", self.host_name)
            self.failure = f"internal error: {exc!r}"
        finally:
            self.link.close(leave=self.failure is None)
            self.registered.clear()
            if self.bridge is not None:
                self.bridge.close()
            self.manager.stop()

    def _rpc_address(self) -> tuple[str, int]:
        return self.manager.host, self.manager.port

    def _offer(self) -> p.ShardOffer:
        """What this host offers, from what rpc-server said it computes on as it started."""
        s = self.settings
        devices = self.manager.devices()
        if not devices:
            output = "\n".join(self.manager.output_tail(30))
            raise SidecarStartError(f"rpc-server started but listed no device; its output:\n{output}")
        device = devices[0]
        if s.gpu and device.name.upper().startswith("CPU"):
            raise SidecarStartError("--gpu: rpc-server found no GPU on this machine (it offers only the CPU)")
        memory = s.memory or device.free
        if memory > device.free:
            log.warning("offering %d MiB, more than the %d MiB %s has free now", memory, device.free, device.name)
        if self.bridge is not None:
            self.bridge.target = self._rpc_address()  # a restart may have moved rpc-server to another port
            bound = self.bridge.endpoint[len("tcp://") :]
        else:
            bound = self.manager.base_url
        endpoint = s.advertise or bound
        if endpoint.split(":")[0] in ("0.0.0.0", "*", "[::]"):
            raise QMeshError(f"a split worker cannot reach {endpoint}: name an address with --advertise HOST:PORT")
        return p.ShardOffer(self.host_name, socket.gethostname(), device.name, memory, endpoint, s.curve is not None)

    # ------------------------------------------------------------------------------------------ the loop

    def _serve(self) -> None:
        link, manager = self.link, self.manager
        while not self._stop_requested.is_set():
            if manager.state == "failed":
                raise SidecarStartError(f"rpc-server failed for good: {manager.failure}")
            if manager.state != READY:
                if link.is_open:  # its worker's llama-server has lost it anyway: leave now, come back when it is up
                    log.warning(
                        "shard host %s: rpc-server is down; leaving the broker until it is back", self.host_name
                    )
                    self._leave()
                time.sleep(MAX_POLL_SECONDS)
                continue
            if not link.is_open:
                self.offer = self._offer()
                link.open(p.shard_ready(self.offer))
                log.info(
                    "shard host %s: offering %d MiB of %s to %s",
                    self.host_name,
                    self.offer.memory,
                    self.offer.device,
                    link.endpoint,
                )
            for message in link.poll(MAX_POLL_SECONDS):
                self._on_message(message)
            if link.answered and not self.registered.is_set():
                log.info("shard host %s: registered (%s)", self.host_name, self.offer.endpoint)
                self.registered.set()
            if link.fatal is not None:
                raise QMeshError(link.fatal)
            if link.lost is not None:
                log.warning("shard host %s: %s", self.host_name, link.lost)
                self._leave()
                if not self.registered.is_set():
                    time.sleep(self.settings.heartbeat_interval)  # the broker never answered: do not hammer it

    def _on_message(self, message: p.ToShardPeer) -> None:
        if message.command == p.W_SHARD_ASSIGN:
            assert message.assign is not None
            self.worker = message.assign.worker
            log.info("shard host %s: now holds part of split worker %s", self.host_name, self.worker)
            if self.bridge is not None:
                self.bridge.allow(message.assign.key)
        elif message.command == p.W_SHARD_RELEASE:
            log.info("shard host %s: released by %s", self.host_name, self.worker)
            self._leave()

    def _leave(self) -> None:
        """Close the connection (the broker forgets this host); if a worker held it, restart rpc-server, so that
        whoever still uses it is cut off and nothing of theirs stays, before the host is offered again."""
        self.link.close(leave=True)
        self.registered.clear()
        if self.worker is None:
            return
        self.worker = None
        if self.bridge is not None:
            self.bridge.allow(None)
        self.manager.stop()
        self.manager.start()
