"""Multipart send and receive for the hot paths (the broker loop, the worker's chunk forwarding).

pyzmq's ``send_multipart``/``recv_multipart`` combine enum flags for every frame (``SNDMORE | flags``,
``getsockopt(RCVMORE)``), and that enum arithmetic was about a fifth of the broker's time under load (py-spy,
``scripts/bench capacity --profile``). These use plain ints computed once, call the backend's ``send`` (the
sugar layer adds only routing_id and group, for draft sockets), and read "more frames follow" from the received
frame instead of a ``getsockopt`` call: about 4.5 us less per message received and forwarded than ``send`` and
``recv`` with int flags (a micro-benchmark of 6-frame messages over inproc PAIR).

All but ``send_frames_waiting`` are non-blocking: they raise ``zmq.Again`` (nothing sent, or nothing waiting)
like the pyzmq calls with ``zmq.NOBLOCK``; ZeroMQ takes or refuses a multipart message as a whole at its first
frame.
"""

from __future__ import annotations

import zmq
from zmq.backend import Socket as _BackendSocket

_send = _BackendSocket.send
_recv = _BackendSocket.recv
_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE)
_MORE_NOBLOCK = _MORE | _NOBLOCK


def send_frames(socket: zmq.Socket, frames: list[bytes]) -> None:
    last = len(frames) - 1
    for index in range(last):
        _send(socket, frames[index], _MORE_NOBLOCK)
    _send(socket, frames[last], _NOBLOCK)


def send_frames_waiting(socket: zmq.Socket, frames: list[bytes]) -> None:
    """``send_frames`` that waits while the socket's queue is full (back-pressure on an inproc pipe)."""
    last = len(frames) - 1
    for index in range(last):
        _send(socket, frames[index], _MORE)
    _send(socket, frames[last], 0)


def recv_frames(socket: zmq.Socket) -> list[bytes]:
    frame = _recv(socket, _NOBLOCK, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _recv(socket, _NOBLOCK, False)
        frames.append(frame.bytes)
    return frames


def send_routed(socket: zmq.Socket, identity: bytes, frames: list[bytes]) -> None:
    """``send_frames`` on a ROUTER socket, with the peer's routing id first."""
    _send(socket, identity, _MORE_NOBLOCK)  # a ROUTER_MANDATORY refusal (unreachable, queue full) comes here
    send_frames(socket, frames)


def recv_routed(socket: zmq.Socket) -> tuple[bytes, list[bytes]]:
    """``recv_frames`` on a ROUTER socket: the peer's routing id, and the frames it sent."""
    identity, *frames = recv_frames(socket)
    return identity, frames
