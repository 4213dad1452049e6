"""Multipart send and receive for the hot paths (the broker loop, the worker's chunk forwarding).

pyzmq's ``send_multipart``/``recv_multipart`` combine enum flags for every frame (``SNDMORE | flags``,
``getsockopt(RCVMORE)``), and that enum arithmetic was about a fifth of the broker's time under load (py-spy,
``scripts/bench capacity --profile``). These do the same with plain ints computed once. Both are non-blocking:
they raise ``zmq.Again`` (nothing sent, or nothing waiting) like the pyzmq calls with ``zmq.NOBLOCK``; ZeroMQ
takes or refuses a multipart message as a whole at its first frame.
"""

from __future__ import annotations

import zmq

_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_RCVMORE = int(zmq.RCVMORE)


def send_frames(socket: zmq.Socket, frames: list[bytes]) -> None:
    send = socket.send
    last = len(frames) - 1
    for index in range(last):
        send(frames[index], _MORE_NOBLOCK)
    send(frames[last], _NOBLOCK)


def recv_frames(socket: zmq.Socket) -> list[bytes]:
    recv, more = socket.recv, socket.get
    frames = [recv(_NOBLOCK)]
    while more(_RCVMORE):
        frames.append(recv(_NOBLOCK))
    return frames


def send_routed(socket: zmq.Socket, identity: bytes, frames: list[bytes]) -> None:
    """``send_frames`` on a ROUTER socket, with the peer's routing id first."""
    send = socket.send
    send(identity, _MORE_NOBLOCK)  # a ROUTER_MANDATORY refusal (unreachable, queue full) comes here, nothing sent
    last = len(frames) - 1
    for index in range(last):
        send(frames[index], _MORE_NOBLOCK)
    send(frames[last], _NOBLOCK)


def recv_routed(socket: zmq.Socket) -> tuple[bytes, list[bytes]]:
    """``recv_frames`` on a ROUTER socket: the peer's routing id, and the frames it sent."""
    recv, more = socket.recv, socket.get
    identity = recv(_NOBLOCK)
    frames = []
    while more(_RCVMORE):
        frames.append(recv(_NOBLOCK))
    return identity, frames
