"""The CURVE bridge: llama.cpp's RPC protocol carried between a split worker and a shard host over one CurveZMQ
connection, so that rpc-server (plain TCP, no authentication, no encryption) never faces the network.

    llama-server --rpc 127.0.0.1:L ──TCP──► Entrance ══ CurveZMQ, DEALER ► ROUTER ══► Exit ──TCP──► rpc-server
    (split worker's machine, loopback)      (worker)                                  (shard host)  (its loopback)

Each TCP connection llama-server opens to the entrance is a numbered stream of the bridge: the entrance reads its
bytes into messages of at most ``MAX_TUNNEL_CHUNK`` (``protocol.tunnel_frames``) and the exit opens a connection
of its own to rpc-server for each new number; empty data closes a stream at the other end. The exit is a CURVE
server whose ZAP handler admits one client key, the one the broker says holds the host now (``allow``), and it
drops anything another key sends. Both ends run one thread, which polls the ZeroMQ socket and the TCP sockets.

What reaches the network is CurveZMQ: encrypted and authenticated both ways (the worker knows the host's key from
the broker's GRANT, the host the worker's from its ASSIGN). What it costs per token is in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from typing import Generic, TypeVar

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from qmesh.common import protocol as p
from qmesh.common.keys import KeyPair, key_fingerprint

log = logging.getLogger(__name__)

POLL_MS = 100  # how often a stop request is noticed when no data moves
CONNECT_TIMEOUT = 5.0  # seconds the exit waits for its rpc-server to take a connection
HEARTBEAT_MS = 1000  # ZMTP heartbeats on the bridge: a peer silent for HEARTBEAT_TIMEOUT_MS is gone
HEARTBEAT_TIMEOUT_MS = 3000

# How one end names a stream: the exit by (the worker's routing id, its number), the entrance by its number.
StreamId = TypeVar("StreamId")


def _stream_socket(sock: socket.socket) -> socket.socket:
    """A TCP socket as the bridge uses it: blocking writes (the RPC protocol is request then reply, so a peer
    always reads what it is sent), no Nagle delay on the small messages of each token."""
    sock.setblocking(True)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _bridge_socket(context: zmq.Context, kind: int) -> zmq.Socket:
    sock = context.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_TUNNEL_CHUNK + 1024)  # the limit counts CURVE's own bytes too
    sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    return sock


class _End(threading.Thread, Generic[StreamId]):
    """What both ends of the bridge do: one thread polling the ZeroMQ socket and the TCP sockets of the streams,
    each TCP socket's bytes sent to the other end (``_send``), the other end's bytes written to it."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._stopping = threading.Event()
        self._poller = zmq.Poller()
        self._streams: dict[StreamId, socket.socket] = {}
        self._ids: dict[int, StreamId] = {}  # TCP descriptor -> its stream

    def _stop_streams(self) -> None:
        """Stop the thread (if it runs) and close the streams' TCP sockets."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        for sock in self._streams.values():
            sock.close()
        self._streams.clear()

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                for item, _ in self._poller.poll(POLL_MS):
                    self._on_ready(item)
        except Exception:  # a bug: say so, and end every stream rather than leave llama-server waiting forever
            log.exception("%s failed", self.name)
        finally:
            for stream in list(self._streams):
                self._end(stream, tell=False)

    def _on_ready(self, item: zmq.Socket | int) -> None:
        """Serve one socket the poller found readable (a TCP socket comes as its descriptor)."""
        raise NotImplementedError

    def _send(self, stream: StreamId, data: bytes) -> None:
        """Send ``data`` of ``stream`` to the other end; empty data ends the stream there."""
        raise NotImplementedError

    def _add(self, stream: StreamId, sock: socket.socket) -> None:
        self._streams[stream] = sock
        self._ids[sock.fileno()] = stream
        self._poller.register(sock, zmq.POLLIN)

    def _from_tcp(self, descriptor: int) -> None:
        stream = self._ids.get(descriptor)
        if stream is None:
            return  # ended earlier in this turn
        try:
            data = self._streams[stream].recv(p.MAX_TUNNEL_CHUNK)
        except OSError:
            data = b""
        if not data:
            self._end(stream, tell=True)
        else:
            self._send(stream, data)

    def _to_tcp(self, stream: StreamId, data: bytes) -> None:
        """The other end's ``data`` of ``stream``; empty data ends it here. A stream that ended here first is
        left alone."""
        sock = self._streams.get(stream)
        if sock is None:
            return
        if not data:
            self._end(stream, tell=False)
            return
        try:
            sock.sendall(data)
        except OSError:
            self._end(stream, tell=True)

    def _end(self, stream: StreamId, tell: bool) -> None:
        sock = self._streams.pop(stream, None)
        if sock is None:
            return
        self._ids.pop(sock.fileno(), None)
        self._poller.unregister(sock)
        sock.close()
        if tell:
            self._send(stream, b"")


class Exit(_End[tuple[bytes, int]]):
    """The shard host's end: a CURVE ROUTER on ``bind`` whose streams (each named by the worker's routing id and
    its number there) become TCP connections to ``target`` (rpc-server on loopback). Admits no key until
    ``allow``."""

    def __init__(self, bind: str, keys: KeyPair, target: tuple[str, int]) -> None:
        super().__init__(name="qmesh-bridge-exit")
        self.target = target
        self._allowed: str | None = None
        self._context = zmq.Context()
        self._authenticator = ThreadAuthenticator(self._context, log=logging.getLogger("qmesh.bridge.zap"))
        self._authenticator.start()  # the ZAP handler must run before the socket binds
        self._authenticator.configure_curve_callback("*", self)
        self._router = _bridge_socket(self._context, zmq.ROUTER)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._router.curve_server = True
        self._router.curve_secretkey = keys.secret
        self._router.curve_publickey = keys.public
        try:
            self._router.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"cannot bind the CURVE bridge to {bind}: {exc}") from exc
        self.endpoint: str = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._poller.register(self._router, zmq.POLLIN)

    def allow(self, key: str | None) -> None:
        """Admit only ``key`` from now on (None: nobody); the streams of any other key end at its next message."""
        if key != self._allowed:
            log.info("bridge admits %s", key_fingerprint(key) if key else "no key")
        self._allowed = key

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: only the key of the split worker that holds this host may connect."""
        allowed = self._allowed is not None and key.decode() == self._allowed
        if not allowed:
            log.warning("bridge refused a connection from key %s", key_fingerprint(key))
        return allowed

    def close(self) -> None:
        """Stop the thread (if it runs) and release the sockets."""
        self._stop_streams()
        self._router.close(linger=0)
        self._authenticator.stop()
        self._context.term()

    def _on_ready(self, item: zmq.Socket | int) -> None:
        if item is self._router:
            self._from_worker()
        else:
            self._from_tcp(item)

    def _from_worker(self) -> None:
        while True:
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            peer, key = frames[0].bytes, frames[1].get("User-Id") if len(frames) > 1 else ""
            try:
                number, data = p.parse_tunnel([frame.bytes for frame in frames[1:]])
            except p.ProtocolError as exc:
                log.warning("bridge dropped a malformed message: %s", exc)
                continue
            stream = (peer, number)
            if key != self._allowed:  # a worker that no longer holds this host: its streams end, at both ends
                for old in [s for s in self._streams if s[0] == peer and s != stream]:
                    self._end(old, tell=True)
                if stream in self._streams:
                    self._end(stream, tell=True)
                elif data:
                    self._send(stream, b"")
                continue
            if data and stream not in self._streams:
                try:
                    sock = _stream_socket(socket.create_connection(self.target, timeout=CONNECT_TIMEOUT))
                except OSError as exc:
                    log.warning("bridge cannot reach rpc-server at %s:%d: %s", *self.target, exc)
                    self._send(stream, b"")
                    continue
                self._add(stream, sock)
            self._to_tcp(stream, data)

    def _send(self, stream: tuple[bytes, int], data: bytes) -> None:
        peer, number = stream
        try:
            self._router.send_multipart([peer, *p.tunnel_frames(number, data)])
        except zmq.ZMQError:  # the worker's end is gone: nobody reads these streams any more
            for gone in [s for s in self._streams if s[0] == peer]:
                self._end(gone, tell=False)


class Entrance(_End[int]):
    """The split worker's end: a TCP listener on loopback (``port``: what llama-server's ``--rpc`` names) whose
    connections travel as numbered streams over a CURVE DEALER to the exit at ``endpoint`` (``tcp://host:port``)."""

    def __init__(self, endpoint: str, keys: KeyPair, server_key: str) -> None:
        super().__init__(name="qmesh-bridge-entrance")
        self.endpoint = endpoint
        self.connected = threading.Event()  # the CURVE handshake with the exit succeeded (and holds)
        self.refused = threading.Event()  # the exit refused our key, or it is not the key we were given
        self._context = zmq.Context()
        self._dealer = _bridge_socket(self._context, zmq.DEALER)
        self._dealer.curve_secretkey = keys.secret
        self._dealer.curve_publickey = keys.public
        self._dealer.curve_serverkey = server_key.encode()
        events = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
        self._monitor = self._dealer.get_monitor_socket(events | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self._dealer.connect(endpoint)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._next = 0
        for item in (self._dealer, self._monitor, self._listener):
            self._poller.register(item, zmq.POLLIN)

    def close(self) -> None:
        self._stop_streams()
        self._listener.close()
        self._dealer.disable_monitor()
        self._monitor.close(linger=0)
        self._dealer.close(linger=0)
        self._context.term()

    def _on_ready(self, item: zmq.Socket | int) -> None:
        if item is self._dealer:
            self._from_exit()
        elif item is self._monitor:
            self._on_event()
        elif item == self._listener.fileno():
            self._accept()
        else:
            self._from_tcp(item)

    def _on_event(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                # What was in flight is lost with the connection: end every stream, so llama-server fails now
                # (and its worker re-forms) instead of waiting for replies that will never come.
                self.connected.clear()
                if self._streams:
                    log.warning(
                        "the bridge to %s went down; ending its %d stream(s)", self.endpoint, len(self._streams)
                    )
                for number in list(self._streams):
                    self._end(number, tell=False)
            else:
                self.refused.set()
                log.warning("the shard host at %s refused this worker's key (or has another key)", self.endpoint)

    def _accept(self) -> None:
        sock, _ = self._listener.accept()
        self._next += 1
        self._add(self._next, _stream_socket(sock))

    def _from_exit(self) -> None:
        while True:
            try:
                frames = self._dealer.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                number, data = p.parse_tunnel(frames)
            except p.ProtocolError as exc:
                log.warning("bridge dropped a malformed message: %s", exc)
                continue
            self._to_tcp(number, data)

    def _send(self, number: int, data: bytes) -> None:
        if data:
            self._dealer.send_multipart(p.tunnel_frames(number, data))
        else:  # an end need not arrive: the exit may be gone already
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.send_multipart(p.tunnel_frames(number, b""), zmq.NOBLOCK)
