"""The QMesh wire format: 18/MDP (Majordomo 0.2) frames, QMesh's optional extensions, msgpack bodies.

This module is the only place that builds or parses frames. Everything else works with the message classes
below. ``docs/PROTOCOL.md`` is the specification; this is its implementation.

Frames as seen by the broker's ROUTER socket start with the peer's routing id; the functions here take and
return the frames *after* that id. Clients and workers use DEALER sockets, so there is no empty delimiter
frame (MDP 0.2).

Plain 18/MDP peers and QMesh peers share one socket. QMesh's extensions never change the meaning of a plain
MDP message:

* an extended client uses its own command codes (``XREQUEST``, ``CANCEL``) that carry a request id, and the
  replies to those requests carry the id as the first body frame; a plain ``REQUEST`` gets plain replies;
* an extended worker adds one optional msgpack frame to ``READY`` (capacity) and to ``HEARTBEAT`` (load), and
  understands ``CANCEL``; a plain worker sends neither and is never sent ``CANCEL``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from qmesh.common.errors import QMeshError
from qmesh.common.prefix import HASH_BYTES as PREFIX_HASH_BYTES
from qmesh.common.prefix import MAX_BLOCKS as MAX_PREFIX_BLOCKS

CLIENT = b"MDPC02"
WORKER = b"MDPW02"

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

MAX_SERVICE_LEN = 255
MAX_REQUEST_ID_LEN = 64
MAX_SESSION_LEN = 128
MAX_BODY_BYTES = 8 * 1024 * 1024  # also the sockets' MAXMSGSIZE
MAX_HINT_BYTES = PREFIX_HASH_BYTES * MAX_PREFIX_BLOCKS


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


def error_body(code: int, message: str) -> bytes:
    """Body of an error FINAL: ``{"error": {"code": int, "message": str}}``."""
    return pack({"error": {"code": code, "message": message}})


# ------------------------------------------------------------------------------------------------ messages


@dataclass(slots=True, frozen=True)
class RoutingHint:
    """Where a request would best run: the chained hashes of its conversation's prefix blocks
    (``common.prefix``), and the session it belongs to, if the client names one."""

    prefix: bytes = b""
    session: str | None = None


@dataclass(slots=True)
class ClientRequest:
    """A request from a client. ``request_id`` is None for a plain MDP ``REQUEST``."""

    service: str
    request_id: bytes | None
    body: list[bytes]
    hint: RoutingHint | None = None


@dataclass(slots=True)
class ClientCancel:
    request_id: bytes


@dataclass(slots=True)
class ClientCredit:
    request_id: bytes
    credit: int


@dataclass(slots=True)
class WorkerReady:
    service: str
    info: dict[str, Any] = field(default_factory=dict)  # empty for a plain MDP worker

    @property
    def extended(self) -> bool:
        return bool(self.info)


@dataclass(slots=True)
class WorkerPartial:
    route_key: bytes
    body: list[bytes]


@dataclass(slots=True)
class WorkerFinal:
    route_key: bytes
    body: list[bytes]


@dataclass(slots=True)
class WorkerHeartbeat:
    load: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class WorkerDisconnect:
    pass


ClientMessage = ClientRequest | ClientCancel | ClientCredit
WorkerMessage = WorkerReady | WorkerPartial | WorkerFinal | WorkerHeartbeat | WorkerDisconnect
InboundMessage = ClientMessage | WorkerMessage


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
    if not fields or set(fields) - {"prefix", "session"}:
        raise ProtocolError("a routing hint has 'prefix' and/or 'session' and nothing else")
    prefix, session = fields.get("prefix", b""), fields.get("session")
    if not isinstance(prefix, bytes) or len(prefix) % PREFIX_HASH_BYTES or len(prefix) > MAX_HINT_BYTES:
        raise ProtocolError(f"a hint's prefix is up to {MAX_HINT_BYTES} bytes of {PREFIX_HASH_BYTES}-byte hashes")
    if session is not None and (
        not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_LEN or not session.isprintable()
    ):
        raise ProtocolError(f"a hint's session is 1-{MAX_SESSION_LEN} printable characters")
    if not prefix and session is None:
        raise ProtocolError("an empty routing hint")
    return RoutingHint(prefix, session)


def _reply_envelope(frames: list[bytes], command: str) -> tuple[bytes, list[bytes]]:
    if len(frames) < 4 or frames[3] != b"":
        raise ProtocolError(f"worker {command} needs route key, empty frame and body")
    if not frames[2]:
        raise ProtocolError(f"worker {command} has an empty route key")
    return frames[2], frames[4:]


def parse_inbound(frames: list[bytes]) -> InboundMessage:
    """Parse what a client or worker sent the broker (frames after the routing id).

    Raises ProtocolError for anything malformed; never any other exception.
    """
    if len(frames) < 2:
        raise ProtocolError(f"too few frames ({len(frames)})")
    header, command = frames[0], frames[1]
    if header == CLIENT:
        if command == C_REQUEST:
            if len(frames) < 3:
                raise ProtocolError("REQUEST without service frame")
            return ClientRequest(_service(frames[2]), None, frames[3:])
        if command == C_XREQUEST:
            if len(frames) < 4:
                raise ProtocolError("XREQUEST needs service and request id frames")
            return ClientRequest(_service(frames[2]), _request_id(frames[3]), frames[4:])
        if command == C_HINTED_REQUEST:
            if len(frames) < 5:
                raise ProtocolError("a hinted request needs service, request id and hint frames")
            return ClientRequest(_service(frames[2]), _request_id(frames[3]), frames[5:], _hint(frames[4]))
        if command == C_CANCEL:
            if len(frames) != 3:
                raise ProtocolError("CANCEL takes exactly one request id frame")
            return ClientCancel(_request_id(frames[2]))
        if command == C_CREDIT:
            if len(frames) != 4:
                raise ProtocolError("CREDIT takes a request id and a credit frame")
            return ClientCredit(_request_id(frames[2]), _credit(frames[3]))
        raise ProtocolError(f"unknown client command {command!r}")
    if header == WORKER:
        if command == W_READY:
            if len(frames) not in (3, 4):
                raise ProtocolError("READY takes a service frame and an optional info frame")
            info = unpack_map(frames[3]) if len(frames) == 4 else {}
            return WorkerReady(_service(frames[2]), info)
        if command == W_PARTIAL:
            return WorkerPartial(*_reply_envelope(frames, "PARTIAL"))
        if command == W_FINAL:
            return WorkerFinal(*_reply_envelope(frames, "FINAL"))
        if command == W_HEARTBEAT:
            if len(frames) > 3:
                raise ProtocolError("HEARTBEAT takes at most one load frame")
            return WorkerHeartbeat(unpack_map(frames[2]) if len(frames) == 3 else {})
        if command == W_DISCONNECT:
            if len(frames) != 2:
                raise ProtocolError("DISCONNECT from a worker takes no frames")
            return WorkerDisconnect()
        raise ProtocolError(f"unknown worker command {command!r}")
    raise ProtocolError(f"unknown header {header[:16]!r}")


# ------------------------------------------------------------------------------------- builders: broker side


def client_reply(final: bool, service: str, request_id: bytes | None, body: list[bytes]) -> list[bytes]:
    """PARTIAL or FINAL to a client; an extended request's id leads the body."""
    frames = [CLIENT, C_FINAL if final else C_PARTIAL, service.encode()]
    if request_id is not None:
        frames.append(request_id)
    frames.extend(body)
    return frames


def client_status(service: str, request_id: bytes, status: dict[str, Any]) -> list[bytes]:
    return [CLIENT, C_STATUS, service.encode(), request_id, pack(status)]


def worker_request(route_key: bytes, body: list[bytes]) -> list[bytes]:
    return [WORKER, W_REQUEST, route_key, b"", *body]


def worker_cancel(route_key: bytes) -> list[bytes]:
    return [WORKER, W_CANCEL, route_key]


def worker_credit(route_key: bytes, credit: int) -> list[bytes]:
    return [WORKER, W_CREDIT, route_key, credit.to_bytes(4, "big")]


def heartbeat(load: dict[str, Any] | None = None) -> list[bytes]:
    return [WORKER, W_HEARTBEAT] if not load else [WORKER, W_HEARTBEAT, pack(load)]


def disconnect(refusal: tuple[int, str] | None = None) -> list[bytes]:
    """DISCONNECT; to an extended worker the broker may add why it refused it (an error body), so that the
    worker can stop with that reason instead of registering again and again."""
    if refusal is None:
        return [WORKER, W_DISCONNECT]
    return [WORKER, W_DISCONNECT, error_body(*refusal)]


# ------------------------------------------------------------------------------------- builders: peer side


def ready(service: str, info: dict[str, Any] | None = None) -> list[bytes]:
    frames = [WORKER, W_READY, service.encode()]
    if info:
        frames.append(pack(info))
    return frames


def worker_reply(final: bool, route_key: bytes, body: list[bytes]) -> list[bytes]:
    return [WORKER, W_FINAL if final else W_PARTIAL, route_key, b"", *body]


def client_request(
    service: str, body: list[bytes], request_id: bytes | None = None, hint: RoutingHint | None = None
) -> list[bytes]:
    """REQUEST (no id), XREQUEST (an id) or, with a routing hint that says anything, a hinted request."""
    if request_id is None:
        return [CLIENT, C_REQUEST, service.encode(), *body]
    if hint is None or not hint.prefix and hint.session is None:
        return [CLIENT, C_XREQUEST, service.encode(), request_id, *body]
    fields: dict[str, Any] = {"prefix": hint.prefix} if hint.prefix else {}
    if hint.session is not None:
        fields["session"] = hint.session
    return [CLIENT, C_HINTED_REQUEST, service.encode(), request_id, pack(fields), *body]


def client_cancel(request_id: bytes) -> list[bytes]:
    return [CLIENT, C_CANCEL, request_id]


def client_credit(request_id: bytes, credit: int) -> list[bytes]:
    return [CLIENT, C_CREDIT, request_id, credit.to_bytes(4, "big")]


# -------------------------------------------------------------------------- parsing: what peers receive


@dataclass(slots=True)
class BrokerToWorker:
    command: bytes  # W_REQUEST, W_CANCEL, W_CREDIT, W_HEARTBEAT or W_DISCONNECT
    route_key: bytes = b""
    body: list[bytes] = field(default_factory=list)
    credit: int = 0
    refusal: tuple[int, str] | None = None  # a DISCONNECT's reason, when the broker refused the worker


def parse_for_worker(frames: list[bytes]) -> BrokerToWorker:
    if len(frames) < 2 or frames[0] != WORKER:
        raise ProtocolError("not an MDPW02 message")
    command = frames[1]
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
        if len(frames) != 2:
            raise ProtocolError("HEARTBEAT from the broker takes no frames")
        return BrokerToWorker(command)
    if command == W_DISCONNECT:
        if len(frames) > 3:
            raise ProtocolError("DISCONNECT takes at most one reason frame")
        return BrokerToWorker(command, refusal=_refusal(frames[2]) if len(frames) == 3 else None)
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
    command: bytes  # C_PARTIAL, C_FINAL or C_STATUS
    service: str
    request_id: bytes | None
    body: list[bytes]


def parse_for_client(frames: list[bytes], extended: bool = True) -> BrokerToClient:
    """Parse a reply on a client socket; ``extended`` says the client sent XREQUESTs (ids lead the body)."""
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
