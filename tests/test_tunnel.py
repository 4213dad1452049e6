"""The CURVE bridge (common/tunnel.py) with real sockets: TCP streams through it both ways, closes, large
transfers, and what an eavesdropper between its ends sees; keys it must refuse."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshkit import RecordingProxy
from qmesh.common.keys import KeyPair, generate_keys, load_keypair
from qmesh.common.tunnel import Entrance, Exit
from qmesh.testing import wait_for

SECRET = b"The launch code is swordfish-tango-42."


class EchoServer:
    """Stands in for rpc-server: a loopback TCP server that answers every byte it reads with the same byte, and
    counts the connections it took and the bytes it got."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):  # a stream the bridge cut off ends here
            while data := conn.recv(65536):
                self.received += data
                conn.sendall(data)

    def close(self) -> None:
        self.listener.close()


def keypair(tmp_path: Path, name: str) -> KeyPair:
    _, secret = generate_keys(tmp_path / name)
    return load_keypair(secret)


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[tuple[Exit, Entrance, EchoServer, RecordingProxy]]:
    """An echo server behind an exit that admits the worker's key, an entrance reaching it through an
    eavesdropping proxy."""
    host, worker = keypair(tmp_path, "host"), keypair(tmp_path, "worker")
    echo = EchoServer()
    exit_ = Exit("tcp://127.0.0.1:*", host, ("127.0.0.1", echo.port))
    exit_.allow(worker.public.decode())
    exit_.start()
    proxy = RecordingProxy(int(exit_.endpoint.rsplit(":", 1)[1]))
    entrance = Entrance(proxy.endpoint, worker, host.public.decode())
    entrance.start()
    try:
        yield exit_, entrance, echo, proxy
    finally:
        entrance.close()
        exit_.close()
        proxy.close()
        echo.close()


def roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        received = bytearray()
        while len(received) < len(payload):
            chunk = sock.recv(1 << 20)
            assert chunk, "the bridge closed the stream early"
            received += chunk
        return bytes(received)


def test_streams_cross_the_bridge_encrypted(bridge) -> None:
    _, entrance, echo, proxy = bridge
    assert entrance.connected.wait(10)
    assert roundtrip(entrance.port, SECRET) == SECRET
    large = bytes(range(256)) * 8192  # 2 MiB: many messages of the bridge, in order
    assert roundtrip(entrance.port, large) == large
    results: list[bytes] = []
    threads = [
        threading.Thread(target=lambda i=i: results.append(roundtrip(entrance.port, SECRET + bytes([i]))))
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(results) == sorted(SECRET + bytes([i]) for i in range(8))
    assert echo.connections == 10
    assert len(proxy.recorded) > len(large), "the proxy should have carried everything"
    assert b"swordfish" not in proxy.recorded and bytes(range(64)) not in proxy.recorded


def test_a_close_crosses_the_bridge(bridge) -> None:
    exit_, entrance, echo, _ = bridge
    with socket.create_connection(("127.0.0.1", entrance.port), timeout=10) as sock:
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
    wait_for(lambda: not exit_._streams, 5, "the exit to close its side")
    with socket.create_connection(("127.0.0.1", entrance.port), timeout=10) as sock:
        sock.sendall(b"y")
        assert sock.recv(1) == b"y"
        echo.close()  # the listener only: the open connection still echoes
        exit_.allow(None)  # the host is given to nobody: this worker's next message ends its streams there
        sock.sendall(b"z")
        assert sock.recv(1) == b""


def test_a_key_the_exit_does_not_admit_gets_nothing_through(tmp_path: Path) -> None:
    host, worker, stranger = (keypair(tmp_path, name) for name in ("host", "worker", "stranger"))
    echo = EchoServer()
    exit_ = Exit("tcp://127.0.0.1:*", host, ("127.0.0.1", echo.port))
    exit_.allow(worker.public.decode())
    exit_.start()
    entrances = [
        Entrance(exit_.endpoint, stranger, host.public.decode()),  # a key on no assignment
        Entrance(exit_.endpoint, worker, stranger.public.decode()),  # the right key, but not this host's
    ]
    try:
        for entrance in entrances:
            entrance.start()
            with socket.create_connection(("127.0.0.1", entrance.port), timeout=10) as sock:
                sock.sendall(SECRET)
                sock.settimeout(1.0)
                try:
                    reply = sock.recv(1)  # the end of the stream (the bridge ended it), or silence
                except (TimeoutError, ConnectionError):
                    reply = b""
                assert reply == b""
            assert not entrance.connected.is_set()
        assert entrances[0].refused.wait(5)
        assert echo.connections == 0 and not echo.received
    finally:
        for entrance in entrances:
            entrance.close()
        exit_.close()
        echo.close()


def test_the_exit_binds_only_where_told(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="cannot bind the CURVE bridge"):
        Exit("tcp://192.0.2.1:1", keypair(tmp_path, "host"), ("127.0.0.1", 1))
