"""Tens of thousands of malformed and hostile messages at a running broker process: it keeps serving, memory bounded."""

from __future__ import annotations

import itertools
import random
import subprocess
import time

import psutil
import zmq

from meshkit import MODEL, worker_threads
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.testing import ROOT, free_endpoint, qmesh_command, wait_for

MESSAGES = 30_000
PEERS = 20  # many, so some of the flood comes from "workers" that registered


def _hostile_messages(rng: random.Random, peers: int):
    """Garbage, truncated and well-formed-but-wrong messages of every kind the broker parses; the i-th is sent by
    peer i % ``peers``, so that a stream one fake worker offers (ATTACH) is asked for, under that fake's service, by
    a client that lost its broker, as after a takeover: the broker joins them."""
    headers = [p.CLIENT, p.WORKER, b"", b"MDPC01", b"\x00" * 6]
    commands = [bytes([c]) for c in range(0, 0x20)]
    services: dict[int, str] = {}  # the service each peer last registered as
    offered: list[tuple[bytes, str]] = [(b"stream", "fake-0")]  # streams offered lately, and the offerer's service
    for index in itertools.count():
        peer = index % peers
        kind = rng.randrange(14)
        if kind == 9 and rng.random() > 0.02:
            kind = 0  # large bodies are few: the point is the limit, not pushing gigabytes
        if kind == 0:
            yield [rng.choice(headers), rng.choice(commands)] + [rng.randbytes(rng.randrange(40)) for _ in range(4)]
        elif kind == 1:
            yield [p.WORKER, p.W_READY, rng.choice([b"mmi.evil", b"", b"\xff\xfe", b"x" * 300]), b"\xc1"]
        elif kind == 2:
            services[peer] = f"fake-{rng.randrange(50)}"
            yield p.ready(services[peer], {"slots": rng.choice([0, -1, 5000, "many", None, 3])})
        elif kind == 3:
            yield p.worker_reply(rng.random() < 0.5, rng.randbytes(8), [rng.randbytes(20)])
        elif kind == 4:
            yield p.client_request(f"unknown-{rng.randrange(10**9)}", [rng.randbytes(30)], rng.randbytes(8))
        elif kind == 5:
            yield p.client_cancel(rng.randbytes(rng.randrange(1, 80)))
        elif kind == 6:
            yield [p.CLIENT, p.C_CREDIT, rng.randbytes(8), rng.randbytes(rng.randrange(8))]
        elif kind == 7:
            yield [p.WORKER, p.W_HEARTBEAT, rng.randbytes(rng.randrange(30))]
        elif kind == 8:
            yield [p.CLIENT, p.C_XREQUEST, b"mmi.workers", b"id"] + [b""] * rng.randrange(200)
        elif kind == 9:
            yield [p.CLIENT, p.C_REQUEST, MODEL.encode(), b"x" * (2 * 1024 * 1024)]  # over the request size limit
        elif kind == 10:
            yield [p.WORKER, p.W_DISCONNECT]
        elif kind == 12:  # a kept stream offered by a registered fake or a stranger; a new one, or one offered before
            stream = rng.choice([rng.randbytes(8), rng.choice(offered)[0], b"", b"s" * 300])
            offered = [*offered[-15:], (stream, services.get(peer, "fake-0"))]
            yield p.attach(stream)
        elif kind == 13:  # a client back after losing its broker, for a stream offered lately (or not)
            stream, service = rng.choice(offered)
            if rng.random() < 0.2 or not stream:  # (an empty stream id was offered: a request id cannot be empty)
                stream = rng.randbytes(8)
            hint = p.RoutingHint(stream=stream, attach=True)
            yield p.client_request(service, [rng.randbytes(30)], stream, hint)
        else:
            yield [rng.randbytes(rng.randrange(1, 10))]


def test_hostile_flood_leaves_the_broker_serving_with_bounded_memory():
    endpoint = free_endpoint()
    command = qmesh_command("qmesh-broker", "--bind", endpoint, "--heartbeat-ms", "200")
    command += ["--queue-timeout", "2", "--log-level", "error"]
    broker = subprocess.Popen(command, cwd=ROOT)
    context = zmq.Context.instance()
    attackers = []
    try:
        with worker_threads(endpoint, count=1, slots=1), QMeshClient(endpoint, timeout=60) as client:
            assert client.generate("Say hi.", model=MODEL, max_tokens=4).text.strip()
            baseline = psutil.Process(broker.pid).memory_info().rss
            rng = random.Random(20261126)
            messages = _hostile_messages(rng, PEERS)
            for _ in range(PEERS):
                attacker = context.socket(zmq.DEALER)
                attacker.linger = 0
                attacker.sndhwm = 0
                attacker.connect(endpoint)
                attackers.append(attacker)
            for index in range(MESSAGES):
                attackers[index % len(attackers)].send_multipart(next(messages))
            time.sleep(3)  # let the broker chew through it, and fake workers and queued requests expire

            assert broker.poll() is None, "the broker died"
            result = client.generate("Say yes.", model=MODEL, max_tokens=4)
            assert result.text.strip()
            wait_for(lambda: set(client.models()) == {MODEL}, 10, "fake registrations to expire")
            growth_mb = (psutil.Process(broker.pid).memory_info().rss - baseline) / 2**20
            assert growth_mb < 64, f"broker memory grew by {growth_mb:.0f} MB"
    finally:
        for attacker in attackers:
            attacker.close()
        broker.terminate()
        assert broker.wait(timeout=10) == 0
