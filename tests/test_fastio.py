"""The hot-path multipart I/O of common/fastio, over real ZeroMQ sockets: same frames as pyzmq's multipart calls."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from qmesh.common.fastio import recv_frames, recv_routed, send_frames, send_routed

MESSAGES = [[b"one"], [b"", b"MDPW02", b"\x03", b"key", b"", b"x" * 100_000], [b""] * 7]


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    context = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    dealer.setsockopt(zmq.IDENTITY, b"dealer-1")
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer.connect(f"tcp://127.0.0.1:{port}")
    yield router, dealer
    router.close(linger=0)
    dealer.close(linger=0)
    context.term()


def _wait_readable(socket: zmq.Socket) -> None:
    assert socket.poll(5000, zmq.POLLIN), "nothing arrived within 5 s"


def test_frames_cross_both_ways_unchanged(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    router, dealer = pair
    for frames in MESSAGES:
        send_frames(dealer, frames)
        _wait_readable(router)
        assert recv_routed(router) == (b"dealer-1", frames)
        send_routed(router, b"dealer-1", frames)
        _wait_readable(dealer)
        assert recv_frames(dealer) == frames


def test_nothing_waiting_raises_again(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    router, dealer = pair
    with pytest.raises(zmq.Again):
        recv_routed(router)
    with pytest.raises(zmq.Again):
        recv_frames(dealer)


def test_unknown_peer_is_refused_before_anything_is_sent(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    router, dealer = pair
    with pytest.raises(zmq.ZMQError) as refused:
        send_routed(router, b"nobody", [b"hello"])
    assert refused.value.errno == zmq.EHOSTUNREACH
    send_frames(dealer, [b"ping"])  # the refusal left no half-sent frames behind on either side
    _wait_readable(router)
    assert recv_routed(router) == (b"dealer-1", [b"ping"])
    send_routed(router, b"dealer-1", [b"pong"])
    _wait_readable(dealer)
    assert recv_frames(dealer) == [b"pong"]
    time.sleep(0.05)
    with pytest.raises(zmq.Again):
        recv_frames(dealer)
