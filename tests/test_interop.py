"""The Majordomo peers people actually have, through a real qmesh-broker.

* majortomo 0.2.0 (PyPI), its own ``Client`` and ``Worker``: a leading empty frame on every command, and on the
  client side the worker's command codes with replies that name no service;
* 7/MDP (MDP/0.1, rfc.zeromq.org spec 7), as the zguide's clients and workers speak it, written here from the
  spec on plain pyzmq sockets: a REQ client (``MDPC01``, one REPLY per request) and a DEALER worker (``MDPW01``,
  every command after an empty frame, one REPLY per request);
* mixes of those with each other, with 18/MDP peers and with QMesh's own SDK and workers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import replace

import majortomo
import pytest
import zmq

from meshkit import FAST, MODEL, BrokerThread, worker_threads
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.common.bodies import final_body
from qmesh.testing import wait_for_workers

# majortomo's Worker heartbeats only while it waits for a request, at most every 2 x its interval: a broker
# interval of 0.5 s (1.5 s to expiry) leaves it room on a busy machine.
BROKER = replace(FAST, heartbeat_interval=0.5)
ECHO = "echo"
TIMEOUT = 10.0

Answer = Callable[[list[bytes]], tuple[list[list[bytes]], list[bytes]]]


def stream_back(request: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
    """Each request frame back as a PARTIAL of its own, then a FINAL ``done``."""
    return [[frame] for frame in request], [b"done"]


class MajortomoWorker:
    """majortomo's ``Worker`` in a thread, answering each request with ``answer(body) -> (partials, final)``.

    It has a context of its own: terminating it is the only way to wake a worker blocked in ``wait_for_request``.
    """

    def __init__(self, endpoint: str, service: str, answer: Answer) -> None:
        self.context = zmq.Context()
        self.worker = majortomo.Worker(
            endpoint, service, heartbeat_interval=0.2, zmq_context=self.context, zmq_linger=0
        )
        self.answer = answer
        self.requests: list[list[bytes]] = []
        self.thread = threading.Thread(target=self._serve, name="majortomo-worker", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.worker.connect()
            while True:
                client, request = self.worker.wait_for_request()
                self.requests.append(request)
                partials, final = self.answer(request)
                for partial in partials:
                    self.worker.send_reply_partial(client, partial)
                self.worker.send_reply_final(client, final)
        except zmq.ContextTerminated:
            # stop() terminates the context, which waits for this socket; majortomo has no public way to close a
            # socket whose context is gone (its close() sends DISCONNECT first)
            self.worker._socket.close(linger=0)

    def stop(self) -> None:
        self.context.term()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "the majortomo worker did not stop"


@contextlib.contextmanager
def majortomo_worker(endpoint: str, answer: Answer = stream_back, service: str = ECHO) -> Iterator[MajortomoWorker]:
    worker = MajortomoWorker(endpoint, service, answer)
    try:
        wait_for_workers(endpoint, service, 1, TIMEOUT)
        yield worker
    finally:
        worker.stop()


@contextlib.contextmanager
def majortomo_client(endpoint: str) -> Iterator[majortomo.Client]:
    with majortomo.Client(endpoint) as client:
        yield client


class OldWorker:
    """A 7/MDP worker written from the spec: a DEALER whose every command is ``"", "MDPW01", command, ...``."""

    READY, REQUEST, REPLY, HEARTBEAT, DISCONNECT = b"\x01", b"\x02", b"\x03", b"\x04", b"\x05"

    def __init__(self, endpoint: str, service: str = ECHO) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.linger = 0
        self.socket.connect(endpoint)
        self.heartbeats = 0  # the broker's, all checked to be in 7/MDP framing
        self.send(self.READY, service.encode())
        wait_for_workers(endpoint, service, 1, TIMEOUT)

    def send(self, command: bytes, *frames: bytes) -> None:
        self.socket.send_multipart([b"", b"MDPW01", command, *frames])

    def next_request(self) -> tuple[bytes, list[bytes]]:
        """The next REQUEST's client address and body; it heartbeats while it waits, as the spec asks."""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if not self.socket.poll(200):
                self.send(self.HEARTBEAT)
                continue
            frames = self.socket.recv_multipart()
            assert frames[:2] == [b"", b"MDPW01"], f"not in the worker's own framing: {frames}"
            if frames[2:] == [self.HEARTBEAT]:
                self.heartbeats += 1
                continue
            assert frames[2] == self.REQUEST and len(frames) >= 5 and frames[4] == b"", frames
            return frames[3], frames[5:]
        raise AssertionError("no REQUEST reached the 7/MDP worker")

    def reply(self, address: bytes, *body: bytes) -> None:
        self.send(self.REPLY, address, b"", *body)

    def close(self) -> None:
        self.send(self.DISCONNECT)
        self.socket.close()


class OldClient:
    """A 7/MDP client written from the spec: a REQ socket (which adds and strips the empty frame itself)."""

    def __init__(self, endpoint: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.REQ)
        self.socket.linger = 0
        self.socket.connect(endpoint)
        self.service = b""  # of the request sent last, which its REPLY names

    def send(self, service: str, *body: bytes) -> None:
        self.service = service.encode()
        self.socket.send_multipart([b"MDPC01", self.service, *body])

    def receive(self, timeout: float = TIMEOUT) -> list[bytes]:
        """A REPLY's body, after checking its header and service."""
        assert self.socket.poll(timeout * 1000), "no REPLY"
        header, service, *body = self.socket.recv_multipart()
        assert header == b"MDPC01" and service == self.service, (header, service)
        return body

    def request(self, service: str, *body: bytes, timeout: float = TIMEOUT) -> list[bytes]:
        self.send(service, *body)
        return self.receive(timeout)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(config=BROKER) as broker:
        yield broker


# ------------------------------------------------------------------------------------------- majortomo 0.2.0


def test_majortomo_client_and_worker_stream_through_the_broker(broker: BrokerThread) -> None:
    with majortomo_worker(broker.endpoint) as worker, majortomo_client(broker.endpoint) as client:
        client.send(ECHO, b"one", b"two")
        assert list(client.recv_all(timeout=TIMEOUT)) == [[b"one"], [b"two"], [b"done"]]
        client.send(ECHO, b"again")
        assert client.recv_all_as_list(timeout=TIMEOUT) == [b"again", b"done"]
        assert worker.requests == [[b"one", b"two"], [b"again"]]
        for service, answer in (("mmi.service", b"200"), ("mmi.nope", b"501")):
            client.send(service, ECHO.encode())
            assert client.recv_all_as_list(timeout=TIMEOUT) == [answer]
        client.send("mmi.service", b"no-such-service")
        assert client.recv_all_as_list(timeout=TIMEOUT) == [b"404"]


def test_a_request_waits_for_a_majortomo_worker_that_registers_later(broker: BrokerThread) -> None:
    with majortomo_client(broker.endpoint) as client:
        client.send(ECHO, b"early")
        with majortomo_worker(broker.endpoint):
            assert client.recv_all_as_list(timeout=TIMEOUT) == [b"early", b"done"]


# ------------------------------------------------------------------------------------------------------- 7/MDP


def test_7mdp_client_and_worker_through_the_broker(broker: BrokerThread) -> None:
    with (
        closing(OldWorker(broker.endpoint)) as worker,
        closing(OldClient(broker.endpoint)) as client,
    ):
        client.send(ECHO, b"hello", b"world")
        address, body = worker.next_request()
        assert body == [b"hello", b"world"]
        worker.reply(address, b"HELLO", b"WORLD")
        assert client.receive() == [b"HELLO", b"WORLD"]
        assert client.request("mmi.service", ECHO.encode()) == [b"200"]
        assert client.request("mmi.service", b"no-such-service") == [b"404"]
        assert client.request("mmi.nope") == [b"501"]
        time.sleep(3 * BROKER.heartbeat_interval)  # the broker's heartbeats, checked by the worker's framing
        client.send(ECHO, b"second")
        address, body = worker.next_request()
        assert worker.heartbeats >= 2 and body == [b"second"]
        worker.reply(address, b"SECOND")
        assert client.receive() == [b"SECOND"]


def test_a_7mdp_client_gets_a_majortomo_workers_partials_in_one_reply(broker: BrokerThread) -> None:
    with majortomo_worker(broker.endpoint), closing(OldClient(broker.endpoint)) as client:
        assert client.request(ECHO, b"one", b"two", b"three") == [b"one", b"two", b"three", b"done"]


def test_a_majortomo_client_gets_a_7mdp_workers_reply_as_its_final(broker: BrokerThread) -> None:
    with closing(OldWorker(broker.endpoint)) as worker, majortomo_client(broker.endpoint) as client:
        client.send(ECHO, b"question")
        address, body = worker.next_request()
        worker.reply(address, b"answer", b"more")
        assert body == [b"question"]
        assert list(client.recv_all(timeout=TIMEOUT)) == [[b"answer", b"more"]]


@pytest.mark.parametrize("delimited", [False, True], ids=["dealer", "delimited"])
def test_an_18mdp_client_gets_a_7mdp_workers_reply_as_one_final(broker: BrokerThread, delimited: bool) -> None:
    """An RFC 18 client, with or without a leading empty frame, which its replies then carry too."""
    lead = [b""] if delimited else []
    client = zmq.Context.instance().socket(zmq.DEALER)
    client.linger = 0
    client.connect(broker.endpoint)
    with closing(OldWorker(broker.endpoint)) as worker:
        client.send_multipart([*lead, b"MDPC02", b"\x01", ECHO.encode(), b"question"])
        address, _ = worker.next_request()
        worker.reply(address, b"answer")
        assert client.poll(TIMEOUT * 1000)
        assert client.recv_multipart() == [*lead, b"MDPC02", b"\x03", ECHO.encode(), b"answer"]
    client.close()


# ------------------------------------------------------------------------------------------------------ the SDK


def test_the_sdk_streams_from_a_majortomo_worker(broker: BrokerThread) -> None:
    """QMesh's client through a plain MDP/0.2 worker that answers in QMesh's bodies."""

    def generate(request: list[bytes]) -> tuple[list[list[bytes]], list[bytes]]:
        assert p.unpack_map(request[0])["prompt"] == "Count to two."
        chunks = [[p.pack({"text": "1 ", "tokens": [1]})], [p.pack({"text": "2", "tokens": [2]})]]
        return chunks, [final_body(finish_reason="stop", tokens=2)]

    with majortomo_worker(broker.endpoint, generate), QMeshClient(broker.endpoint, timeout=TIMEOUT) as client:
        request = client.submit("Count to two.", model=ECHO, max_tokens=4)
        result = request.result()
        assert result.ok, result.error
        assert result.text == "1 2" and [c.tokens for c in request.chunks] == [[1], [2]]


# ------------------------------------------------------------------------------------------ QMesh's own workers


@pytest.fixture(scope="module")
def qmesh_mesh() -> Iterator[BrokerThread]:
    """A broker and one QMesh worker (a real llama-server, 2 slots), shared by the tests below."""
    with BrokerThread() as broker, worker_threads(broker.endpoint, count=1, slots=2):
        yield broker


def _is_chunk(body: bytes) -> bool:
    return set(p.unpack_map(body)) >= {"text", "tokens"}


def test_a_7mdp_client_gets_a_qmesh_workers_stream_as_one_reply(qmesh_mesh: BrokerThread) -> None:
    with closing(OldClient(qmesh_mesh.endpoint)) as client:
        assert client.request("mmi.service", MODEL.encode()) == [b"200"]
        *chunks, final = client.request(MODEL, b"Name a colour.", timeout=120)
    assert chunks and all(_is_chunk(chunk) for chunk in chunks)
    assert "".join(p.unpack_map(chunk)["text"] for chunk in chunks).strip()
    summary = p.unpack_map(final)
    assert summary["finish_reason"] in ("stop", "length") and summary["tokens"] == len(chunks)


def test_a_majortomo_client_streams_from_a_qmesh_worker(qmesh_mesh: BrokerThread) -> None:
    with majortomo_client(qmesh_mesh.endpoint) as client:
        client.send(MODEL, p.pack({"prompt": "Name a colour.", "max_tokens": 8, "temperature": 0}))
        *chunks, final = list(client.recv_all(timeout=120))
    assert len(chunks) >= 2 and all(len(part) == 1 and _is_chunk(part[0]) for part in chunks)
    assert p.unpack_map(final[0])["tokens"] == len(chunks)


def test_old_majortomo_and_sdk_clients_share_a_qmesh_worker(qmesh_mesh: BrokerThread) -> None:
    """Three clients in three framings at once on one 2-slot worker: each gets its whole answer, in its framing
    (not necessarily the same text: llama-server's batches may round differently)."""
    prompt = {"prompt": "Say yes.", "max_tokens": 6, "temperature": 0}
    with (
        closing(OldClient(qmesh_mesh.endpoint)) as old,
        majortomo_client(qmesh_mesh.endpoint) as new,
        QMeshClient(qmesh_mesh.endpoint, timeout=120) as sdk,
    ):
        old.send(MODEL, p.pack(prompt))
        new.send(MODEL, p.pack(prompt))
        result = sdk.submit(**prompt, model=MODEL).result()
        parts = list(new.recv_all(timeout=120))
        reply = old.receive(timeout=120)
    assert result.ok, result.error
    assert result.text.strip()
    assert "".join(p.unpack_map(part[0])["text"] for part in parts[:-1]).strip()
    assert "".join(p.unpack_map(chunk)["text"] for chunk in reply[:-1]).strip()
    assert "finish_reason" in p.unpack_map(parts[-1][0]) and "finish_reason" in p.unpack_map(reply[-1])
