"""The QMesh wire format: 18/MDP (Majordomo 0.2) frames, QMesh's optional extensions, msgpack bodies.

This module is the only place that builds or parses frames. Everything else works with the message classes
below. ``docs/PROTOCOL.md`` is the specification; this is its implementation.

Frames as seen by the broker's ROUTER socket start with the peer's routing id; the functions here take and
return the frames *after* that id. QMesh's clients and workers use DEALER sockets, so there is no empty delimiter
frame (MDP 0.2).

The broker also accepts the Majordomo peers people actually have, and answers each in the framing it used (its
``Framing``): a leading empty frame on any command (REQ-compatible framing, as majortomo 0.2.0 and REQ clients
send), 7/MDP (MDP/0.1: ``MDPC01``/``MDPW01``, one REPLY instead of PARTIALs and a FINAL), and majortomo 0.2.0's
client, which frames MDPC02 with the worker's command codes and reads replies without a service frame.

Plain 18/MDP peers and QMesh peers share one socket. QMesh's extensions never change the meaning of a plain
MDP message:

* an extended client uses its own command codes (``XREQUEST``, ``CANCEL``) that carry a request id, and the
  replies to those requests carry the id as the first body frame; a plain ``REQUEST`` gets plain replies;
* an extended worker adds one optional msgpack frame to ``READY`` (capacity) and to ``HEARTBEAT`` (load), and
  understands ``CANCEL``; a plain worker sends neither and is never sent ``CANCEL``.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from qmesh.common.errors import QMeshError
from qmesh.common.prefix import HASH_BYTES as PREFIX_HASH_BYTES
from qmesh.common.prefix import MAX_BLOCKS as MAX_PREFIX_BLOCKS

CLIENT = b"MDPC02"
WORKER = b"MDPW02"
PAIR = b"QMPAIR1"  # the HA link between the brokers of a pair: state and epoch, each heartbeat
CLIENT_01 = b"MDPC01"  # 7/MDP (MDP/0.1), spoken by the zguide's Majordomo clients and workers
WORKER_01 = b"MDPW01"

# 18/MDP client commands
C_REQUEST = b"\x01"
C_PARTIAL = b"\x02"
C_FINAL = b"\x03"
# QMesh client extensions (never sent to or expected from a plain MDP client)
C_XREQUEST = b"\x11"  # client -> broker: service, request-id, body...
C_HINTED_REQUEST = b"\x16"  # client -> broker: service, request-id, msgpack routing hint, body...
C_STATUS = b"\x12"  # broker -> client: service, request-id, msgpack status (queued position, dispatched)
C_CANCEL = b"\x14"  # client -> broker: request-id
C_CREDIT = b"\x15"  # client -> broker: request-id, credit (4-byte big-endian chunk count)

# 18/MDP worker commands
W_READY = b"\x01"
W_REQUEST = b"\x02"
W_PARTIAL = b"\x03"
W_FINAL = b"\x04"
W_HEARTBEAT = b"\x05"
W_DISCONNECT = b"\x06"
# QMesh worker extension (broker -> extended worker only)
W_CANCEL = b"\x07"  # route-key
W_CREDIT = b"\x08"  # route-key, credit (4-byte big-endian chunk count)
W_ATTACH = b"\x09"  # worker -> broker: stream-id: a generation it kept running while it had no broker

# 7/MDP worker commands. Its client has no command frame: a REQUEST and its one REPLY are header, service, body.
W01_READY = b"\x01"
W01_REQUEST = b"\x02"
W01_REPLY = b"\x03"
W01_HEARTBEAT = b"\x04"
W01_DISCONNECT = b"\x05"

# majortomo 0.2.0's client sends MDPC02 with the worker's codes (a client's 0x02 is never a valid 18/MDP command)
MT_REQUEST = W_REQUEST
MT_PARTIAL = W_PARTIAL
MT_FINAL = W_FINAL

MMI_PREFIX = "mmi."

# Error codes with fixed meanings (docs/PROTOCOL.md, "Errors").
BAD_REQUEST = 400
FORBIDDEN = 403
UNKNOWN_MODEL = 404
CLIENT_STALLED = 408
TOO_LARGE = 413
TOO_MANY_REQUESTS = 429
CANCELLED = 499
WORKER_FAILED = 502
QUEUE_FULL = 503
QUEUE_TIMEOUT = 504
NOT_ACTIVE = 421  # this broker of a pair is passive: the other one serves (HTTP's "misdirected request")
# Seconds before a client or worker that just left a dead broker of a pair asks the other again after its 421: it
# takes over once it too sees its peer gone, which may be a moment later.
PASSIVE_RETRY = 0.25

MAX_SERVICE_LEN = 255
MAX_REQUEST_ID_LEN = 64
MAX_SESSION_LEN = 128
MAX_STREAM_ID_LEN = MAX_REQUEST_ID_LEN  # a stream is named by the request id its client gave it
MAX_BODY_BYTES = 8 * 1024 * 1024  # also the sockets' MAXMSGSIZE
MAX_HINT_BYTES = PREFIX_HASH_BYTES * MAX_PREFIX_BLOCKS
MAX_CAPABILITY_LEN = 32

# What a worker can do (READY's ``capabilities``) and a request needs (its hint's ``capability``). A worker that
# announces nothing, and a request that names nothing, mean CHAT: plain MDP peers and older QMesh peers.
CHAT = "chat"
EMBEDDINGS = "embeddings"


class ProtocolError(QMeshError):
    """A message that does not follow the protocol. The receiver drops it (and logs the reason)."""


# ---------------------------------------------------------------------------------------------- msgpack codec

_local = threading.local()


def pack(obj: Any) -> bytes:
    """Encode a body with a reused, per-thread msgpack Packer."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(obj)


# Limits on what a body may decode to, so hostile input costs at most its own size.
_UNPACK_LIMITS: dict[str, Any] = {
    "raw": False,
    "strict_map_key": True,
    "max_str_len": MAX_BODY_BYTES,
    "max_bin_len": MAX_BODY_BYTES,
    "max_array_len": 1_000_000,
    "max_map_len": 10_000,
    "max_ext_len": 0,
}


def unpack(data: bytes) -> Any:
    """Decode a body from the network with limits, so hostile input costs at most its own size."""
    try:
        return msgpack.unpackb(data, **_UNPACK_LIMITS)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # the kinds msgpack raises for bad input
        raise ProtocolError(f"body is not valid msgpack: {exc}") from exc


def unpack_stream(data: bytes | bytearray) -> list[Any]:
    """Decode back-to-back msgpack objects (bodies kept concatenated), with the limits of ``unpack``."""
    unpacker = msgpack.Unpacker(max_buffer_size=max(len(data), 1), **_UNPACK_LIMITS)
    try:
        unpacker.feed(data)
        objects, end = [], 0
        while end < len(data):
            objects.append(unpacker.unpack())  # msgpack.OutOfData if the last object is cut short
            end = unpacker.tell()
        return objects
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"bodies are not valid msgpack: {exc}") from exc


def unpack_map(data: bytes) -> dict[str, Any]:
    obj = unpack(data)
    if not isinstance(obj, dict):
        raise ProtocolError(f"body must be a msgpack map, got {type(obj).__name__}")
    return obj


def not_active_body(epoch: int, message: str) -> bytes:
    """A passive broker's answer to a client (a 421 error FINAL): the epoch it knows lets the client tell a broker
    that woke from a freeze (an older epoch) from the one it should follow."""
    return pack({"error": {"code": NOT_ACTIVE, "message": message, "epoch": epoch}})


def error_body(code: int, message: str, param: str | None = None) -> bytes:
    """Body of an error FINAL: ``{"error": {"code": int, "message": str}}``, with ``param`` naming the part of the
    request at fault when one is (``"model"``: the model does not serve this kind of request)."""
    error: dict[str, Any] = {"code": code, "message": message}
    if param is not None:
        error["param"] = param
    return pack({"error": error})


def _error(frame: bytes) -> tuple[int, str]:
    """An error body, ``{"error": {"code": int, "message": str}}``, exactly."""
    fields = unpack_map(frame)
    error = fields.get("error")
    if set(fields) != {"error"} or not isinstance(error, dict) or set(error) != {"code", "message"}:
        raise ProtocolError("an error body is {'error': {'code', 'message'}}")
    if not _count(error["code"], 100, 999) or not isinstance(error["message"], str):
        raise ProtocolError("an error has a code from 100 to 999 and a message")
    return error["code"], error["message"]


def _count(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


# ------------------------------------------------------------------------------------------------ framings


class Dialect(enum.Enum):
    MDP02 = "18/MDP"  # MDP/0.2 as RFC 18 has it, and QMesh's extensions
    MAJORTOMO = "majortomo"  # clients only: MDPC02 with the worker's command codes, replies without the service
    MDP01 = "7/MDP"  # MDP/0.1: a client gets one REPLY, a worker sends one


@dataclass(slots=True, frozen=True)
class Framing:
    """How a peer frames its commands, and so how the broker frames what it sends that peer."""

    dialect: Dialect = Dialect.MDP02
    delimited: bool = False  # a leading empty frame on every command (REQ-compatible framing)


# The members under plain names for the checks made per message: reading a member off the Enum class costs about
# 60 ns on CPython 3.11, as much as the rest of such a check.
_18MDP, _MAJORTOMO, _7MDP = Dialect.MDP02, Dialect.MAJORTOMO, Dialect.MDP01
MDP02 = Framing()
# Each dialect's framings without and with the leading empty frame, indexed by ``delimited``: parsing a message
# allocates and hashes nothing.
_18MDP_FRAMINGS = (MDP02, Framing(_18MDP, True))
_MAJORTOMO_FRAMINGS = (Framing(_MAJORTOMO), Framing(_MAJORTOMO, True))
_7MDP_FRAMINGS = (Framing(_7MDP), Framing(_7MDP, True))


def _framed(framing: Framing, frames: list[bytes]) -> list[bytes]:
    return [b"", *frames] if framing.delimited else frames


def _only_in_18mdp(framing: Framing, what: str) -> ValueError:
    return ValueError(f"{what} exists only in 18/MDP framing, not in {framing.dialect.value}")


# ------------------------------------------------------------------------------------------------ messages


@dataclass(slots=True, frozen=True)
class RoutingHint:
    """Where a request would best run: the chained hashes of its conversation's prefix blocks
    (``common.prefix``), the session it belongs to, if the client names one, and what it needs of a worker
    (``capability``; None: CHAT). ``stream`` names the generation (its client's request id) and ``attach`` says the
    client sends it again after losing its broker: a worker may still be generating it (``W_ATTACH``)."""

    prefix: bytes = b""
    session: str | None = None
    capability: str | None = None
    stream: bytes | None = None
    attach: bool = False

    @property
    def empty(self) -> bool:
        return not self.prefix and self.session is None and self.capability is None and self.stream is None


def is_capability(value: Any) -> bool:
    """A capability's name, as READY announces it and a hint asks for it: 1-32 printable characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_CAPABILITY_LEN and value.isprintable()


@dataclass(slots=True)
class ClientRequest:
    """A request from a client. ``request_id`` is None for a plain MDP ``REQUEST``."""

    service: str
    request_id: bytes | None
    body: list[bytes]
    hint: RoutingHint | None = None
    framing: Framing = MDP02


@dataclass(slots=True)
class ClientCancel:
    request_id: bytes
    framing: Framing = MDP02


@dataclass(slots=True)
class ClientCredit:
    request_id: bytes
    credit: int
    framing: Framing = MDP02


@dataclass(slots=True)
class WorkerReady:
    service: str
    info: dict[str, Any] = field(default_factory=dict)  # empty for a plain MDP worker
    framing: Framing = MDP02

    @property
    def extended(self) -> bool:
        return bool(self.info)


@dataclass(slots=True)
class WorkerPartial:
    route_key: bytes
    body: list[bytes]
    framing: Framing = MDP02


@dataclass(slots=True)
class WorkerFinal:
    """A FINAL, or a 7/MDP worker's REPLY."""

    route_key: bytes
    body: list[bytes]
    framing: Framing = MDP02


@dataclass(slots=True)
class WorkerHeartbeat:
    load: dict[str, Any] = field(default_factory=dict)
    framing: Framing = MDP02


@dataclass(slots=True)
class WorkerDisconnect:
    framing: Framing = MDP02


@dataclass(slots=True)
class WorkerAttach:
    """A generation the worker kept running while it had no broker, offered to the new one by its stream id."""

    stream: bytes
    framing: Framing = MDP02


# Model transfers (section 12 of docs/PROTOCOL.md): what a puller, a pusher and a holder send the broker.


@dataclass(slots=True, frozen=True)
class ModelInfo:
    """A model file as the mesh knows it: by name, and by content (its sha256, hex) and size in bytes."""

    name: str
    sha256: str
    size: int


@dataclass(slots=True, frozen=True)
class ModelFetch:
    """A puller asks for a model by name (and, optionally, for exactly this content)."""

    transfer_id: bytes
    name: str
    sha256: str | None = None


@dataclass(slots=True, frozen=True)
class ChunkRequest:
    """A puller asks for ``length`` bytes of its transfer's model from ``offset``: one unit of its credit."""

    transfer_id: bytes
    offset: int
    length: int


@dataclass(slots=True, frozen=True)
class ModelPush:
    """A client offers a model for the broker's store."""

    transfer_id: bytes
    model: ModelInfo


@dataclass(slots=True, frozen=True)
class PushChunk:
    transfer_id: bytes
    offset: int
    data: bytes


@dataclass(slots=True, frozen=True)
class TransferEnd:
    """A puller or pusher ends its transfer: ``outcome`` is one of TRANSFER_OUTCOMES."""

    transfer_id: bytes
    outcome: str


@dataclass(slots=True, frozen=True)
class HolderData:
    """A holder's answer to READ: the bytes of the range it was asked for."""

    read_key: bytes
    offset: int
    data: bytes


@dataclass(slots=True, frozen=True)
class HolderReadFailed:
    read_key: bytes
    code: int
    message: str


@dataclass(slots=True, frozen=True)
class HolderRead:
    """What READ asks a holder for: ``length`` bytes from ``offset`` of the file whose sha256 this is."""

    sha256: str
    offset: int
    length: int


TransferMessage = ModelFetch | ChunkRequest | ModelPush | PushChunk | TransferEnd | HolderData | HolderReadFailed


ClientMessage = ClientRequest | ClientCancel | ClientCredit
WorkerMessage = WorkerReady | WorkerPartial | WorkerFinal | WorkerHeartbeat | WorkerDisconnect | WorkerAttach
InboundMessage = ClientMessage | WorkerMessage | TransferMessage


def _service(frame: bytes) -> str:
    if not frame or len(frame) > MAX_SERVICE_LEN:
        raise ProtocolError(f"service name must be 1-{MAX_SERVICE_LEN} bytes")
    try:
        name = frame.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("service name is not UTF-8") from exc
    if not name.isprintable():
        raise ProtocolError("service name has control characters")
    return name


def _request_id(frame: bytes) -> bytes:
    if not frame or len(frame) > MAX_REQUEST_ID_LEN:
        raise ProtocolError(f"request id must be 1-{MAX_REQUEST_ID_LEN} bytes")
    return frame


def _credit(frame: bytes) -> int:
    if len(frame) != 4:
        raise ProtocolError("credit must be a 4-byte big-endian count")
    return int.from_bytes(frame, "big")


def _hint(frame: bytes) -> RoutingHint:
    fields = unpack_map(frame)
    if not fields or set(fields) - {"prefix", "session", "capability", "stream", "attach"}:
        raise ProtocolError("a routing hint has 'prefix', 'session', 'capability', 'stream', 'attach' and nothing else")
    prefix, session, capability = fields.get("prefix", b""), fields.get("session"), fields.get("capability")
    if not isinstance(prefix, bytes) or len(prefix) % PREFIX_HASH_BYTES or len(prefix) > MAX_HINT_BYTES:
        raise ProtocolError(f"a hint's prefix is up to {MAX_HINT_BYTES} bytes of {PREFIX_HASH_BYTES}-byte hashes")
    if session is not None and (
        not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_LEN or not session.isprintable()
    ):
        raise ProtocolError(f"a hint's session is 1-{MAX_SESSION_LEN} printable characters")
    if capability is not None and not is_capability(capability):
        raise ProtocolError(f"a hint's capability is 1-{MAX_CAPABILITY_LEN} printable characters")
    stream, attach = fields.get("stream"), fields.get("attach", False)
    if stream is not None and (not isinstance(stream, bytes) or not 0 < len(stream) <= MAX_STREAM_ID_LEN):
        raise ProtocolError(f"a hint's stream is 1-{MAX_STREAM_ID_LEN} bytes")
    if attach is not True and "attach" in fields or attach and stream is None:
        raise ProtocolError("a hint's attach is true, with a stream, or absent")
    hint = RoutingHint(prefix, session, capability, stream, attach)
    if hint.empty:
        raise ProtocolError("an empty routing hint")
    return hint


def _reply_envelope(frames: list[bytes], command: str) -> tuple[bytes, list[bytes]]:
    if len(frames) < 4 or frames[3] != b"":
        raise ProtocolError(f"worker {command} needs route key, empty frame and body")
    if not frames[2]:
        raise ProtocolError(f"worker {command} has an empty route key")
    return frames[2], frames[4:]


def parse_inbound(frames: list[bytes]) -> InboundMessage:
    """Parse what a client or worker sent the broker (frames after the routing id), in any framing it accepts.

    Raises ProtocolError for anything malformed; never any other exception.
    """
    delimited = False
    if frames and not frames[0]:  # never a header, so a leading empty frame is unambiguous
        delimited, frames = True, frames[1:]
    if len(frames) < 2:
        raise ProtocolError(f"too few frames ({len(frames)})")
    header, command = frames[0], frames[1]
    if header == CLIENT:
        framing = _18MDP_FRAMINGS[delimited]
        if command == C_REQUEST:
            if len(frames) < 3:
                raise ProtocolError("REQUEST without service frame")
            return ClientRequest(_service(frames[2]), None, frames[3:], None, framing)
        if command == C_XREQUEST:
            if len(frames) < 4:
                raise ProtocolError("XREQUEST needs service and request id frames")
            return ClientRequest(_service(frames[2]), _request_id(frames[3]), frames[4:], None, framing)
        if command == C_HINTED_REQUEST:
            if len(frames) < 5:
                raise ProtocolError("a hinted request needs service, request id and hint frames")
            hint = _hint(frames[4])
            return ClientRequest(_service(frames[2]), _request_id(frames[3]), frames[5:], hint, framing)
        if command == C_CANCEL:
            if len(frames) != 3:
                raise ProtocolError("CANCEL takes exactly one request id frame")
            return ClientCancel(_request_id(frames[2]), framing)
        if command == C_CREDIT:
            if len(frames) != 4:
                raise ProtocolError("CREDIT takes a request id and a credit frame")
            return ClientCredit(_request_id(frames[2]), _credit(frames[3]), framing)
        if command == MT_REQUEST:
            if len(frames) < 3:
                raise ProtocolError("REQUEST without service frame")
            return ClientRequest(_service(frames[2]), None, frames[3:], None, _MAJORTOMO_FRAMINGS[delimited])
        if command in _FROM_PULLER:
            return _transfer_from_client(command, frames[2:], delimited)
        raise ProtocolError(f"unknown client command {command!r}")
    if header == WORKER:
        framing = _18MDP_FRAMINGS[delimited]
        if command == W_READY:
            if len(frames) not in (3, 4):
                raise ProtocolError("READY takes a service frame and an optional info frame")
            info = unpack_map(frames[3]) if len(frames) == 4 else {}
            return WorkerReady(_service(frames[2]), info, framing)
        if command == W_PARTIAL:
            return WorkerPartial(*_reply_envelope(frames, "PARTIAL"), framing)
        if command == W_FINAL:
            return WorkerFinal(*_reply_envelope(frames, "FINAL"), framing)
        if command == W_HEARTBEAT:
            if len(frames) > 3:
                raise ProtocolError("HEARTBEAT takes at most one load frame")
            return WorkerHeartbeat(unpack_map(frames[2]) if len(frames) == 3 else {}, framing)
        if command == W_DISCONNECT:
            if len(frames) != 2:
                raise ProtocolError("DISCONNECT from a worker takes no frames")
            return WorkerDisconnect(framing)
        if command == W_ATTACH:
            if delimited:  # a QMesh worker's command, and QMesh workers never send the empty frame
                raise ProtocolError("ATTACH comes without a leading empty frame")
            if len(frames) != 3 or not 0 < len(frames[2]) <= MAX_STREAM_ID_LEN:
                raise ProtocolError(f"ATTACH takes one stream id frame of 1-{MAX_STREAM_ID_LEN} bytes")
            return WorkerAttach(frames[2], framing)
        if command in _FROM_HOLDER:
            return _transfer_from_holder(command, frames[2:], delimited)
        raise ProtocolError(f"unknown worker command {command!r}")
    if header == CLIENT_01:  # 7/MDP: no command frame, the service comes second
        return ClientRequest(_service(command), None, frames[2:], None, _7MDP_FRAMINGS[delimited])
    if header == WORKER_01:
        framing = _7MDP_FRAMINGS[delimited]
        if command == W01_READY:
            if len(frames) != 3:
                raise ProtocolError("a 7/MDP READY takes one service frame")
            return WorkerReady(_service(frames[2]), {}, framing)
        if command == W01_REPLY:
            return WorkerFinal(*_reply_envelope(frames, "REPLY"), framing)
        if command in (W01_HEARTBEAT, W01_DISCONNECT):
            if len(frames) != 2:
                raise ProtocolError("a 7/MDP HEARTBEAT or DISCONNECT takes no frames")
            return WorkerHeartbeat({}, framing) if command == W01_HEARTBEAT else WorkerDisconnect(framing)
        raise ProtocolError(f"unknown 7/MDP worker command {command!r}")
    raise ProtocolError(f"unknown header {header[:16]!r}")


# ------------------------------------------------------------------------------------- builders: broker side


def client_reply(
    final: bool, service: str, request_id: bytes | None, body: list[bytes], framing: Framing = MDP02
) -> list[bytes]:
    """PARTIAL or FINAL to a client; an extended request's id leads the body. A 7/MDP client has only a REPLY,
    which the broker sends for the FINAL (with the PARTIAL bodies it held back); majortomo's names no service."""
    dialect = framing.dialect
    if dialect is _18MDP:
        frames = [CLIENT, C_FINAL if final else C_PARTIAL, service.encode()]
        if request_id is not None:
            frames.append(request_id)
    elif request_id is not None:
        raise _only_in_18mdp(framing, "a request id")
    elif dialect is _MAJORTOMO:
        frames = [CLIENT, MT_FINAL if final else MT_PARTIAL]
    elif final:
        frames = [CLIENT_01, service.encode()]
    else:
        raise ValueError("7/MDP has no PARTIAL: a client gets one REPLY")
    frames.extend(body)
    return [b"", *frames] if framing.delimited else frames


def client_status(service: str, request_id: bytes, status: dict[str, Any], framing: Framing = MDP02) -> list[bytes]:
    if framing.dialect is not _18MDP:
        raise _only_in_18mdp(framing, "STATUS")
    frames = [CLIENT, C_STATUS, service.encode(), request_id, pack(status)]
    return [b"", *frames] if framing.delimited else frames


def _worker_header(framing: Framing) -> bytes:
    if framing.dialect is _MAJORTOMO:
        raise ValueError("majortomo's framing is a client's")
    return WORKER_01 if framing.dialect is _7MDP else WORKER


def worker_request(route_key: bytes, body: list[bytes], framing: Framing = MDP02) -> list[bytes]:
    dialect = framing.dialect
    if dialect is _MAJORTOMO:
        raise ValueError("majortomo's framing is a client's")
    frames = [WORKER_01 if dialect is _7MDP else WORKER, W_REQUEST, route_key, b"", *body]  # 0x02 in both versions
    return [b"", *frames] if framing.delimited else frames


def worker_cancel(route_key: bytes, framing: Framing = MDP02) -> list[bytes]:
    if framing.dialect is not _18MDP:
        raise _only_in_18mdp(framing, "CANCEL")
    frames = [WORKER, W_CANCEL, route_key]
    return [b"", *frames] if framing.delimited else frames


def worker_credit(route_key: bytes, credit: int, framing: Framing = MDP02) -> list[bytes]:
    if framing.dialect is not _18MDP:
        raise _only_in_18mdp(framing, "CREDIT")
    frames = [WORKER, W_CREDIT, route_key, credit.to_bytes(4, "big")]
    return [b"", *frames] if framing.delimited else frames


def heartbeat(load: dict[str, Any] | None = None, framing: Framing = MDP02) -> list[bytes]:
    if framing.dialect is _7MDP:
        if load:
            raise ValueError("a 7/MDP HEARTBEAT carries no load")
        return _framed(framing, [WORKER_01, W01_HEARTBEAT])
    frames = [_worker_header(framing), W_HEARTBEAT]
    if load:
        frames.append(pack(load))
    return _framed(framing, frames)


def disconnect(refusal: tuple[int, str] | None = None, framing: Framing = MDP02) -> list[bytes]:
    """DISCONNECT; to an extended worker the broker may add why it refused it (an error body), so that the
    worker can stop with that reason instead of registering again and again."""
    if framing.dialect is _7MDP:
        if refusal is not None:
            raise ValueError("a 7/MDP DISCONNECT carries no reason")
        return _framed(framing, [WORKER_01, W01_DISCONNECT])
    frames = [_worker_header(framing), W_DISCONNECT]
    if refusal is not None:
        frames.append(error_body(*refusal))
    return _framed(framing, frames)


# ------------------------------------------------------------------------------------- builders: peer side


def attach(stream: bytes) -> list[bytes]:
    return [WORKER, W_ATTACH, stream]


def ready(service: str, info: dict[str, Any] | None = None, framing: Framing = MDP02) -> list[bytes]:
    if framing.dialect is _7MDP and info:
        raise ValueError("a 7/MDP READY carries no info")
    frames = [_worker_header(framing), W_READY, service.encode()]  # READY is 0x01 in both versions
    if info:
        frames.append(pack(info))
    return _framed(framing, frames)


def worker_reply(final: bool, route_key: bytes, body: list[bytes], framing: Framing = MDP02) -> list[bytes]:
    """PARTIAL or FINAL; a 7/MDP worker's one REPLY stands for its FINAL."""
    dialect = framing.dialect
    if dialect is _18MDP:  # a QMesh worker's PARTIAL for each token
        frames = [WORKER, W_FINAL if final else W_PARTIAL, route_key, b"", *body]
    elif dialect is _7MDP and final:
        frames = [WORKER_01, W01_REPLY, route_key, b"", *body]
    elif dialect is _7MDP:
        raise ValueError("7/MDP has no PARTIAL: a worker sends one REPLY")
    else:
        raise ValueError("majortomo's framing is a client's")
    return [b"", *frames] if framing.delimited else frames


def client_request(
    service: str,
    body: list[bytes],
    request_id: bytes | None = None,
    hint: RoutingHint | None = None,
    framing: Framing = MDP02,
) -> list[bytes]:
    """REQUEST (no id), XREQUEST (an id) or, with a routing hint that says anything, a hinted request."""
    if request_id is not None and framing.dialect is not _18MDP:
        raise _only_in_18mdp(framing, "a request id")
    if framing.dialect is _7MDP:
        return _framed(framing, [CLIENT_01, service.encode(), *body])
    if request_id is None:
        command = MT_REQUEST if framing.dialect is _MAJORTOMO else C_REQUEST
        return _framed(framing, [CLIENT, command, service.encode(), *body])
    if hint is None or hint.empty:
        return _framed(framing, [CLIENT, C_XREQUEST, service.encode(), request_id, *body])
    fields: dict[str, Any] = {"prefix": hint.prefix} if hint.prefix else {}
    if hint.session is not None:
        fields["session"] = hint.session
    if hint.capability is not None:
        fields["capability"] = hint.capability
    if hint.stream is not None:
        fields["stream"] = hint.stream
        if hint.attach:
            fields["attach"] = True
    return _framed(framing, [CLIENT, C_HINTED_REQUEST, service.encode(), request_id, pack(fields), *body])


def client_cancel(request_id: bytes, framing: Framing = MDP02) -> list[bytes]:
    if framing.dialect is not _18MDP:
        raise _only_in_18mdp(framing, "CANCEL")
    return _framed(framing, [CLIENT, C_CANCEL, request_id])


def client_credit(request_id: bytes, credit: int, framing: Framing = MDP02) -> list[bytes]:
    if framing.dialect is not _18MDP:
        raise _only_in_18mdp(framing, "CREDIT")
    frames = [CLIENT, C_CREDIT, request_id, credit.to_bytes(4, "big")]
    return [b"", *frames] if framing.delimited else frames


# ------------------------------------------------------------------------------------------------- shards
#
# Models bigger than one machine (docs/PROTOCOL.md, section 11). A shard host offers the memory of a llama.cpp
# rpc-server; a split worker asks the broker for some and runs its llama-server over them. Each speaks to the
# broker on a DEALER of its own, in MDPW02 framing (never delimited, never 7/MDP) with the commands below, and with
# the workers' HEARTBEAT (both ways; a shard peer's carries no load) and DISCONNECT. The codes sit far above the
# worker commands so that extensions of those never collide with them.

W_SHARD_READY = b"\x21"  # shard host -> broker: msgpack offer
W_SHARD_REQUEST = b"\x22"  # split worker -> broker: msgpack ask
W_SHARD_GRANT = b"\x23"  # broker -> split worker: msgpack grant, or an error body
W_SHARD_LOST = b"\x24"  # broker -> split worker: msgpack {"name"}: a host of its grant is gone
W_SHARD_ASSIGN = b"\x25"  # broker -> shard host: msgpack {"worker", "key"}: who may use it now
W_SHARD_RELEASE = b"\x26"  # broker -> shard host: its worker let it go (it restarts rpc-server, registers again)
MAX_SHARD_NAME_LEN = 255
MAX_SHARDS = 64  # hosts in one grant, and names in an ask's exclude
CURVE_KEY_LEN = 40  # a z85 CURVE public key
_ALNUM = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HOST_CHARS = frozenset(_ALNUM + ".-")  # a host name or an IPv4 address
_IPV6_CHARS = frozenset("0123456789abcdefABCDEF:.")
_Z85_CHARS = frozenset(_ALNUM + ".-:+=^!/*?&<>()[]{}@%$#")


def is_shard_hello(frames: list[bytes]) -> bool:
    """Whether a message is a shard peer's first (a shard host's offer, a split worker's ask): its registry's."""
    return len(frames) > 1 and frames[0] == WORKER and frames[1] in (W_SHARD_READY, W_SHARD_REQUEST)


@dataclass(slots=True, frozen=True)
class ShardOffer:
    """A shard host's READY: what it offers and where a split worker reaches it. ``endpoint`` (``host:port``) is
    its rpc-server itself, or, ``bridged``, its end of the CURVE bridge (common/tunnel.py), whose key is the one the
    host authenticated with at the broker."""

    name: str  # the shard host, unique in the mesh ("machine/pid")
    host: str  # its machine
    device: str  # what its rpc-server computes on ("CPU", "Vulkan0")
    memory: int  # MiB it offers
    endpoint: str
    bridged: bool


@dataclass(slots=True, frozen=True)
class ShardAsk:
    """A split worker's request for shard hosts: ``count`` of them (0: as few as fit) with ``memory`` MiB together
    for ``model``, none of those named in ``exclude`` (hosts it found it could not reach)."""

    name: str  # the split worker
    model: str
    memory: int
    count: int
    exclude: tuple[str, ...] = ()


@dataclass(slots=True, frozen=True)
class ShardPlace:
    """One host of a grant: where to reach it, its key when ``bridged``, and the MiB of the model put on it."""

    name: str
    host: str
    device: str
    endpoint: str
    bridged: bool
    key: str | None
    memory: int


@dataclass(slots=True, frozen=True)
class ShardAssign:
    """To a shard host: the split worker that holds it now, and that worker's CURVE key (None without CURVE): the
    only key its bridge admits."""

    worker: str
    key: str | None


@dataclass(slots=True)
class ToShardPeer:
    """What the broker sent a shard host or a split worker."""

    command: bytes  # W_HEARTBEAT, W_DISCONNECT, W_SHARD_GRANT, W_SHARD_LOST, W_SHARD_ASSIGN or W_SHARD_RELEASE
    grant: tuple[ShardPlace, ...] = ()
    refusal: tuple[int, str] | None = None  # a DISCONNECT's reason, or a GRANT that is an error body
    lost: str = ""
    assign: ShardAssign | None = None


def _name(value: Any, what: str, limit: int = MAX_SHARD_NAME_LEN) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit or not value.isprintable():
        raise ProtocolError(f"{what} must be 1-{limit} printable characters")
    return value


def _mib(value: Any, what: str) -> int:
    if not _count(value, 1, 2**40 - 1):
        raise ProtocolError(f"{what} must be a positive number of MiB")
    return value


def _host_port(value: Any) -> str:
    """``host:port`` (a name or IPv4 address, or an IPv6 address in brackets), as llama-server's ``--rpc`` list
    takes it: nothing that could add a second server to that list."""
    text = _name(value, "a shard endpoint")
    host, _, port = text.rpartition(":")
    bracketed = len(host) > 2 and host[0] == "[" and host[-1] == "]" and set(host[1:-1]) <= _IPV6_CHARS
    named = host[:1].isalnum() and set(host) <= _HOST_CHARS
    numeric = port.isascii() and port.isdigit() and str(int(port)) == port
    if not (bracketed or named) or not numeric or not 0 < int(port) < 65536:
        raise ProtocolError(f"a shard endpoint is host:port, got {text!r}")
    return text


def _curve_key(value: Any) -> str:
    if not isinstance(value, str) or len(value) != CURVE_KEY_LEN or not set(value) <= _Z85_CHARS:
        raise ProtocolError(f"a CURVE key is {CURVE_KEY_LEN} z85 characters")
    return value


def _fields(frame: bytes, required: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    fields = unpack_map(frame)
    if not required <= fields.keys() <= required | optional:
        raise ProtocolError(f"expected the fields {sorted(required)}, maybe {sorted(optional)}; got {sorted(fields)}")
    return fields


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{what} must be true or false")
    return value


def shard_ready(offer: ShardOffer) -> list[bytes]:
    fields = {
        "name": offer.name,
        "host": offer.host,
        "device": offer.device,
        "memory": offer.memory,
        "endpoint": offer.endpoint,
        "bridged": offer.bridged,
    }
    return [WORKER, W_SHARD_READY, pack(fields)]


def shard_request(ask: ShardAsk) -> list[bytes]:
    fields: dict[str, Any] = {"name": ask.name, "model": ask.model, "memory": ask.memory, "count": ask.count}
    if ask.exclude:
        fields["exclude"] = list(ask.exclude)
    return [WORKER, W_SHARD_REQUEST, pack(fields)]


def shard_grant(places: tuple[ShardPlace, ...]) -> list[bytes]:
    hosts = []
    for place in places:
        host: dict[str, Any] = {
            "name": place.name,
            "host": place.host,
            "device": place.device,
            "endpoint": place.endpoint,
            "bridged": place.bridged,
            "memory": place.memory,
        }
        if place.key is not None:
            host["key"] = place.key
        hosts.append(host)
    return [WORKER, W_SHARD_GRANT, pack({"shards": hosts})]


def shard_refusal(code: int, message: str) -> list[bytes]:
    """A GRANT that says no: 503 none fit now (ask again later), 403 the key may not, 400 a malformed ask."""
    return [WORKER, W_SHARD_GRANT, error_body(code, message)]


def shard_lost(name: str) -> list[bytes]:
    return [WORKER, W_SHARD_LOST, pack({"name": name})]


def shard_assign(assign: ShardAssign) -> list[bytes]:
    fields: dict[str, Any] = {"worker": assign.worker}
    if assign.key is not None:
        fields["key"] = assign.key
    return [WORKER, W_SHARD_ASSIGN, pack(fields)]


def shard_release() -> list[bytes]:
    return [WORKER, W_SHARD_RELEASE]


def parse_from_shard_peer(frames: list[bytes]) -> ShardOffer | ShardAsk | WorkerHeartbeat | WorkerDisconnect:
    """Parse what a shard host or a split worker sent the broker (frames after the routing id)."""
    if len(frames) < 2 or frames[0] != WORKER:
        raise ProtocolError("not an MDPW02 message")
    command, rest = frames[1], frames[2:]
    if command == W_HEARTBEAT:
        if rest:
            raise ProtocolError("a shard peer's HEARTBEAT takes no frames")
        return WorkerHeartbeat()
    if command == W_DISCONNECT:
        if rest:
            raise ProtocolError("DISCONNECT from a shard peer takes no frames")
        return WorkerDisconnect()
    if len(rest) != 1:
        raise ProtocolError("a shard offer or ask is one msgpack frame")
    if command == W_SHARD_READY:
        fields = _fields(rest[0], {"name", "host", "device", "memory", "endpoint", "bridged"})
        return ShardOffer(
            _name(fields["name"], "a shard host's name"),
            _name(fields["host"], "a shard host's machine"),
            _name(fields["device"], "a shard host's device", MAX_CAPABILITY_LEN),
            _mib(fields["memory"], "a shard host's memory"),
            _host_port(fields["endpoint"]),
            _bool(fields["bridged"], "bridged"),
        )
    if command == W_SHARD_REQUEST:
        fields = _fields(rest[0], {"name", "model", "memory", "count"}, frozenset({"exclude"}))
        count, model = fields["count"], fields["model"]
        if not _count(count, 0, MAX_SHARDS):
            raise ProtocolError(f"an ask's count is 0 (as few as fit) to {MAX_SHARDS}")
        if not isinstance(model, str):
            raise ProtocolError("an ask's model is a service name")
        excluded: tuple[str, ...] = ()
        if "exclude" in fields:
            exclude = fields["exclude"]
            if not isinstance(exclude, list) or not 0 < len(exclude) <= MAX_SHARDS:
                raise ProtocolError(f"an ask's exclude is a list of 1-{MAX_SHARDS} host names, or absent")
            excluded = tuple(_name(name, "an excluded host") for name in exclude)
        name, memory = _name(fields["name"], "a split worker's name"), _mib(fields["memory"], "an ask's memory")
        return ShardAsk(name, _service(model.encode()), memory, count, excluded)
    raise ProtocolError(f"unknown shard command {command!r}")


def parse_for_shard_peer(frames: list[bytes]) -> ToShardPeer:
    """Parse what the broker sent a shard host or a split worker."""
    if len(frames) < 2 or frames[0] != WORKER:
        raise ProtocolError("not an MDPW02 message")
    command, rest = frames[1], frames[2:]
    if command == W_HEARTBEAT:
        if rest:
            raise ProtocolError("a HEARTBEAT to a shard peer takes no frames")
        return ToShardPeer(command)
    if command == W_DISCONNECT:
        if len(rest) > 1:
            raise ProtocolError("DISCONNECT takes at most one reason frame")
        return ToShardPeer(command, refusal=_error(rest[0]) if rest else None)
    if command == W_SHARD_RELEASE:
        if rest:
            raise ProtocolError("RELEASE takes no frames")
        return ToShardPeer(command)
    if len(rest) != 1:
        raise ProtocolError("a GRANT, LOST or ASSIGN is one msgpack frame")
    if command == W_SHARD_GRANT:
        fields = unpack_map(rest[0])
        if "error" in fields:
            return ToShardPeer(command, refusal=_error(rest[0]))
        hosts = fields.get("shards")
        if set(fields) != {"shards"} or not isinstance(hosts, list) or not 0 < len(hosts) <= MAX_SHARDS:
            raise ProtocolError(f"a GRANT holds 1-{MAX_SHARDS} shard hosts")
        return ToShardPeer(command, grant=tuple(_place(host) for host in hosts))
    if command == W_SHARD_LOST:
        fields = _fields(rest[0], {"name"})
        return ToShardPeer(command, lost=_name(fields["name"], "a lost host's name"))
    if command == W_SHARD_ASSIGN:
        fields = _fields(rest[0], {"worker"}, frozenset({"key"}))
        key = _curve_key(fields["key"]) if "key" in fields else None
        return ToShardPeer(command, assign=ShardAssign(_name(fields["worker"], "a split worker's name"), key))
    raise ProtocolError(f"unexpected command {command!r} for a shard peer")


def _place(host: Any) -> ShardPlace:
    if not isinstance(host, dict):
        raise ProtocolError("a granted shard host is a map")
    required = {"name", "host", "device", "endpoint", "bridged", "memory"}
    if not required <= host.keys() <= required | {"key"}:
        raise ProtocolError(f"a granted shard host has the fields {sorted(required)} and maybe 'key'")
    bridged = _bool(host["bridged"], "bridged")
    key = _curve_key(host["key"]) if "key" in host else None
    if bridged and key is None:
        raise ProtocolError("a bridged shard host comes with its key")
    return ShardPlace(
        _name(host["name"], "a shard host's name"),
        _name(host["host"], "a shard host's machine"),
        _name(host["device"], "a shard host's device", MAX_CAPABILITY_LEN),
        _host_port(host["endpoint"]),
        bridged,
        key,
        _mib(host["memory"], "a shard's memory"),
    )


# The CURVE bridge (common/tunnel.py) carries the TCP connections of llama.cpp's RPC protocol as messages of two
# frames: a connection number (4 bytes, big-endian, chosen by the worker's end) and data; empty data closes it.
MAX_TUNNEL_CHUNK = 256 * 1024  # bytes read from a TCP connection into one message


def tunnel_frames(connection: int, data: bytes) -> list[bytes]:
    return [connection.to_bytes(4, "big"), data]


def parse_tunnel(frames: list[bytes]) -> tuple[int, bytes]:
    """(connection, data) of a bridge message; empty data: the connection is closed."""
    if len(frames) != 2 or len(frames[0]) != 4 or len(frames[1]) > MAX_TUNNEL_CHUNK:
        raise ProtocolError(f"a bridge message is a 4-byte connection number and at most {MAX_TUNNEL_CHUNK} bytes")
    return int.from_bytes(frames[0], "big"), frames[1]


# -------------------------------------------------------------------------- parsing: what peers receive


@dataclass(slots=True)
class BrokerToWorker:
    command: bytes  # W_REQUEST, W_CANCEL, W_CREDIT, W_HEARTBEAT or W_DISCONNECT (in any framing: 18/MDP's codes)
    route_key: bytes = b""
    body: list[bytes] = field(default_factory=list)
    credit: int = 0
    refusal: tuple[int, str] | None = None  # a DISCONNECT's reason, when the broker refused the worker
    epoch: int | None = None  # a HEARTBEAT's: the epoch of the broker of a pair (it answers READY with one)
    read: HolderRead | None = None  # a READ's: the range of a model file it holds


def _unframed(frames: list[bytes], framing: Framing) -> list[bytes]:
    """The frames after the leading empty frame the framing has; ProtocolError if it is not there."""
    if not framing.delimited:
        return frames
    if not frames or frames[0] != b"":
        raise ProtocolError("the leading empty frame is missing")
    return frames[1:]


def parse_for_worker(frames: list[bytes], framing: Framing = MDP02) -> BrokerToWorker:
    """Parse what the broker sent a worker that frames its own commands as ``framing``."""
    header = _worker_header(framing)
    frames = _unframed(frames, framing)
    if len(frames) < 2 or frames[0] != header:
        raise ProtocolError(f"not an {header.decode()} message")
    command = frames[1]
    if header == WORKER_01:
        if command in (W01_HEARTBEAT, W01_DISCONNECT):
            if len(frames) != 2:
                raise ProtocolError("a 7/MDP HEARTBEAT or DISCONNECT takes no frames")
            return BrokerToWorker(W_HEARTBEAT if command == W01_HEARTBEAT else W_DISCONNECT)
        if command != W01_REQUEST:
            raise ProtocolError(f"unexpected command {command!r} for a 7/MDP worker")
    if command == W_REQUEST:
        if len(frames) < 4 or frames[3] != b"" or not frames[2]:
            raise ProtocolError("REQUEST needs route key, empty frame and body")
        return BrokerToWorker(command, frames[2], frames[4:])
    if command == W_CANCEL:
        if len(frames) != 3:
            raise ProtocolError("CANCEL takes one route key frame")
        return BrokerToWorker(command, frames[2])
    if command == W_CREDIT:
        if len(frames) != 4:
            raise ProtocolError("CREDIT takes a route key and a credit frame")
        return BrokerToWorker(command, frames[2], credit=_credit(frames[3]))
    if command == W_HEARTBEAT:
        if len(frames) == 3:  # the broker of a pair says its epoch
            fields = unpack_map(frames[2])
            epoch = fields.get("epoch")
            if fields.keys() != {"epoch"} or not isinstance(epoch, int) or isinstance(epoch, bool):
                raise ProtocolError("a HEARTBEAT from the broker carries at most {'epoch': int}")
            return BrokerToWorker(command, epoch=epoch)
        if len(frames) != 2:
            raise ProtocolError("HEARTBEAT from the broker takes at most an epoch frame")
        return BrokerToWorker(command)
    if command == W_DISCONNECT:
        if len(frames) > 3:
            raise ProtocolError("DISCONNECT takes at most one reason frame")
        return BrokerToWorker(command, refusal=_refusal(frames[2]) if len(frames) == 3 else None)
    if command == W_READ and not framing.delimited:  # a holder's commands exist without that frame only
        read_key, read = _holder_read(frames[2:])
        return BrokerToWorker(command, read_key, read=read)
    raise ProtocolError(f"unexpected command {command!r} for a worker")


def _refusal(frame: bytes) -> tuple[int, str]:
    error = unpack_map(frame).get("error")
    if not isinstance(error, dict):
        raise ProtocolError("a DISCONNECT reason must be an error body")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(message, str):
        raise ProtocolError("a DISCONNECT reason needs an integer code and a message")
    return code, message


@dataclass(slots=True)
class BrokerToClient:
    command: bytes  # C_PARTIAL, C_FINAL or C_STATUS (in any framing: 18/MDP's codes; a 7/MDP REPLY is a C_FINAL)
    service: str  # "" in majortomo's framing, whose replies do not name it
    request_id: bytes | None
    body: list[bytes]


def parse_for_client(frames: list[bytes], extended: bool = True, framing: Framing = MDP02) -> BrokerToClient:
    """Parse a reply on a client socket whose requests were framed as ``framing``; ``extended`` says the client
    sent XREQUESTs (ids lead the body; 18/MDP framing only)."""
    if framing is not MDP02:  # QMesh's SDK parses every chunk in the default framing: it skips these checks
        frames = _unframed(frames, framing)
        if framing.dialect is _7MDP:
            if len(frames) < 2 or frames[0] != CLIENT_01:
                raise ProtocolError("not an MDPC01 reply")
            return BrokerToClient(C_FINAL, _service(frames[1]), None, frames[2:])
        if framing.dialect is _MAJORTOMO:
            if len(frames) < 2 or frames[0] != CLIENT or frames[1] not in (MT_PARTIAL, MT_FINAL):
                raise ProtocolError("not a PARTIAL or FINAL in majortomo's framing")
            return BrokerToClient(C_FINAL if frames[1] == MT_FINAL else C_PARTIAL, "", None, frames[2:])
    if len(frames) < 3 or frames[0] != CLIENT:
        raise ProtocolError("not an MDPC02 reply")
    command = frames[1]
    if command not in (C_PARTIAL, C_FINAL, C_STATUS):
        raise ProtocolError(f"unexpected command {command!r} for a client")
    service = _service(frames[2])
    if not extended and command != C_STATUS:
        return BrokerToClient(command, service, None, frames[3:])
    if len(frames) < 4:
        raise ProtocolError("reply to an extended request lacks its request id")
    if command == C_STATUS:
        if len(frames) != 5:
            raise ProtocolError("STATUS takes a request id and one status frame")
        unpack_map(frames[4])
    return BrokerToClient(command, service, _request_id(frames[3]), frames[4:])


# -------------------------------------------------------------------------- the HA link of a broker pair

PAIR_STATES = ("primary", "backup", "active", "passive")


def pair_state(state: str, epoch: int) -> list[bytes]:
    """What a broker of a pair publishes to its peer every heartbeat: its state and the newest epoch it knows."""
    return [PAIR, state.encode(), epoch.to_bytes(8, "big")]


def parse_pair_state(frames: list[bytes]) -> tuple[str, int]:
    if len(frames) != 3 or frames[0] != PAIR or len(frames[2]) != 8:
        raise ProtocolError("not a broker pair's state message")
    state = frames[1].decode("ascii", "replace")
    if state not in PAIR_STATES:
        raise ProtocolError(f"unknown pair state {state!r}")
    return state, int.from_bytes(frames[2], "big")


# ------------------------------------------------------------------------------------------------ model transfers
#
# Models travel through the broker in chunks, pulled with a bounded number in flight (credit, as in the zguide's
# "Transferring Files"). Every command carries an id the sender chose (a transfer id, a read key) and offsets as
# 8-byte big-endian integers; 18/MDP framing only, without a leading empty frame.

C_FETCH = b"\x31"  # client -> broker: transfer-id, msgpack {"name"[, "sha256"]}: send me this model
C_CHUNK = b"\x32"  # client -> broker: transfer-id, offset, length (4 bytes): the next chunk of it
C_PUSH = b"\x33"  # client -> broker: transfer-id, msgpack {"name", "sha256", "size"}: keep this model in your store
C_PUSH_DATA = b"\x34"  # client -> broker: transfer-id, offset, bytes: a chunk of the model it pushes
C_END = b"\x35"  # client -> broker: transfer-id, msgpack {"outcome"}: the client is done with the transfer
C_OFFER = b"\x36"  # broker -> client: transfer-id, msgpack {"name", "sha256", "size", "offset", "chunk", "window"}
C_DATA = b"\x37"  # broker -> client: transfer-id, offset, bytes: a chunk it asked for
C_ACK = b"\x38"  # broker -> client: transfer-id, offset: its push is stored up to there (credit for more)
C_ENDED = b"\x39"  # broker -> client: transfer-id, msgpack: an error body, or the model its push stored
W_READ = b"\x31"  # broker -> holder: read-key, sha256 (64 hex characters), offset, length (4 bytes)
W_DATA = b"\x32"  # holder -> broker: read-key, offset, bytes
W_READ_FAILED = b"\x33"  # holder -> broker: read-key, error body

# How a client ends a transfer: verified and kept; the bytes did not hash to the sha256 (the holders that served
# them are not asked again); given up (or a push stopped).
OUTCOME_OK = "ok"
OUTCOME_MISMATCH = "mismatch"
OUTCOME_CANCELLED = "cancelled"
TRANSFER_OUTCOMES = frozenset({OUTCOME_OK, OUTCOME_MISMATCH, OUTCOME_CANCELLED})

CONFLICT = 409  # two different files under one model name
RANGE_NOT_SATISFIABLE = 416  # a holder's copy is shorter than the size it announced (a truncated file)
INSUFFICIENT_STORAGE = 507  # not enough disk space for a model

MAX_MODEL_NAME_LEN = 128
MAX_CHUNK_BYTES = 4 * 1024 * 1024  # what one CHUNK may ask for; the broker offers less (its --transfer-chunk)
MAX_MODEL_BYTES = 2**48  # 256 TiB: any model file, and a bound that keeps offsets within 8 bytes
MAX_TRANSFER_WINDOW = 64  # chunks in flight on one transfer
SHA256_HEX_LEN = 64
_MODEL_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
_HEX = frozenset("0123456789abcdef")
_FROM_PULLER = frozenset({C_FETCH, C_CHUNK, C_PUSH, C_PUSH_DATA, C_END})
_FROM_HOLDER = frozenset({W_DATA, W_READ_FAILED})


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a model file (it becomes ``NAME.gguf`` in a models folder), or None if it can."""
    if not 0 < len(name) <= MAX_MODEL_NAME_LEN:
        return f"a model name is 1-{MAX_MODEL_NAME_LEN} characters, got {len(name)}"
    if not set(name) <= _MODEL_NAME_CHARS or name[0] in ".-+" or ".." in name:
        return (
            f"model name {name!r} is not allowed: letters, digits, '.', '_', '+' and '-' only, starting with a letter "
            "or a digit, with no '..' (it names a file)"
        )
    return None


def is_sha256(value: Any) -> bool:
    """A sha256 digest as the mesh writes it: 64 lowercase hex characters."""
    return isinstance(value, str) and len(value) == SHA256_HEX_LEN and set(value) <= _HEX


def _offset(frame: bytes) -> int:
    if len(frame) != 8:
        raise ProtocolError("an offset is 8 bytes, big-endian")
    offset = int.from_bytes(frame, "big")
    if offset >= MAX_MODEL_BYTES:
        raise ProtocolError(f"an offset is below {MAX_MODEL_BYTES}")
    return offset


def _length(frame: bytes) -> int:
    if len(frame) != 4:
        raise ProtocolError("a length is 4 bytes, big-endian")
    length = int.from_bytes(frame, "big")
    if not 0 < length <= MAX_CHUNK_BYTES:
        raise ProtocolError(f"a chunk is 1-{MAX_CHUNK_BYTES} bytes")
    return length


def _chunk_data(frame: bytes) -> bytes:
    if not 0 < len(frame) <= MAX_CHUNK_BYTES:
        raise ProtocolError(f"a chunk is 1-{MAX_CHUNK_BYTES} bytes")
    return frame


def _model_fields(fields: dict[str, Any]) -> ModelInfo:
    """``{"name", "sha256", "size"}`` (and nothing else: the caller takes its own fields out first)."""
    name, sha256, size = fields.get("name"), fields.get("sha256"), fields.get("size")
    if set(fields) != {"name", "sha256", "size"}:
        raise ProtocolError("a model is {'name', 'sha256', 'size'}")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_SERVICE_LEN:  # the broker checks what a name may be
        raise ProtocolError(f"a model's name is 1-{MAX_SERVICE_LEN} characters")
    if not is_sha256(sha256):
        raise ProtocolError("a model's sha256 is 64 lowercase hex characters")
    if not _count(size, 1, MAX_MODEL_BYTES):
        raise ProtocolError(f"a model's size is 1-{MAX_MODEL_BYTES} bytes")
    return ModelInfo(name, sha256, size)


def _model_map(model: ModelInfo) -> dict[str, Any]:
    return {"name": model.name, "sha256": model.sha256, "size": model.size}


def _transfer_from_client(command: bytes, frames: list[bytes], delimited: bool) -> TransferMessage:
    """A puller's or pusher's command (``frames``: after the command frame)."""
    if delimited:
        raise ProtocolError("model transfers exist only in 18/MDP framing without a leading empty frame")
    if len(frames) != (3 if command in (C_CHUNK, C_PUSH_DATA) else 2):
        raise ProtocolError("wrong number of frames for a transfer command")
    transfer_id = _request_id(frames[0])
    if command == C_FETCH:
        fields = unpack_map(frames[1])
        name, sha256 = fields.get("name"), fields.get("sha256")
        if set(fields) - {"name", "sha256"} or not isinstance(name, str) or not 0 < len(name) <= MAX_SERVICE_LEN:
            raise ProtocolError(f"FETCH is {{'name': 1-{MAX_SERVICE_LEN} characters[, 'sha256']}}")
        if "sha256" in fields and not is_sha256(sha256):
            raise ProtocolError("FETCH's sha256 is 64 lowercase hex characters")
        return ModelFetch(transfer_id, name, sha256)
    if command == C_CHUNK:
        return ChunkRequest(transfer_id, _offset(frames[1]), _length(frames[2]))
    if command == C_PUSH:
        return ModelPush(transfer_id, _model_fields(unpack_map(frames[1])))
    if command == C_PUSH_DATA:
        return PushChunk(transfer_id, _offset(frames[1]), _chunk_data(frames[2]))
    fields = unpack_map(frames[1])
    outcome = fields.get("outcome")
    if set(fields) != {"outcome"} or not isinstance(outcome, str) or outcome not in TRANSFER_OUTCOMES:
        raise ProtocolError(f"END is {{'outcome': one of {', '.join(sorted(TRANSFER_OUTCOMES))}}}")
    return TransferEnd(transfer_id, outcome)


def _transfer_from_holder(command: bytes, frames: list[bytes], delimited: bool) -> TransferMessage:
    if delimited:
        raise ProtocolError("model transfers exist only in 18/MDP framing without a leading empty frame")
    if len(frames) != (3 if command == W_DATA else 2) or not frames[0]:
        raise ProtocolError("a holder's answer is a read key and its data, or a read key and an error body")
    if command == W_DATA:
        return HolderData(frames[0], _offset(frames[1]), _chunk_data(frames[2]))
    return HolderReadFailed(frames[0], *_error(frames[1]))


def _holder_read(frames: list[bytes]) -> tuple[bytes, HolderRead]:
    """READ's read key and range (``frames``: after the command frame)."""
    if len(frames) != 4 or not frames[0]:
        raise ProtocolError("READ takes a read key, a sha256, an offset and a length")
    try:
        sha256 = frames[1].decode("ascii")
    except UnicodeDecodeError as exc:
        raise ProtocolError("READ's sha256 is 64 lowercase hex characters") from exc
    if not is_sha256(sha256):
        raise ProtocolError("READ's sha256 is 64 lowercase hex characters")
    return frames[0], HolderRead(sha256, _offset(frames[2]), _length(frames[3]))


# builders: puller and pusher


def model_fetch(transfer_id: bytes, name: str, sha256: str | None = None) -> list[bytes]:
    fields: dict[str, Any] = {"name": name}
    if sha256 is not None:
        fields["sha256"] = sha256
    return [CLIENT, C_FETCH, transfer_id, pack(fields)]


def chunk_request(transfer_id: bytes, offset: int, length: int) -> list[bytes]:
    return [CLIENT, C_CHUNK, transfer_id, offset.to_bytes(8, "big"), length.to_bytes(4, "big")]


def model_push(transfer_id: bytes, model: ModelInfo) -> list[bytes]:
    return [CLIENT, C_PUSH, transfer_id, pack(_model_map(model))]


def push_chunk(transfer_id: bytes, offset: int, data: bytes) -> list[bytes]:
    return [CLIENT, C_PUSH_DATA, transfer_id, offset.to_bytes(8, "big"), data]


def transfer_end(transfer_id: bytes, outcome: str) -> list[bytes]:
    return [CLIENT, C_END, transfer_id, pack({"outcome": outcome})]


# builders: broker and holders


def model_offer(transfer_id: bytes, model: ModelInfo, offset: int, chunk: int, window: int) -> list[bytes]:
    """The broker takes the transfer on: the model, where the bytes start (a push resumes where the store's copy
    ends), the largest chunk to ask for or send, and how many chunks may be in flight."""
    fields = {**_model_map(model), "offset": offset, "chunk": chunk, "window": window}
    return [CLIENT, C_OFFER, transfer_id, pack(fields)]


def model_data(transfer_id: bytes, offset: int, data: bytes) -> list[bytes]:
    return [CLIENT, C_DATA, transfer_id, offset.to_bytes(8, "big"), data]


def push_ack(transfer_id: bytes, offset: int) -> list[bytes]:
    return [CLIENT, C_ACK, transfer_id, offset.to_bytes(8, "big")]


def transfer_ended(transfer_id: bytes, error: tuple[int, str] | None, model: ModelInfo | None = None) -> list[bytes]:
    """The broker ends a transfer: with an error, or (a push) with the model now in its store."""
    if error is not None and model is None:
        return [CLIENT, C_ENDED, transfer_id, error_body(*error)]
    if error is None and model is not None:
        return [CLIENT, C_ENDED, transfer_id, pack(_model_map(model))]
    raise ValueError("a transfer ends with an error or with the model stored: one of them")


def holder_read(read_key: bytes, sha256: str, offset: int, length: int) -> list[bytes]:
    return [WORKER, W_READ, read_key, sha256.encode("ascii"), offset.to_bytes(8, "big"), length.to_bytes(4, "big")]


def holder_data(read_key: bytes, offset: int, data: bytes) -> list[bytes]:
    return [WORKER, W_DATA, read_key, offset.to_bytes(8, "big"), data]


def holder_read_failed(read_key: bytes, code: int, message: str) -> list[bytes]:
    return [WORKER, W_READ_FAILED, read_key, error_body(code, message)]


# parsing: what a puller or pusher receives


@dataclass(slots=True, frozen=True)
class TransferReply:
    """The broker's answer on a transfer: ``command`` is C_OFFER (``model``, ``offset``, ``chunk``, ``window``),
    C_DATA (``offset``, ``data``), C_ACK (``offset``) or C_ENDED (``error``, else the stored ``model``)."""

    command: bytes
    transfer_id: bytes
    model: ModelInfo | None = None
    offset: int = 0
    chunk: int = 0
    window: int = 0
    data: bytes = b""
    error: tuple[int, str] | None = None


def parse_transfer_reply(frames: list[bytes]) -> TransferReply:
    if len(frames) < 4 or frames[0] != CLIENT or frames[1] not in (C_OFFER, C_DATA, C_ACK, C_ENDED):
        raise ProtocolError("not a transfer reply")
    command, transfer_id = frames[1], _request_id(frames[2])
    if len(frames) != (5 if command == C_DATA else 4):
        raise ProtocolError("wrong number of frames for a transfer reply")
    if command == C_DATA:
        return TransferReply(command, transfer_id, offset=_offset(frames[3]), data=_chunk_data(frames[4]))
    if command == C_ACK:
        return TransferReply(command, transfer_id, offset=_offset(frames[3]))
    if command == C_ENDED:
        fields = unpack_map(frames[3])
        if fields.keys() == {"error"}:
            return TransferReply(command, transfer_id, error=_error(frames[3]))
        return TransferReply(command, transfer_id, model=_model_fields(fields))
    fields = unpack_map(frames[3])
    offset, chunk, window = (fields.pop(key, None) for key in ("offset", "chunk", "window"))
    model = _model_fields(fields)
    if not _count(offset, 0, model.size) or not _count(chunk, 1, MAX_CHUNK_BYTES):
        raise ProtocolError(f"an OFFER's offset is within the model, its chunk 1-{MAX_CHUNK_BYTES} bytes")
    if not _count(window, 1, MAX_TRANSFER_WINDOW):
        raise ProtocolError(f"an OFFER's window is 1-{MAX_TRANSFER_WINDOW} chunks")
    return TransferReply(command, transfer_id, model, offset, chunk, window)


# the broker's store: what the broker hands it and what it answers (in the broker's process, never on the wire)


def parse_for_store(frames: list[bytes]) -> BrokerToWorker | ModelPush | PushChunk | TransferEnd:
    """A READ (as a holder gets it), or a push relayed under the broker's transfer key (as a client sends it)."""
    if frames[:1] == [WORKER]:
        read = parse_for_worker(frames)
        if read.command != W_READ:
            raise ProtocolError("the store serves READs only")
        return read
    message = parse_inbound(frames)
    if not isinstance(message, (ModelPush, PushChunk, TransferEnd)):
        raise ProtocolError("the store takes READ, PUSH, push DATA and END only")
    return message


def parse_store_reply(frames: list[bytes]) -> HolderData | HolderReadFailed | TransferReply:
    """A read's answer (as a holder sends it), or where a push stands (ACK or ENDED, as a client gets them)."""
    if frames[:1] == [WORKER]:
        message = parse_inbound(frames)
        if not isinstance(message, (HolderData, HolderReadFailed)):
            raise ProtocolError("the store answers a READ with DATA or READ_FAILED")
        return message
    reply = parse_transfer_reply(frames)
    if reply.command not in (C_ACK, C_ENDED):
        raise ProtocolError("the store answers a push with ACK or ENDED")
    return reply
