"""Every builder of common/protocol.py against its parser, with hypothesis.

Two properties: what a builder makes parses back to what it was given, and whatever a parser accepts is
something a builder makes (building from the parsed message gives the same frames, up to how msgpack encodes a
value); for everything else the parser raises ProtocolError and nothing else. Both hold in every framing: 18/MDP,
majortomo's client framing and 7/MDP, each with and without a leading empty frame.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmesh.common import protocol as p

Parse = Callable[[list[bytes]], Any]  # a parser of common/protocol.py
Rebuild = Callable[[Any], list[bytes]]  # the builder of what it parsed, called on its message

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
delimited = st.booleans()
# QMesh's extensions (request ids, CANCEL, CREDIT, STATUS, info, load, refusals) exist only in 18/MDP framing.
mdp02_framings = st.builds(p.Framing, st.just(p.Dialect.MDP02), delimited)
worker_framings = st.builds(p.Framing, st.sampled_from([p.Dialect.MDP02, p.Dialect.MDP01]), delimited)
client_framings = st.builds(p.Framing, st.sampled_from(list(p.Dialect)), delimited)
hints = st.one_of(
    st.none(),
    st.builds(
        p.RoutingHint,
        prefix=st.binary(max_size=5).map(lambda b: b * p.PREFIX_HASH_BYTES),
        session=st.one_of(
            st.none(), st.text(st.characters(codec="utf-8", categories=["L", "N"]), min_size=1, max_size=9)
        ),
        capability=st.one_of(
            st.none(),
            st.sampled_from([p.CHAT, p.EMBEDDINGS]),
            st.text(
                st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=p.MAX_CAPABILITY_LEN
            ),
        ),
        stream=st.one_of(st.none(), st.binary(min_size=1, max_size=p.MAX_STREAM_ID_LEN)),
    ).flatmap(
        lambda hint: st.builds(lambda attach: replace(hint, attach=attach and hint.stream is not None), st.booleans())
    ),
)


# ------------------------------------------------------------------------------ client -> broker, worker -> broker


@given(service=services, body=bodies, request_id=st.one_of(st.none(), request_ids), hint=hints, framing=client_framings)
def test_client_request(
    service: str, body: list[bytes], request_id: bytes | None, hint: p.RoutingHint | None, framing: p.Framing
) -> None:
    if framing.dialect is not p.Dialect.MDP02:
        request_id = None  # plain requests only: ids are QMesh's
    frames = p.client_request(service, body, request_id, hint, framing)
    sent = hint if request_id is not None and hint is not None and not hint.empty else None
    assert p.parse_inbound(frames) == p.ClientRequest(service, request_id, body, sent, framing)


@given(request_id=request_ids, credit=credits, framing=mdp02_framings)
def test_client_cancel_and_credit(request_id: bytes, credit: int, framing: p.Framing) -> None:
    assert p.parse_inbound(p.client_cancel(request_id, framing)) == p.ClientCancel(request_id, framing)
    assert p.parse_inbound(p.client_credit(request_id, credit, framing)) == p.ClientCredit(request_id, credit, framing)


@given(service=services, info=st.one_of(st.none(), maps), framing=worker_framings)
def test_ready(service: str, info: dict[str, Any] | None, framing: p.Framing) -> None:
    if framing.dialect is p.Dialect.MDP01:
        info = None
    assert p.parse_inbound(p.ready(service, info, framing)) == p.WorkerReady(service, info or {}, framing)


@given(final=st.booleans(), route_key=route_keys, body=bodies, framing=worker_framings)
def test_worker_reply(final: bool, route_key: bytes, body: list[bytes], framing: p.Framing) -> None:
    final = final or framing.dialect is p.Dialect.MDP01  # a 7/MDP REPLY is a FINAL
    expected = p.WorkerFinal(route_key, body, framing) if final else p.WorkerPartial(route_key, body, framing)
    assert p.parse_inbound(p.worker_reply(final, route_key, body, framing)) == expected


@given(load=st.one_of(st.none(), maps), framing=worker_framings)
def test_worker_heartbeat_and_disconnect(load: dict[str, Any] | None, framing: p.Framing) -> None:
    if framing.dialect is p.Dialect.MDP01:
        load = None
    assert p.parse_inbound(p.heartbeat(load, framing)) == p.WorkerHeartbeat(load or {}, framing)
    assert p.parse_inbound(p.disconnect(framing=framing)) == p.WorkerDisconnect(framing)


def test_a_leading_empty_frame_is_the_only_one() -> None:
    """One empty frame is a delimiter; a second is an empty header."""
    assert p.parse_inbound([b"", *p.client_request("echo", [b"x"])]).framing == p.Framing(delimited=True)
    for frames in ([b"", b"", *p.client_request("echo", [b"x"])], [b""], [b"", p.CLIENT]):
        with pytest.raises(p.ProtocolError):
            p.parse_inbound(frames)


# ------------------------------------------------------------------------------------------------- broker -> worker


@given(
    route_key=route_keys,
    body=bodies,
    credit=credits,
    refusal=refusals,
    framing=worker_framings,
    extended=mdp02_framings,
)
def test_broker_to_worker(
    route_key: bytes,
    body: list[bytes],
    credit: int,
    refusal: tuple[int, str] | None,
    framing: p.Framing,
    extended: p.Framing,
) -> None:
    def parse(frames: list[bytes], framing: p.Framing = framing) -> p.BrokerToWorker:
        return p.parse_for_worker(frames, framing)

    assert parse(p.worker_request(route_key, body, framing)) == p.BrokerToWorker(p.W_REQUEST, route_key, body)
    assert parse(p.heartbeat(framing=framing)) == p.BrokerToWorker(p.W_HEARTBEAT)
    assert parse(p.disconnect(framing=framing)) == p.BrokerToWorker(p.W_DISCONNECT)
    # only to an extended worker, in 18/MDP framing
    assert parse(p.worker_cancel(route_key, extended), extended) == p.BrokerToWorker(p.W_CANCEL, route_key)
    assert parse(p.worker_credit(route_key, credit, extended), extended) == p.BrokerToWorker(
        p.W_CREDIT, route_key, credit=credit
    )
    assert parse(p.disconnect(refusal, extended), extended) == p.BrokerToWorker(p.W_DISCONNECT, refusal=refusal)
    # the broker of a pair answers READY with its epoch
    assert parse(p.heartbeat({"epoch": credit}, extended), extended) == p.BrokerToWorker(p.W_HEARTBEAT, epoch=credit)


@given(stream=st.binary(min_size=1, max_size=p.MAX_STREAM_ID_LEN))
def test_attach(stream: bytes) -> None:
    assert p.parse_inbound(p.attach(stream)) == p.WorkerAttach(stream)


@given(state=st.sampled_from(p.PAIR_STATES), epoch=st.integers(0, 2**64 - 1))
def test_pair_state(state: str, epoch: int) -> None:
    assert p.parse_pair_state(p.pair_state(state, epoch)) == (state, epoch)


@given(frames=st.lists(st.binary(max_size=9), max_size=4))
def test_the_pair_state_parser_accepts_only_what_its_builder_makes(frames: list[bytes]) -> None:
    try:
        state, epoch = p.parse_pair_state(frames)
    except p.ProtocolError:
        return
    assert p.pair_state(state, epoch) == frames


# ------------------------------------------------------------------------------------------------- broker -> client


@given(
    final=st.booleans(),
    service=services,
    request_id=st.one_of(st.none(), request_ids),
    body=bodies,
    framing=client_framings,
)
def test_client_reply(
    final: bool, service: str, request_id: bytes | None, body: list[bytes], framing: p.Framing
) -> None:
    if framing.dialect is not p.Dialect.MDP02:
        request_id = None
    final = final or framing.dialect is p.Dialect.MDP01  # a 7/MDP client gets only its one REPLY
    frames = p.client_reply(final, service, request_id, body, framing)
    command = p.C_FINAL if final else p.C_PARTIAL
    named = "" if framing.dialect is p.Dialect.MAJORTOMO else service  # majortomo's replies do not name it
    assert p.parse_for_client(frames, request_id is not None, framing) == p.BrokerToClient(
        command, named, request_id, body
    )


@given(service=services, request_id=request_ids, status=maps, framing=mdp02_framings)
def test_client_status(service: str, request_id: bytes, status: dict[str, Any], framing: p.Framing) -> None:
    reply = p.parse_for_client(p.client_status(service, request_id, status, framing), framing=framing)
    assert (reply.command, reply.service, reply.request_id) == (p.C_STATUS, service, request_id)
    assert [p.unpack_map(frame) for frame in reply.body] == [status]


def test_what_a_framing_cannot_say_is_refused_by_its_builders() -> None:
    """A 7/MDP peer has no PARTIAL, no ids, info, load or reasons; majortomo's framing is a client's."""
    old = p.Framing(p.Dialect.MDP01)
    majortomo = p.Framing(p.Dialect.MAJORTOMO, delimited=True)
    for build in (
        lambda: p.client_reply(False, "s", None, [], old),
        lambda: p.client_reply(True, "s", b"id", [], majortomo),
        lambda: p.client_request("s", [], b"id", None, old),
        lambda: p.client_cancel(b"id", majortomo),
        lambda: p.worker_reply(False, b"k", [], old),
        lambda: p.ready("s", {"slots": 2}, old),
        lambda: p.heartbeat({"busy": 1}, old),
        lambda: p.disconnect((403, "no"), old),
        lambda: p.worker_cancel(b"k", old),
        lambda: p.worker_request(b"k", [], majortomo),
    ):
        with pytest.raises(ValueError):
            build()


# ------------------------------------------------------------------------------------------- only what builders make


def _rebuild_inbound(message: p.InboundMessage) -> list[bytes]:
    if isinstance(message, p.TransferMessage):  # 18/MDP framing only: they carry none
        return _rebuild_transfer(message)
    framing = message.framing
    if isinstance(message, p.ClientRequest):
        return p.client_request(message.service, message.body, message.request_id, message.hint, framing)
    if isinstance(message, p.ClientCancel):
        return p.client_cancel(message.request_id, framing)
    if isinstance(message, p.ClientCredit):
        return p.client_credit(message.request_id, message.credit, framing)
    if isinstance(message, p.WorkerReady):
        return p.ready(message.service, message.info, framing)
    if isinstance(message, (p.WorkerPartial, p.WorkerFinal)):
        return p.worker_reply(isinstance(message, p.WorkerFinal), message.route_key, message.body, framing)
    if isinstance(message, p.WorkerHeartbeat):
        return p.heartbeat(message.load, framing)
    if isinstance(message, p.WorkerAttach):
        return p.attach(message.stream)
    return p.disconnect(framing=framing)


def _rebuild_for_worker(message: p.BrokerToWorker, framing: p.Framing) -> list[bytes]:
    builders: dict[bytes, Callable[[], list[bytes]]] = {
        p.W_REQUEST: lambda: p.worker_request(message.route_key, message.body, framing),
        p.W_CANCEL: lambda: p.worker_cancel(message.route_key, framing),
        p.W_CREDIT: lambda: p.worker_credit(message.route_key, message.credit, framing),
        p.W_HEARTBEAT: lambda: p.heartbeat(None if message.epoch is None else {"epoch": message.epoch}, framing),
        p.W_DISCONNECT: lambda: p.disconnect(message.refusal, framing),
    }
    if message.command == p.W_READ and message.read is not None:
        return p.holder_read(message.route_key, message.read.sha256, message.read.offset, message.read.length)
    return builders[message.command]()


def _rebuild_for_client(message: p.BrokerToClient, framing: p.Framing) -> list[bytes]:
    if message.command == p.C_STATUS:
        assert message.request_id is not None and len(message.body) == 1
        return p.client_status(message.service, message.request_id, p.unpack_map(message.body[0]), framing)
    return p.client_reply(message.command == p.C_FINAL, message.service, message.request_id, message.body, framing)


# Each builder in every framing with what all of them can say (7/MDP: one reply, no extensions), and in 18/MDP
# framing with everything.
_valid = st.one_of(
    st.builds(p.client_request, services, bodies, st.none(), st.none(), client_framings),
    st.builds(p.client_request, services, bodies, st.one_of(st.none(), request_ids), hints, mdp02_framings),
    st.builds(p.client_cancel, request_ids, mdp02_framings),
    st.builds(p.client_credit, request_ids, credits, mdp02_framings),
    st.builds(p.ready, services, st.none(), worker_framings),
    st.builds(p.ready, services, st.one_of(st.none(), maps), mdp02_framings),
    st.builds(p.worker_reply, st.just(True), route_keys, bodies, worker_framings),
    st.builds(p.worker_reply, st.booleans(), route_keys, bodies, mdp02_framings),
    st.builds(p.heartbeat, st.none(), worker_framings),
    st.builds(p.heartbeat, st.one_of(st.none(), maps), mdp02_framings),
    st.builds(p.heartbeat, st.builds(lambda epoch: {"epoch": epoch}, st.integers(0, 2**40)), mdp02_framings),
    st.builds(p.attach, st.binary(min_size=1, max_size=p.MAX_STREAM_ID_LEN)),
    st.builds(p.disconnect, st.none(), worker_framings),
    st.builds(p.disconnect, refusals, mdp02_framings),
    st.builds(p.worker_request, route_keys, bodies, worker_framings),
    st.builds(p.worker_cancel, route_keys, mdp02_framings),
    st.builds(p.worker_credit, route_keys, credits, mdp02_framings),
    st.builds(p.client_reply, st.just(True), services, st.none(), bodies, client_framings),
    st.builds(p.client_reply, st.booleans(), services, st.one_of(st.none(), request_ids), bodies, mdp02_framings),
    st.builds(p.client_status, services, request_ids, maps, mdp02_framings),
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


_ALL_CLIENT_FRAMINGS = [p.Framing(dialect, delimited) for dialect in p.Dialect for delimited in (False, True)]
_ALL_WORKER_FRAMINGS = [f for f in _ALL_CLIENT_FRAMINGS if f.dialect is not p.Dialect.MAJORTOMO]


@settings(max_examples=3000)
@given(frames=_anything, extended=st.booleans())
def test_parsers_accept_only_what_builders_make(frames: list[bytes], extended: bool) -> None:
    parsers: list[tuple[Parse, Rebuild]] = [(p.parse_inbound, _rebuild_inbound)]
    for framing in _ALL_WORKER_FRAMINGS:
        parsers.append(
            (lambda f, framing=framing: p.parse_for_worker(f, framing), lambda m, g=framing: _rebuild_for_worker(m, g))
        )
    for framing in _ALL_CLIENT_FRAMINGS:
        parsers.append(
            (
                lambda f, framing=framing: p.parse_for_client(f, extended, framing),
                lambda m, g=framing: _rebuild_for_client(m, g),
            )
        )
    _assert_only_builders_make(frames, parsers)


def _assert_only_builders_make(frames: list[bytes], parsers: Iterable[tuple[Parse, Rebuild]]) -> None:
    """Each parser refuses ``frames`` with ProtocolError, or parses them to a message that builds them again."""
    for parse, rebuild in parsers:
        try:
            message = parse(frames)
        except p.ProtocolError:
            continue  # the one way a parser says no
        assert _same_frames(rebuild(message), frames), f"{frames!r} parsed to {message!r}, which no builder makes"


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


# ------------------------------------------------------------------------------------------------------- shards

names = st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=12)
devices = st.sampled_from(["CPU", "Vulkan0", "CUDA1"])
mibs = st.integers(1, 2**40 - 1)
hosts = st.one_of(
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,12}", fullmatch=True),
    st.from_regex(r"\[[0-9a-f:]{2,12}\]", fullmatch=True),
)
endpoints = st.builds(lambda host, port: f"{host}:{port}", hosts, st.integers(1, 65535))
curve_keys = st.text(st.sampled_from(sorted(p._Z85_CHARS)), min_size=p.CURVE_KEY_LEN, max_size=p.CURVE_KEY_LEN)
offers = st.builds(p.ShardOffer, names, names, devices, mibs, endpoints, st.booleans())
asks = st.builds(
    p.ShardAsk, names, services, mibs, st.integers(0, p.MAX_SHARDS), st.lists(names, max_size=3).map(tuple)
)
places = st.builds(p.ShardPlace, names, names, devices, endpoints, st.booleans(), curve_keys, mibs) | st.builds(
    p.ShardPlace, names, names, devices, endpoints, st.just(False), st.none(), mibs
)
grants = st.lists(places, min_size=1, max_size=4).map(tuple)
assigns = st.builds(p.ShardAssign, names, st.one_of(st.none(), curve_keys))


@given(offer=offers, ask=asks)
def test_what_shard_peers_send(offer: p.ShardOffer, ask: p.ShardAsk) -> None:
    assert p.parse_from_shard_peer(p.shard_ready(offer)) == offer
    assert p.parse_from_shard_peer(p.shard_request(ask)) == ask
    assert p.parse_from_shard_peer(p.heartbeat()) == p.WorkerHeartbeat()
    assert p.parse_from_shard_peer(p.disconnect()) == p.WorkerDisconnect()


@given(grant=grants, assign=assigns, lost=names, refusal=st.tuples(st.integers(100, 599), st.text(max_size=20)))
def test_what_shard_peers_receive(
    grant: tuple[p.ShardPlace, ...], assign: p.ShardAssign, lost: str, refusal: tuple[int, str]
) -> None:
    parse = p.parse_for_shard_peer
    assert parse(p.shard_grant(grant)) == p.ToShardPeer(p.W_SHARD_GRANT, grant=grant)
    assert parse(p.shard_refusal(*refusal)) == p.ToShardPeer(p.W_SHARD_GRANT, refusal=refusal)
    assert parse(p.shard_lost(lost)) == p.ToShardPeer(p.W_SHARD_LOST, lost=lost)
    assert parse(p.shard_assign(assign)) == p.ToShardPeer(p.W_SHARD_ASSIGN, assign=assign)
    assert parse(p.shard_release()) == p.ToShardPeer(p.W_SHARD_RELEASE)
    assert parse(p.heartbeat()) == p.ToShardPeer(p.W_HEARTBEAT)
    assert parse(p.disconnect(refusal)) == p.ToShardPeer(p.W_DISCONNECT, refusal=refusal)


@given(connection=st.integers(0, 2**32 - 1), data=st.binary(max_size=64))
def test_tunnel(connection: int, data: bytes) -> None:
    assert p.parse_tunnel(p.tunnel_frames(connection, data)) == (connection, data)


def test_an_endpoint_never_names_two_rpc_servers() -> None:
    """llama-server takes ``--rpc a:1,b:2``: a comma (or a space) in a host's endpoint would add a server."""
    fields = {"name": "n", "host": "h", "device": "CPU", "memory": 1, "bridged": False}
    assert p.parse_from_shard_peer([p.WORKER, p.W_SHARD_READY, p.pack({**fields, "endpoint": "[::1]:50052"})])
    for endpoint in ("a:1,b:2", "a,b:2", "a b:2", " a:1", "a:01", "a:0", "a:65536", "[]:1", "a:", ":1", "a:\uff11"):
        with pytest.raises(p.ProtocolError, match="host:port"):
            p.parse_from_shard_peer([p.WORKER, p.W_SHARD_READY, p.pack({**fields, "endpoint": endpoint})])


def _rebuild_from_shard_peer(message: Any) -> list[bytes]:
    if isinstance(message, p.ShardOffer):
        return p.shard_ready(message)
    if isinstance(message, p.ShardAsk):
        return p.shard_request(message)
    return p.heartbeat() if isinstance(message, p.WorkerHeartbeat) else p.disconnect()


def _rebuild_for_shard_peer(message: p.ToShardPeer) -> list[bytes]:
    if message.command == p.W_SHARD_GRANT:
        return p.shard_refusal(*message.refusal) if message.refusal else p.shard_grant(message.grant)
    if message.command == p.W_SHARD_LOST:
        return p.shard_lost(message.lost)
    if message.command == p.W_SHARD_ASSIGN:
        assert message.assign is not None
        return p.shard_assign(message.assign)
    if message.command == p.W_SHARD_RELEASE:
        return p.shard_release()
    return p.heartbeat() if message.command == p.W_HEARTBEAT else p.disconnect(message.refusal)


_shard_valid = st.one_of(
    st.builds(p.shard_ready, offers),
    st.builds(p.shard_request, asks),
    st.builds(p.shard_grant, grants),
    st.builds(p.shard_refusal, st.integers(100, 599), st.text(max_size=9)),
    st.builds(p.shard_lost, names),
    st.builds(p.shard_assign, assigns),
    st.just(p.shard_release()),
    st.just(p.heartbeat()),
    st.builds(p.disconnect, refusals),
    st.builds(p.tunnel_frames, st.integers(0, 2**32 - 1), st.binary(max_size=9)),
)


def _field_edit(frames: list[bytes], index: int, key: str, value: Any) -> list[bytes]:
    """A near miss inside a msgpack frame (``frames[index]``): one field set to another value (or added)."""
    try:
        fields = p.unpack_map(frames[index])
    except (IndexError, p.ProtocolError):
        return frames
    return [*frames[:index], p.pack({**fields, key: value}), *frames[index + 1 :]]


_shard_anything = st.one_of(
    _shard_valid,
    st.builds(_edit, _shard_valid, _frame_edits),
    st.builds(
        _field_edit,
        _shard_valid,
        st.just(2),  # a shard command's one msgpack frame
        st.sampled_from(["name", "memory", "count", "endpoint", "bridged", "key", "exclude", "shards", "error", "x"]),
        st.one_of(plain_values, st.lists(plain_values, max_size=2), maps),
    ),
)


@settings(max_examples=2000)
@given(frames=_shard_anything)
def test_shard_parsers_accept_only_what_builders_make(frames: list[bytes]) -> None:
    parsers: list[tuple[Parse, Rebuild]] = [
        (p.parse_from_shard_peer, _rebuild_from_shard_peer),
        (p.parse_for_shard_peer, _rebuild_for_shard_peer),
        (p.parse_tunnel, lambda message: p.tunnel_frames(*message)),
    ]
    _assert_only_builders_make(frames, parsers)


# ------------------------------------------------------------------------------------------------ model transfers

transfer_ids = st.binary(min_size=1, max_size=p.MAX_REQUEST_ID_LEN)
read_keys = st.binary(min_size=1, max_size=16)
model_names = st.text(st.characters(codec="utf-8", categories=["L", "N", "P"]), min_size=1, max_size=20)
digests = st.text("0123456789abcdef", min_size=64, max_size=64)
model_infos = st.builds(p.ModelInfo, model_names, digests, st.integers(1, p.MAX_MODEL_BYTES))
offsets = st.integers(0, p.MAX_MODEL_BYTES - 1)
lengths = st.integers(1, p.MAX_CHUNK_BYTES)
chunk_data = st.binary(min_size=1, max_size=64)
errors = st.tuples(st.integers(100, 999), st.text(max_size=20))


@given(transfer_id=transfer_ids, name=model_names, sha256=st.one_of(st.none(), digests), model=model_infos)
def test_what_pullers_and_pushers_send(transfer_id: bytes, name: str, sha256: str | None, model: p.ModelInfo) -> None:
    assert p.parse_inbound(p.model_fetch(transfer_id, name, sha256)) == p.ModelFetch(transfer_id, name, sha256)
    assert p.parse_inbound(p.model_push(transfer_id, model)) == p.ModelPush(transfer_id, model)
    for outcome in p.TRANSFER_OUTCOMES:
        assert p.parse_inbound(p.transfer_end(transfer_id, outcome)) == p.TransferEnd(transfer_id, outcome)


@given(transfer_id=transfer_ids, offset=offsets, length=lengths, data=chunk_data)
def test_chunks_both_ways(transfer_id: bytes, offset: int, length: int, data: bytes) -> None:
    assert p.parse_inbound(p.chunk_request(transfer_id, offset, length)) == p.ChunkRequest(transfer_id, offset, length)
    assert p.parse_inbound(p.push_chunk(transfer_id, offset, data)) == p.PushChunk(transfer_id, offset, data)
    reply = p.parse_transfer_reply(p.model_data(transfer_id, offset, data))
    assert (reply.command, reply.transfer_id, reply.offset, reply.data) == (p.C_DATA, transfer_id, offset, data)
    reply = p.parse_transfer_reply(p.push_ack(transfer_id, offset))
    assert (reply.command, reply.offset) == (p.C_ACK, offset)


@given(
    transfer_id=transfer_ids,
    model=model_infos,
    chunk=st.integers(1, p.MAX_CHUNK_BYTES),
    window=st.integers(1, p.MAX_TRANSFER_WINDOW),
    error=errors,
    data=st.data(),
)
def test_what_the_broker_says_of_a_transfer(
    transfer_id: bytes, model: p.ModelInfo, chunk: int, window: int, error: tuple[int, str], data: st.DataObject
) -> None:
    offset = data.draw(st.integers(0, model.size))
    offer = p.parse_transfer_reply(p.model_offer(transfer_id, model, offset, chunk, window))
    assert offer == p.TransferReply(p.C_OFFER, transfer_id, model, offset, chunk, window)
    assert p.parse_transfer_reply(p.transfer_ended(transfer_id, error)) == p.TransferReply(
        p.C_ENDED, transfer_id, error=error
    )
    assert p.parse_transfer_reply(p.transfer_ended(transfer_id, None, model)) == p.TransferReply(
        p.C_ENDED, transfer_id, model=model
    )
    with pytest.raises(ValueError):
        p.transfer_ended(transfer_id, error, model)


@given(key=read_keys, sha256=digests, offset=offsets, length=lengths, data=chunk_data, error=errors)
def test_a_holder_reads_and_answers(
    key: bytes, sha256: str, offset: int, length: int, data: bytes, error: tuple[int, str]
) -> None:
    read = p.HolderRead(sha256, offset, length)
    assert p.parse_for_worker(p.holder_read(key, sha256, offset, length)) == p.BrokerToWorker(p.W_READ, key, read=read)
    assert p.parse_inbound(p.holder_data(key, offset, data)) == p.HolderData(key, offset, data)
    assert p.parse_inbound(p.holder_read_failed(key, *error)) == p.HolderReadFailed(key, *error)
    # the broker's store: the same frames, handed over in the broker's process
    assert p.parse_for_store(p.holder_read(key, sha256, offset, length)) == p.BrokerToWorker(p.W_READ, key, read=read)
    assert p.parse_store_reply(p.holder_data(key, offset, data)) == p.HolderData(key, offset, data)


@given(transfer_id=transfer_ids, model=model_infos, offset=offsets, data=chunk_data)
def test_what_the_store_takes_and_answers(transfer_id: bytes, model: p.ModelInfo, offset: int, data: bytes) -> None:
    assert p.parse_for_store(p.model_push(transfer_id, model)) == p.ModelPush(transfer_id, model)
    assert p.parse_for_store(p.push_chunk(transfer_id, offset, data)) == p.PushChunk(transfer_id, offset, data)
    assert p.parse_store_reply(p.push_ack(transfer_id, offset)).offset == offset
    assert p.parse_store_reply(p.transfer_ended(transfer_id, None, model)).model == model
    for wrong in (p.model_fetch(transfer_id, model.name), p.heartbeat()):
        with pytest.raises(p.ProtocolError):
            p.parse_for_store(wrong)
    for wrong in (p.model_data(transfer_id, offset, data), p.model_offer(transfer_id, model, 0, 1, 1)):
        with pytest.raises(p.ProtocolError):
            p.parse_store_reply(wrong)


def test_model_names_that_could_leave_a_folder_are_not_names() -> None:
    for good in ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1", "a", "x" * p.MAX_MODEL_NAME_LEN, "v1.2+rc_3"):
        assert p.model_name_problem(good) is None, good
    for bad in ("", "../x", "a/b", "a\\b", "..", ".x", "-x", "x..y", "x y", "x" * (p.MAX_MODEL_NAME_LEN + 1), "é"):
        assert p.model_name_problem(bad) is not None, bad
    assert p.is_sha256("ab" * 32) and not p.is_sha256("AB" * 32) and not p.is_sha256("ab" * 31)


def _rebuild_transfer(message: p.TransferMessage) -> list[bytes]:
    if isinstance(message, p.ModelFetch):
        return p.model_fetch(message.transfer_id, message.name, message.sha256)
    if isinstance(message, p.ChunkRequest):
        return p.chunk_request(message.transfer_id, message.offset, message.length)
    if isinstance(message, p.ModelPush):
        return p.model_push(message.transfer_id, message.model)
    if isinstance(message, p.PushChunk):
        return p.push_chunk(message.transfer_id, message.offset, message.data)
    if isinstance(message, p.TransferEnd):
        return p.transfer_end(message.transfer_id, message.outcome)
    if isinstance(message, p.HolderData):
        return p.holder_data(message.read_key, message.offset, message.data)
    return p.holder_read_failed(message.read_key, message.code, message.message)


def _rebuild_transfer_reply(reply: p.TransferReply) -> list[bytes]:
    if reply.command == p.C_OFFER:
        assert reply.model is not None
        return p.model_offer(reply.transfer_id, reply.model, reply.offset, reply.chunk, reply.window)
    if reply.command == p.C_DATA:
        return p.model_data(reply.transfer_id, reply.offset, reply.data)
    if reply.command == p.C_ACK:
        return p.push_ack(reply.transfer_id, reply.offset)
    return p.transfer_ended(reply.transfer_id, reply.error, reply.model)


def _rebuild_for_store(message: p.BrokerToWorker | p.TransferMessage) -> list[bytes]:
    if isinstance(message, p.BrokerToWorker):
        return _rebuild_for_worker(message, p.MDP02)
    return _rebuild_transfer(message)


def _rebuild_store_reply(reply: p.TransferReply | p.TransferMessage) -> list[bytes]:
    return _rebuild_transfer_reply(reply) if isinstance(reply, p.TransferReply) else _rebuild_transfer(reply)


_transfer_valid = st.one_of(
    st.builds(p.model_fetch, transfer_ids, model_names, st.one_of(st.none(), digests)),
    st.builds(p.chunk_request, transfer_ids, offsets, lengths),
    st.builds(p.model_push, transfer_ids, model_infos),
    st.builds(p.push_chunk, transfer_ids, offsets, chunk_data),
    st.builds(p.transfer_end, transfer_ids, st.sampled_from(sorted(p.TRANSFER_OUTCOMES))),
    st.builds(
        lambda t, m, c, w: p.model_offer(t, m, m.size // 2, c, w),
        transfer_ids,
        model_infos,
        lengths,
        st.integers(1, p.MAX_TRANSFER_WINDOW),
    ),
    st.builds(p.model_data, transfer_ids, offsets, chunk_data),
    st.builds(p.push_ack, transfer_ids, offsets),
    st.builds(p.transfer_ended, transfer_ids, errors),
    st.builds(p.transfer_ended, transfer_ids, st.none(), model_infos),
    st.builds(p.holder_read, read_keys, digests, offsets, lengths),
    st.builds(p.holder_data, read_keys, offsets, chunk_data),
    st.builds(p.holder_read_failed, read_keys, st.integers(100, 999), st.text(max_size=9)),
)


_transfer_anything = st.one_of(
    _transfer_valid,
    st.builds(_edit, _transfer_valid, _frame_edits),
    st.builds(
        _field_edit,
        _transfer_valid,
        st.just(3),  # a transfer command's msgpack frame
        st.sampled_from(["name", "sha256", "size", "offset", "chunk", "window", "outcome", "error", "x"]),
        st.one_of(plain_values, digests, maps),
    ),
)


@settings(max_examples=3000)
@given(frames=_transfer_anything)
def test_transfer_parsers_accept_only_what_builders_make(frames: list[bytes]) -> None:
    parsers: list[tuple[Parse, Rebuild]] = [
        (p.parse_inbound, _rebuild_inbound),
        (p.parse_for_worker, lambda message: _rebuild_for_worker(message, p.MDP02)),
        (p.parse_transfer_reply, _rebuild_transfer_reply),
        (p.parse_for_store, _rebuild_for_store),
        (p.parse_store_reply, _rebuild_store_reply),
    ]
    _assert_only_builders_make(frames, parsers)
