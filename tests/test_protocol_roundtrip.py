"""Every builder of common/protocol.py against its parser, with hypothesis.

Two properties: what a builder makes parses back to what it was given, and whatever a parser accepts is
something a builder makes (building from the parsed message gives the same frames, up to how msgpack encodes a
value); for everything else the parser raises ProtocolError and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from qmesh.common import protocol as p

services = st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]), min_size=1, max_size=40).filter(
    lambda s: s.isprintable() and 0 < len(s.encode()) <= p.MAX_SERVICE_LEN
)
request_ids = st.binary(min_size=1, max_size=p.MAX_REQUEST_ID_LEN)
route_keys = st.binary(min_size=1, max_size=16)
credits = st.integers(0, 2**32 - 1)
bodies = st.lists(st.binary(max_size=32), max_size=3)
plain_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=10))
maps = st.dictionaries(st.text(min_size=1, max_size=8), plain_values, min_size=1, max_size=4)
refusals = st.one_of(st.none(), st.tuples(st.integers(100, 599), st.text(max_size=40)))
hints = st.one_of(
    st.none(),
    st.builds(
        p.RoutingHint,
        prefix=st.binary(max_size=5).map(lambda b: b * p.PREFIX_HASH_BYTES),
        session=st.one_of(
            st.none(), st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=9)
        ),
    ),
)


# ------------------------------------------------------------------------------ client -> broker, worker -> broker


@given(service=services, body=bodies, request_id=st.one_of(st.none(), request_ids), hint=hints)
def test_client_request(service: str, body: list[bytes], request_id: bytes | None, hint: p.RoutingHint | None) -> None:
    frames = p.client_request(service, body, request_id, hint)
    sent = hint if request_id is not None and hint is not None and (hint.prefix or hint.session) else None
    assert p.parse_inbound(frames) == p.ClientRequest(service, request_id, body, sent)


@given(request_id=request_ids, credit=credits)
def test_client_cancel_and_credit(request_id: bytes, credit: int) -> None:
    assert p.parse_inbound(p.client_cancel(request_id)) == p.ClientCancel(request_id)
    assert p.parse_inbound(p.client_credit(request_id, credit)) == p.ClientCredit(request_id, credit)


@given(service=services, info=st.one_of(st.none(), maps))
def test_ready(service: str, info: dict[str, Any] | None) -> None:
    assert p.parse_inbound(p.ready(service, info)) == p.WorkerReady(service, info or {})


@given(final=st.booleans(), route_key=route_keys, body=bodies)
def test_worker_reply(final: bool, route_key: bytes, body: list[bytes]) -> None:
    expected = p.WorkerFinal(route_key, body) if final else p.WorkerPartial(route_key, body)
    assert p.parse_inbound(p.worker_reply(final, route_key, body)) == expected


@given(load=st.one_of(st.none(), maps))
def test_worker_heartbeat_and_disconnect(load: dict[str, Any] | None) -> None:
    assert p.parse_inbound(p.heartbeat(load)) == p.WorkerHeartbeat(load or {})
    assert p.parse_inbound(p.disconnect()) == p.WorkerDisconnect()


# ------------------------------------------------------------------------------------------------- broker -> worker


@given(route_key=route_keys, body=bodies, credit=credits, refusal=refusals)
def test_broker_to_worker(route_key: bytes, body: list[bytes], credit: int, refusal: tuple[int, str] | None) -> None:
    assert p.parse_for_worker(p.worker_request(route_key, body)) == p.BrokerToWorker(p.W_REQUEST, route_key, body)
    assert p.parse_for_worker(p.worker_cancel(route_key)) == p.BrokerToWorker(p.W_CANCEL, route_key)
    assert p.parse_for_worker(p.worker_credit(route_key, credit)) == p.BrokerToWorker(
        p.W_CREDIT, route_key, credit=credit
    )
    assert p.parse_for_worker(p.heartbeat()) == p.BrokerToWorker(p.W_HEARTBEAT)
    assert p.parse_for_worker(p.disconnect(refusal)) == p.BrokerToWorker(p.W_DISCONNECT, refusal=refusal)


# ------------------------------------------------------------------------------------------------- broker -> client


@given(final=st.booleans(), service=services, request_id=st.one_of(st.none(), request_ids), body=bodies)
def test_client_reply(final: bool, service: str, request_id: bytes | None, body: list[bytes]) -> None:
    frames = p.client_reply(final, service, request_id, body)
    command = p.C_FINAL if final else p.C_PARTIAL
    assert p.parse_for_client(frames, extended=request_id is not None) == p.BrokerToClient(
        command, service, request_id, body
    )


@given(service=services, request_id=request_ids, status=maps)
def test_client_status(service: str, request_id: bytes, status: dict[str, Any]) -> None:
    reply = p.parse_for_client(p.client_status(service, request_id, status))
    assert (reply.command, reply.service, reply.request_id) == (p.C_STATUS, service, request_id)
    assert [p.unpack_map(frame) for frame in reply.body] == [status]


# ------------------------------------------------------------------------------------------- only what builders make


def _rebuild_inbound(message: p.InboundMessage) -> list[bytes]:
    if isinstance(message, p.ClientRequest):
        return p.client_request(message.service, message.body, message.request_id, message.hint)
    if isinstance(message, p.ClientCancel):
        return p.client_cancel(message.request_id)
    if isinstance(message, p.ClientCredit):
        return p.client_credit(message.request_id, message.credit)
    if isinstance(message, p.WorkerReady):
        return p.ready(message.service, message.info)
    if isinstance(message, (p.WorkerPartial, p.WorkerFinal)):
        return p.worker_reply(isinstance(message, p.WorkerFinal), message.route_key, message.body)
    if isinstance(message, p.WorkerHeartbeat):
        return p.heartbeat(message.load)
    return p.disconnect()


def _rebuild_for_worker(message: p.BrokerToWorker) -> list[bytes]:
    builders: dict[bytes, Callable[[], list[bytes]]] = {
        p.W_REQUEST: lambda: p.worker_request(message.route_key, message.body),
        p.W_CANCEL: lambda: p.worker_cancel(message.route_key),
        p.W_CREDIT: lambda: p.worker_credit(message.route_key, message.credit),
        p.W_HEARTBEAT: p.heartbeat,
        p.W_DISCONNECT: lambda: p.disconnect(message.refusal),
    }
    return builders[message.command]()


def _rebuild_for_client(message: p.BrokerToClient) -> list[bytes]:
    if message.command == p.C_STATUS:
        assert message.request_id is not None and len(message.body) == 1
        return p.client_status(message.service, message.request_id, p.unpack_map(message.body[0]))
    return p.client_reply(message.command == p.C_FINAL, message.service, message.request_id, message.body)


_valid = st.one_of(
    st.builds(p.client_request, services, bodies, st.one_of(st.none(), request_ids), hints),
    st.builds(p.client_cancel, request_ids),
    st.builds(p.client_credit, request_ids, credits),
    st.builds(p.ready, services, st.one_of(st.none(), maps)),
    st.builds(p.worker_reply, st.booleans(), route_keys, bodies),
    st.builds(p.heartbeat, st.one_of(st.none(), maps)),
    st.builds(p.disconnect, refusals),
    st.builds(p.worker_request, route_keys, bodies),
    st.builds(p.worker_cancel, route_keys),
    st.builds(p.worker_credit, route_keys, credits),
    st.builds(p.client_reply, st.booleans(), services, st.one_of(st.none(), request_ids), bodies),
    st.builds(p.client_status, services, request_ids, maps),
)
_frame_edits = st.lists(
    st.tuples(st.sampled_from(["drop", "insert", "replace", "truncate"]), st.integers(0, 6), st.binary(max_size=6)),
    min_size=1,
    max_size=3,
)


def _edit(frames: list[bytes], edits: list[tuple[str, int, bytes]]) -> list[bytes]:
    frames = list(frames)
    for kind, index, data in edits:
        index = min(index, len(frames))
        if kind == "drop" and index < len(frames):
            del frames[index]
        elif kind == "insert":
            frames.insert(index, data)
        elif kind == "replace" and index < len(frames):
            frames[index] = data
        elif kind == "truncate" and index < len(frames):
            frames[index] = frames[index][: len(data)]
    return frames


_anything = st.one_of(
    _valid,
    st.builds(_edit, _valid, _frame_edits),  # near misses: a frame dropped, added, replaced or cut short
    st.lists(st.binary(max_size=10), max_size=6),
)


@settings(max_examples=2000)
@given(frames=_anything, extended=st.booleans())
def test_parsers_accept_only_what_builders_make(frames: list[bytes], extended: bool) -> None:
    parsers = (
        (p.parse_inbound, _rebuild_inbound),
        (p.parse_for_worker, _rebuild_for_worker),
        (lambda f: p.parse_for_client(f, extended), _rebuild_for_client),
    )
    for parse, rebuild in parsers:
        try:
            message = parse(frames)
        except p.ProtocolError:
            continue  # the one way a parser says no
        rebuilt = rebuild(message)
        assert _same_frames(rebuilt, frames), f"{frames!r} parsed to {message!r}, which no builder makes"


def _same_frames(built: list[bytes], received: list[bytes]) -> bool:
    """Equal frame by frame; a msgpack frame may encode the same value another way (a map16 for a fixmap)."""
    if len(built) != len(received):
        return False
    for mine, theirs in zip(built, received, strict=True):
        if mine != theirs:
            try:
                if p.unpack(mine) != p.unpack(theirs):
                    return False
            except p.ProtocolError:
                return False
    return True
