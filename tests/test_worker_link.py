"""The worker's broker connection (worker/link.py): slot threads send PARTIALs on the loop thread's DEALER.

The loop thread sleeps on the DEALER's ZMQ_FD, and a send from a slot thread may take that signal; the slot
thread must then ring the loop's eventfd. These drive ``BrokerLink`` against real ZeroMQ sockets (a ROUTER
standing in for the broker) without a llama-server: the point is the socket hand-off, not generation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from qmesh.common import protocol as p
from qmesh.common.bodies import GenerationRequest
from qmesh.worker.generation import Job
from qmesh.worker.link import BrokerLink, Wakeup

ROUTE_KEY = b"\x00\x00\x00\x01"


@pytest.fixture
def wired() -> Iterator[tuple[BrokerLink, zmq.Socket]]:
    """A BrokerLink whose connection 1 is open to a ROUTER (the broker's stand-in), which has its READY."""
    context = zmq.Context()
    broker = context.socket(zmq.ROUTER)
    broker.setsockopt(zmq.LINGER, 0)
    wakeup = Wakeup()
    wakeup.open()
    port = broker.bind_to_random_port("tcp://127.0.0.1")
    endpoint = f"tcp://127.0.0.1:{port}"
    link = BrokerLink(context, wakeup)
    try:
        link.open(1, endpoint)
        assert link.send(p.ready("test-model", {"slots": 1}))
        assert broker.poll(5000), "READY never reached the broker"
        _, *ready = broker.recv_multipart()
        assert isinstance(p.parse_inbound(ready), p.WorkerReady)
        yield link, broker
    finally:
        link.close(flush=False)
        wakeup.close()
        broker.close(linger=0)
        context.term()


def _job(connection: int = 1) -> Job:
    return Job(ROUTE_KEY, GenerationRequest(prompt="hi", stream=b"s1"), connection)


def _chunk(token: int) -> bytes:
    return p.pack({"text": "x", "tokens": [token]})


def _tokens_received(broker: zmq.Socket, route_key: bytes = ROUTE_KEY) -> list[int]:
    assert broker.poll(5000), "nothing reached the broker"
    _, *frames = broker.recv_multipart()
    message = p.parse_inbound(frames)
    assert isinstance(message, p.WorkerPartial) and message.route_key == route_key
    return p.unpack(message.body[0])["tokens"]


def test_a_chunk_goes_to_the_broker_and_rings_nobody_when_nothing_waits(wired) -> None:
    link, broker = wired
    assert link.send_chunk(_job(), _chunk(7), 1)
    assert _tokens_received(broker) == [7]
    assert link.chunks_sent == 1
    assert not link.wakeup.clear()


def test_a_chunk_sent_while_a_broker_message_waits_wakes_the_loop(wired) -> None:
    link, broker = wired
    link.send(p.heartbeat())
    assert broker.poll(5000)
    worker_id, *_ = broker.recv_multipart()  # the routing id the ROUTER knows the DEALER by
    broker.send_multipart([worker_id, *p.worker_credit(ROUTE_KEY, 4)])
    deadline = time.monotonic() + 10
    while not link.wakeup.clear():  # once the CREDIT waits in the DEALER, the next chunk's send must ring
        assert time.monotonic() < deadline, "no chunk send woke the loop, though a broker message was waiting"
        assert link.send_chunk(_job(), _chunk(8), 1)
        time.sleep(0.01)
    (credit,) = link.receive()  # and the loop finds it
    assert p.parse_for_worker(credit).credit == 4


def test_chunks_of_an_earlier_connection_are_never_sent_on_a_later_one(wired) -> None:
    link, broker = wired
    earlier = _job(connection=1)
    link.close(flush=False)
    assert not link.send_chunk(earlier, _chunk(9), 1)  # no connection at all
    link.open(2, link.endpoint)
    assert not link.send_chunk(earlier, _chunk(10), 1)  # connection 1's job, on connection 2
    assert link.send_chunk(_job(connection=2), _chunk(11), 1)
    assert _tokens_received(broker) == [11]  # the first to arrive: the others never left
    assert link.chunks_sent == 1 and [tokens for _, tokens in earlier.sent] == [1, 1], "kept, though not sent"


def test_a_kept_generation_goes_on_where_its_client_is_on_a_new_connection(wired) -> None:
    link, broker = wired
    kept, endpoint = _job(connection=1), link.endpoint
    link.close(flush=False)  # its broker died
    for token in (1, 2, 3, 4):
        link.send_chunk(kept, _chunk(token), 1)  # the generation goes on, with nowhere to send
    link.open(2, endpoint)
    new_key = b"\x00\x00\x00\x09"
    assert link.rebind(kept, new_key, 2, delivered_tokens=2) == 2  # the client had tokens 1 and 2
    received = [_tokens_received(broker, new_key) for _ in range(2)]
    assert received == [[3], [4]]
    assert link.send_chunk(kept, _chunk(5), 1) and _tokens_received(broker, new_key) == [5]
    assert kept.route_key == new_key


def test_a_full_queue_to_the_broker_breaks_the_connection_and_wakes_the_loop(wired) -> None:
    link, broker = wired
    broker.close(linger=0)  # nobody reads: the DEALER's queue fills
    job = _job()
    for token in range(1_000_000):
        if not link.send_chunk(job, _chunk(token), 1):
            break
    assert link.broken, "the DEALER never refused a chunk"
    assert link.wakeup.clear()
    sent = link.chunks_sent
    assert not link.send_chunk(job, _chunk(1), 1)  # nothing more goes out on a connection that lost a message
    assert not link.send(p.heartbeat())
    assert link.chunks_sent == sent
    endpoint = link.endpoint
    link.close(flush=False)
    link.open(2, endpoint)
    assert not link.broken  # a new connection starts clean
