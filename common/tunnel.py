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


class Exit(threading.Thread):
    """The shard host's end: a CURVE ROUTER on ``bind`` whose streams become TCP connections to ``target``
    (rpc-server on loopback). Admits no key until ``allow``."""

    def __init__(self, bind: str, keys: KeyPair, target: tuple[str, int]) -> None:
        super().__init__(name="qmesh-bridge-exit", daemon=True)
        self.target = target
        self._allowed: str | None = None
        self._stopping = threading.Event()
        self._streams: dict[tuple[bytes, int], socket.socket] = {}  # (worker's routing id, stream) -> rpc-server
        self._owners: dict[int, tuple[bytes, int]] = {}  # TCP descriptor -> its stream
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

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        """Stop the thread (if it runs) and release the sockets."""
        self.stop()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        for sock in self._streams.values():
            sock.close()
        self._streams.clear()
        self._router.close(linger=0)
        self._authenticator.stop()
        self._context.term()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                for item, _ in poller.poll(POLL_MS):
                    if item is self._router:
                        self._from_worker(poller)
                    else:
                        self._from_rpc_server(item, poller)
        except Exception:  # a bug: say so, and end every stream rather than leave llama-server waiting forever
            log.exception("the bridge's exit failed")
        finally:
            for stream in list(self._streams):
                self._end(stream, poller, tell=False)

    def _from_worker(self, poller: zmq.Poller) -> None:
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
                    self._end(old, poller, tell=True)
                if stream in self._streams:
                    self._end(stream, poller, tell=True)
                elif data:
                    self._send(p.tunnel_frames(number, b""), peer, poller)
                continue
            sock = self._streams.get(stream)
            if not data:
                if sock is not None:
                    self._end(stream, poller, tell=False)
                continue
            if sock is None:
                try:
                    sock = _stream_socket(socket.create_connection(self.target, timeout=CONNECT_TIMEOUT))
                except OSError as exc:
                    log.warning("bridge cannot reach rpc-server at %s:%d: %s", *self.target, exc)
                    self._send(p.tunnel_frames(number, b""), peer, poller)
                    continue
                self._streams[stream] = sock
                self._owners[sock.fileno()] = stream
                poller.register(sock, zmq.POLLIN)
            try:
                sock.sendall(data)
            except OSError:
                self._end(stream, poller, tell=True)

    def _from_rpc_server(self, descriptor: int, poller: zmq.Poller) -> None:
        stream = self._owners.get(descriptor)
        if stream is None:
            return  # ended earlier in this turn
        try:
            data = self._streams[stream].recv(p.MAX_TUNNEL_CHUNK)
        except OSError:
            data = b""
        if not data:
            self._end(stream, poller, tell=True)
        else:
            self._send(p.tunnel_frames(stream[1], data), stream[0], poller)

    def _send(self, frames: list[bytes], peer: bytes, poller: zmq.Poller) -> None:
        try:
            self._router.send_multipart([peer, *frames])
        except zmq.ZMQError:  # the worker's end is gone: nobody reads these streams any more
            for stream in [s for s in self._streams if s[0] == peer]:
                self._end(stream, poller, tell=False)

    def _end(self, stream: tuple[bytes, int], poller: zmq.Poller, tell: bool) -> None:
        sock = self._streams.pop(stream, None)
        if sock is None:
            return
        self._owners.pop(sock.fileno(), None)
        poller.unregister(sock)
        sock.close()
        if tell:
            self._send(p.tunnel_frames(stream[1], b""), stream[0], poller)


class Entrance(threading.Thread):
    """The split worker's end: a TCP listener on loopback (``port``: what llama-server's ``--rpc`` names) whose
    connections travel as streams over a CURVE DEALER to the exit at ``endpoint`` (``tcp://host:port``)."""

    def __init__(self, endpoint: str, keys: KeyPair, server_key: str) -> None:
        super().__init__(name="qmesh-bridge-entrance", daemon=True)
        self.endpoint = endpoint
        self._stopping = threading.Event()
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
        self._streams: dict[int, socket.socket] = {}  # stream number -> llama-server's connection
        self._numbers: dict[int, int] = {}  # TCP descriptor -> stream number
        self._next = 0

    def stop(self) -> None:
        self._stopping.set()

    def close(self) -> None:
        self.stop()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5)
        self._listener.close()
        for sock in self._streams.values():
            sock.close()
        self._streams.clear()
        self._dealer.disable_monitor()
        self._monitor.close(linger=0)
        self._dealer.close(linger=0)
        self._context.term()

    def run(self) -> None:
        poller = zmq.Poller()
        for item in (self._dealer, self._monitor, self._listener):
            poller.register(item, zmq.POLLIN)
        try:
            while not self._stopping.is_set():
                for item, _ in poller.poll(POLL_MS):
                    if item is self._dealer:
                        self._from_exit(poller)
                    elif item is self._monitor:
                        self._on_event(poller)
                    elif item == self._listener.fileno():
                        self._accept(poller)
                    else:
                        self._from_llama_server(item, poller)
        except Exception:
            log.exception("the bridge's entrance failed")
        finally:
            for number in list(self._streams):
                self._end(number, poller, tell=False)

    def _on_event(self, poller: zmq.Poller) -> None:
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
                    self._end(number, poller, tell=False)
            else:
                self.refused.set()
                log.warning("the shard host at %s refused this worker's key (or has another key)", self.endpoint)

    def _accept(self, poller: zmq.Poller) -> None:
        sock, _ = self._listener.accept()
        self._next += 1
        self._streams[self._next] = _stream_socket(sock)
        self._numbers[sock.fileno()] = self._next
        poller.register(sock, zmq.POLLIN)

    def _from_llama_server(self, descriptor: int, poller: zmq.Poller) -> None:
        number = self._numbers.get(descriptor)
        if number is None:
            return  # ended earlier in this turn
        try:
            data = self._streams[number].recv(p.MAX_TUNNEL_CHUNK)
        except OSError:
            data = b""
        if not data:
            self._end(number, poller, tell=True)
        else:
            self._dealer.send_multipart(p.tunnel_frames(number, data))

    def _from_exit(self, poller: zmq.Poller) -> None:
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
            sock = self._streams.get(number)
            if sock is None:
                continue  # a stream that ended here first
            if not data:
                self._end(number, poller, tell=False)
                continue
            try:
                sock.sendall(data)
            except OSError:
                self._end(number, poller, tell=True)

    def _end(self, number: int, poller: zmq.Poller, tell: bool) -> None:
        sock = self._streams.pop(number, None)
        if sock is None:
            return
        self._numbers.pop(sock.fileno(), None)
        poller.unregister(sock)
        sock.close()
        if tell:
            with contextlib.suppress(zmq.ZMQError):
                self._dealer.send_multipart(p.tunnel_frames(number, b""), zmq.NOBLOCK)
