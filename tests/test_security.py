"""CurveZMQ: encryption and authentication with allow-lists, end to end with real sockets and llama-server."""

from __future__ import annotations

import re
import shutil
import stat
import time

import pytest
import zmq

from meshkit import MODEL, BrokerThread, Keyring, RecordingProxy, worker_settings, worker_threads
from qmesh.broker.core import Outgoing, Peer
from qmesh.broker.security import is_loopback
from qmesh.client.sdk import QMeshClient
from qmesh.common import protocol as p
from qmesh.common.errors import BrokerUnreachable, ConfigError, MeshError
from qmesh.common.keys import generate_keys, load_keypair, read_allow_list
from qmesh.testing import free_endpoint, wait_for
from qmesh.worker.node import WorkerNode

SECRET_PROMPT = "The launch code is swordfish-tango-42."


@pytest.fixture
def keyring(tmp_path):
    return Keyring(tmp_path)


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@pytest.mark.parametrize("curve", [False, True], ids=["plain", "curve"])
def test_an_eavesdropper_sees_the_prompt_only_without_curve(keyring, curve):
    security = keyring.security() if curve else None
    worker_keys = keyring.keys("worker") if curve else None
    client_keys = keyring.keys("client") if curve else None
    with (
        BrokerThread(security=security) as broker,
        worker_threads(broker.endpoint, watcher_curve=client_keys, curve=worker_keys, slots=1),
    ):
        proxy = RecordingProxy(_port(broker.endpoint))
        try:
            with QMeshClient(proxy.endpoint, timeout=60, curve=client_keys) as client:
                assert client.generate(SECRET_PROMPT, model=MODEL, max_tokens=8).text.strip()
        finally:
            proxy.close()
    assert len(proxy.recorded) > 200, "the proxy should have carried the conversation"
    assert (b"swordfish" in proxy.recorded) is not curve


def test_keys_on_and_off_the_lists(keyring):
    with (
        BrokerThread(security=keyring.security()) as broker,
        worker_threads(broker.endpoint, watcher_curve=keyring.keys("client"), curve=keyring.keys("worker"), slots=1),
    ):
        with QMeshClient(broker.endpoint, timeout=60, curve=keyring.keys("client")) as client:
            assert client.generate("Say hi.", model=MODEL, max_tokens=4).text.strip()

        # An unlisted client gets a clear refusal, and no answer.
        with QMeshClient(broker.endpoint, connect_timeout=2, curve=keyring.keys("stranger")) as stranger:
            with pytest.raises(BrokerUnreachable, match="refused this key"):
                stranger.models()
            result = stranger.submit("Say hi.", model=MODEL, max_tokens=4).result()
            assert result.error is not None and "allow-list" in result.error.message

        # A worker key used as a client key is not a client.
        with QMeshClient(broker.endpoint, connect_timeout=2, curve=keyring.keys("worker")) as impostor:
            result = impostor.submit("Say hi.", model=MODEL, max_tokens=4).result()
            assert result.error is not None and result.error.code == p.FORBIDDEN

        # A wrong broker key is a clear error within the timeout.
        _, wrong = generate_keys(keyring.root / "not-the-broker")
        lost = QMeshClient(broker.endpoint, connect_timeout=2, curve=keyring.keys("client", wrong))
        with lost, pytest.raises(BrokerUnreachable, match="wrong --broker-key"):
            lost.models()


REFUSALS = {  # how a client gets the broker wrong, and what it is told
    "no key": "the broker at .* requires CURVE keys",
    "unlisted key": "refused this key: it is not on the broker's allow-list",
    "wrong broker key": "wrong --broker-key",
}
# Long enough that a refusal which waited for it is told apart from one at once on any machine, however busy.
REFUSAL_CONNECT_TIMEOUT = 30.0


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_client_the_broker_refuses_learns_it_at_once(keyring, case):
    """ZeroMQ reports each refusal as a handshake event within milliseconds (no key: a mechanism mismatch; an
    unlisted key: the ZAP handler's 400; a wrong broker key: no detail, retried); none may wait connect_timeout."""
    _, wrong = generate_keys(keyring.root / "not-the-broker")
    keys = {"no key": None, "unlisted key": keyring.keys("stranger"), "wrong broker key": keyring.keys("client", wrong)}
    with BrokerThread(security=keyring.security()) as broker:
        with QMeshClient(broker.endpoint, connect_timeout=REFUSAL_CONNECT_TIMEOUT, curve=keys[case]) as client:
            start = time.monotonic()
            request = client.submit("Say hi.", model=MODEL, max_tokens=4)  # in flight when the handshake fails
            result = request.result()
            assert isinstance(result.error, BrokerUnreachable), result.error
            assert re.search(REFUSALS[case], result.error.message), result.error.message
            with pytest.raises(BrokerUnreachable, match=REFUSALS[case]):
                client.models()
            assert time.monotonic() - start < REFUSAL_CONNECT_TIMEOUT / 2, "the refusal waited for the connect timeout"
        with QMeshClient(broker.endpoint, connect_timeout=REFUSAL_CONNECT_TIMEOUT, curve=keys[case]) as client:
            start = time.monotonic()
            with pytest.raises(BrokerUnreachable, match=REFUSALS[case]):
                client.models()  # the first thing asked, before anything else is in flight
            assert time.monotonic() - start < REFUSAL_CONNECT_TIMEOUT / 2, "the refusal waited for the connect timeout"


def test_the_sdk_takes_the_key_files_the_commands_take(keyring):
    """``curve_secret=`` and ``broker_key=`` are the files of ``--curve-secret`` and ``--broker-key``."""
    secret, broker_key = keyring.root / "client.key_secret", keyring.broker_public
    with (
        BrokerThread(security=keyring.security()) as broker,
        QMeshClient(broker.endpoint, curve_secret=secret, broker_key=str(broker_key)) as client,
    ):
        assert client.models() == {}
    endpoint = free_endpoint()
    with pytest.raises(ConfigError, match="curve_secret and broker_key go together"):
        QMeshClient(endpoint, curve_secret=secret)
    with pytest.raises(ConfigError, match="curve_secret and broker_key go together"):
        QMeshClient(endpoint, broker_key=broker_key)
    with pytest.raises(ConfigError, match="either curve= or curve_secret= and broker_key="):
        QMeshClient(endpoint, curve=keyring.keys("client"), curve_secret=secret, broker_key=broker_key)
    with pytest.raises(ConfigError, match="chmod 600"):
        secret.chmod(0o644)
        QMeshClient(endpoint, curve_secret=secret, broker_key=broker_key)


def test_an_unlisted_worker_never_gets_a_request(keyring):
    with BrokerThread(security=keyring.security()) as broker:
        node = WorkerNode(worker_settings(broker.endpoint, slots=1, curve=keyring.keys("stranger")))
        node.start()
        node.join(timeout=60)
        assert not node.is_alive() and node.failure is not None and "allow-list" in node.failure
        with QMeshClient(broker.endpoint, connect_timeout=5, curve=keyring.keys("client")) as client:
            assert client.models() == {}


def test_a_worker_without_keys_is_told_the_broker_requires_them(keyring):
    """The worker stops with what the SDK says of the same mistake: which side lacks CURVE, not a guess."""
    with BrokerThread(security=keyring.security()) as broker:
        node = WorkerNode(worker_settings(broker.endpoint, slots=1))
        node.start()
        node.join(timeout=60)
        assert not node.is_alive() and node.failure is not None
        assert re.search(REFUSALS["no key"], node.failure), node.failure


def test_a_worker_key_limited_to_other_models_stops_with_the_reason_instead_of_retrying(keyring):
    limited, _ = generate_keys(keyring.root / "limited", models=["another-model"])
    shutil.copy(limited, keyring.workers / limited.name)
    with BrokerThread(security=keyring.security()) as broker:
        assert broker.broker is not None
        core, from_workers = broker.broker.core, []
        handle = core.on_message

        def counting(identity: bytes, frames: list[bytes], now: float, peer: Peer | None = None) -> list[Outgoing]:
            if frames[:1] == [p.WORKER]:
                from_workers.append(frames[1])
            return handle(identity, frames, now, peer)

        core.on_message = counting  # every message the broker gets from a worker, counted
        node = WorkerNode(worker_settings(broker.endpoint, slots=1, curve=keyring.keys("limited")))
        node.start()
        node.join(timeout=60)
        assert not node.is_alive(), "the refused worker kept trying"
        assert node.failure is not None
        assert "key limited may not serve 'smollm2-135m' (allowed: another-model)" in node.failure
        assert from_workers.count(p.W_READY) == 1, f"registered {from_workers.count(p.W_READY)} times: a storm"
        assert len(from_workers) <= 3
        with QMeshClient(broker.endpoint, connect_timeout=5, curve=keyring.keys("client")) as client:
            assert MODEL not in client.models()


def test_a_worker_cannot_answer_someone_elses_request(keyring):
    with (
        BrokerThread(security=keyring.security()) as broker,
        worker_threads(broker.endpoint, watcher_curve=keyring.keys("client"), curve=keyring.keys("worker"), slots=1),
        QMeshClient(broker.endpoint, timeout=60, curve=keyring.keys("client")) as client,
    ):
        rogue = zmq.Context.instance().socket(zmq.DEALER)
        rogue.linger = 0
        keyring.keys("worker").apply(rogue)  # a listed worker key, gone bad
        rogue.connect(broker.endpoint)
        rogue.send_multipart(p.ready("rogue-service", {"slots": 1}))
        request = client.submit("Count to ten.", model=MODEL, max_tokens=24, temperature=0)
        wait_for(lambda: client.poll(0.05) or request.chunks, 60, "the real answer to start")
        for key in range(1, 64):  # route keys are opaque, but try the likely ones
            route_key = key.to_bytes(8, "big")
            rogue.send_multipart(p.worker_reply(False, route_key, [p.pack({"text": "INJECTED", "tokens": [1]})]))
            rogue.send_multipart(p.worker_reply(True, route_key, [p.error_body(502, "INJECTED")]))
        result = request.result()
        rogue.close()
    assert result.ok, result.error
    assert "INJECTED" not in result.text


def test_removing_a_key_takes_effect_without_a_restart(keyring):
    with (
        BrokerThread(security=keyring.security()) as broker,
        worker_threads(broker.endpoint, watcher_curve=keyring.keys("client"), curve=keyring.keys("worker"), slots=1),
        QMeshClient(broker.endpoint, timeout=30, connect_timeout=5, curve=keyring.keys("client")) as client,
    ):
        assert client.generate("Say hi.", model=MODEL, max_tokens=4).ok
        (keyring.clients / "client.key").unlink()
        broker.broker.reload_keys()  # what SIGHUP does
        result = wait_for(
            lambda: (r := client.submit("Say hi.", model=MODEL, max_tokens=4).result()).error and r, 10, "refusal"
        )
        assert result.error.code == p.FORBIDDEN


def test_the_broker_names_an_unlisted_key_by_its_fingerprint(keyring, caplog):
    """A revoked client and a stranger are named in the broker's log by the first 8 characters of their public keys,
    which their owners find in their key files."""
    revoked, stranger = (load_keypair(keyring.root / f"{name}.key_secret").public for name in ("client", "stranger"))
    with (
        BrokerThread(security=keyring.security()) as broker,
        QMeshClient(broker.endpoint, curve=keyring.keys("client")) as client,
    ):
        assert client.models() == {}
        (keyring.clients / "client.key").unlink()
        broker.broker.reload_keys()
        with pytest.raises(MeshError) as refusal:
            wait_for(lambda: client.models() is None, 2, "the revoked key to be refused")
        assert refusal.value.code == p.FORBIDDEN
        with QMeshClient(broker.endpoint, curve=keyring.keys("stranger")) as outsider, pytest.raises(BrokerUnreachable):
            outsider.models()
    log = caplog.text
    assert f"refused a client message from key {revoked[:8].decode()}, which is not on the client list" in log, log
    assert f"refused a connection from key {stranger[:8].decode()}, which is on no allow-list" in log, log
    assert "unlisted" not in log and revoked.decode() not in log and stranger.decode() not in log, log


def test_key_files(tmp_path):
    public, secret = generate_keys(tmp_path / "keys" / "node", models=["a", "b"])
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert load_keypair(secret).public == zmq.auth.load_certificate(public)[0]
    assert read_allow_list(public.parent)[load_keypair(secret).public].models == frozenset({"a", "b"})
    with pytest.raises(ConfigError, match="already exists"):
        generate_keys(tmp_path / "keys" / "node")
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_keypair(secret)
    with pytest.raises(ConfigError, match="no secret key"):
        load_keypair(public)


def test_loopback_endpoints():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:5")
    assert is_loopback("ipc:///tmp/x") and not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5")
    assert not is_loopback(free_endpoint().replace("127.0.0.1", "10.1.2.3"))
