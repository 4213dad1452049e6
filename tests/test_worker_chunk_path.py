"""The worker's chunk path (worker/node.py): slot threads send PARTIALs on the shared DEALER themselves.

The loop thread sleeps on the DEALER's ZMQ_FD, and a send from a slot thread may take that signal; the slot
thread must then ring the loop's eventfd. These drive ``_send_chunk`` against real ZeroMQ sockets (a ROUTER
standing in for the broker) without a llama-server: the point is the socket hand-off, not generation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from qmesh.common import protocol as p
from qmesh.common.bodies import GenerationRequest
from qmesh.worker.binary import LlamaServerBinary
from qmesh.worker.generation import Job
from qmesh.worker.models import ModelFile
from qmesh.worker.node import WorkerNode, WorkerSettings

ROUTE_KEY = b"\x00\x00\x00\x01"


@pytest.fixture
def wired() -> Iterator[tuple[WorkerNode, zmq.Socket, Job]]:
    """A WorkerNode whose DEALER is connected to a ROUTER (the broker's stand-in), with one job in hand."""
    context = zmq.Context()
    broker = context.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    node: WorkerNode | None = None
    try:
        port = broker.bind_to_random_port("tcp://127.0.0.1")
        settings = WorkerSettings(
            broker=f"tcp://127.0.0.1:{port}",
            model=ModelFile(Path("unused.gguf"), "test-model"),
            service="test-model",
            binary=LlamaServerBinary(Path("/nonexistent/llama-server"), {}, "test"),
        )
        node = WorkerNode(settings, context=context)
        node._wakeup = os.eventfd(0, os.EFD_NONBLOCK)
        node._connect()  # the DEALER, and READY to the broker
        assert broker.poll(5000), "READY never reached the broker"
        _, *ready = broker.recv_multipart()
        assert isinstance(p.parse_inbound(ready), p.WorkerReady)
        job = Job(ROUTE_KEY, GenerationRequest(prompt="hi", window=4))
        node._jobs[ROUTE_KEY] = job
        yield node, broker, job
    finally:
        if node is not None:
            node._close_dealer(send_disconnect=False)
            if node._wakeup >= 0:
                os.close(node._wakeup)
        broker.close(linger=0)
        context.term()


def _rung(node: WorkerNode) -> bool:
    try:
        return os.eventfd_read(node._wakeup) > 0
    except BlockingIOError:
        return False


def _chunk(token: int) -> bytes:
    return p.pack({"text": "x", "tokens": [token]})


def test_a_chunk_goes_to_the_broker_and_rings_nobody_when_nothing_waits(wired) -> None:
    node, broker, job = wired
    node._send_chunk(job, _chunk(7))
    assert broker.poll(5000)
    _, *frames = broker.recv_multipart()
    message = p.parse_inbound(frames)
    assert isinstance(message, p.WorkerPartial) and message.route_key == ROUTE_KEY
    assert p.unpack(message.body[0])["tokens"] == [7]
    assert not _rung(node)


def test_a_chunk_sent_while_a_broker_message_waits_wakes_the_loop(wired) -> None:
    node, broker, job = wired
    worker_id = _worker_id(node, broker)
    assert not _rung(node)
    broker.send_multipart([worker_id, *p.worker_credit(ROUTE_KEY, 4)])
    _wait_until_waiting(node)  # the CREDIT is in the DEALER's pipe, unread
    node._send_chunk(job, _chunk(8))
    assert _rung(node), "the slot thread's send found a message waiting but did not wake the loop"
    assert node._drain_broker()  # and the loop finds it
    assert job.credit == 8


def test_chunks_of_a_job_the_worker_no_longer_holds_are_not_sent(wired) -> None:
    node, broker, job = wired
    del node._jobs[ROUTE_KEY]
    node._send_chunk(job, _chunk(9))
    current = node._jobs[ROUTE_KEY] = Job(ROUTE_KEY, GenerationRequest(prompt="hi"))  # same key, another request
    node._send_chunk(job, _chunk(10))
    node._send_chunk(current, _chunk(11))
    assert broker.poll(5000)
    _, *frames = broker.recv_multipart()
    assert p.unpack(p.parse_inbound(frames).body[0])["tokens"] == [11]  # the first to arrive: the others never left


def test_a_full_queue_to_the_broker_ends_the_connection_and_wakes_the_loop(wired) -> None:
    node, broker, job = wired
    assert node._dealer is not None
    node._dealer.setsockopt(zmq.SNDHWM, 1)
    broker.close(linger=0)  # nobody reads: the DEALER's queue fills
    for token in range(100_000):
        node._send_chunk(job, _chunk(token))
        if node._connection_broken:
            break
    assert node._connection_broken, "the DEALER never refused a chunk"
    assert _rung(node)
    sent = node._chunks_sent
    node._send_chunk(job, _chunk(1))  # nothing more goes out on a connection that lost a message
    assert node._chunks_sent == sent


def _worker_id(node: WorkerNode, broker: zmq.Socket) -> bytes:
    """The routing id the ROUTER knows the DEALER by (learned from a heartbeat)."""
    node._send_to_broker(p.heartbeat())
    assert broker.poll(5000)
    worker_id, *_ = broker.recv_multipart()
    return worker_id


def _wait_until_waiting(node: WorkerNode) -> None:
    """Until a message from the broker waits on the DEALER (at most 10 s)."""
    assert node._dealer is not None
    deadline = time.monotonic() + 10
    while not node._dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
        assert time.monotonic() < deadline, "the broker's message never arrived"
        time.sleep(0.01)
