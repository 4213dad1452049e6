"""CurveZMQ key files in pyzmq's certificate format (ZPL), and allow-lists of public keys.

``NAME.key`` holds the public key, ``NAME.key_secret`` the public and the secret key (mode 0600). Both are
readable by ``zmq.auth.load_certificate``. A public key file in a broker's worker allow-list may carry
``models = "a,b"`` in its metadata section: that worker key may only serve those models.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from qmesh.common.errors import ConfigError

_METADATA_LINE = re.compile(r'^\s+(\S+)\s*=\s*"?([^"]*)"?\s*$')


@dataclass(frozen=True, slots=True)
class KeyPair:
    public: bytes  # z85
    secret: bytes  # z85


@dataclass(frozen=True, slots=True)
class AllowedKey:
    name: str  # the file's stem, for logs
    models: frozenset[str] | None  # None: any model


@dataclass(frozen=True, slots=True)
class CurveClientKeys:
    """What a worker or client needs to talk to a CURVE broker: its own key pair and the broker's public key, or
    each broker's of a pair (in ``--broker``'s order; one key alone serves a pair that shares its key pair)."""

    own: KeyPair
    broker_publics: tuple[bytes, ...]

    @classmethod
    def load(cls, secret_file: str | Path, broker_key_files: str | Path) -> CurveClientKeys:
        """``broker_key_files``: ``NAME.key``, or ``A.key,B.key`` for a pair."""
        files = [part.strip() for part in str(broker_key_files).split(",") if part.strip()]
        if not files:
            raise ConfigError("no broker key file given")
        return cls(load_keypair(secret_file), tuple(load_public_key(file) for file in files))

    def check_brokers(self, count: int) -> None:
        """One broker key for all the brokers, or one for each."""
        if len(self.broker_publics) not in (1, count):
            raise ConfigError(
                f"{len(self.broker_publics)} broker keys for {count} broker(s): give one key file, or one per broker "
                "in --broker's order (--broker-key A.key,B.key)"
            )

    def apply(self, socket: zmq.Socket, broker_index: int = 0) -> None:
        """Make ``socket`` a CURVE client of broker number ``broker_index`` (of ``--broker``'s list)."""
        socket.curve_secretkey = self.own.secret
        socket.curve_publickey = self.own.public
        socket.curve_serverkey = self.broker_publics[broker_index if len(self.broker_publics) > 1 else 0]


def key_fingerprint(public: bytes | str) -> str:
    """How the broker names a key that is on no list: the first 8 characters of its z85 public key, which its owner
    finds at the start of the ``public-key`` line of its key files."""
    return (public.decode() if isinstance(public, bytes) else public)[:8]


def generate_keys(prefix: str | Path, models: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` and ``PREFIX.key_secret`` (0600); refuse to overwrite existing keys."""
    prefix = Path(prefix)
    public_file, secret_file = prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".key_secret")
    for existing in (public_file, secret_file):
        if existing.exists():
            raise ConfigError(f"{existing} already exists; remove it first to make a new key")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    metadata = {"models": ",".join(models)} if models else {}
    _write(public_file, public, None, metadata, mode=0o644)
    _write(secret_file, public, secret, metadata, mode=0o600)
    return public_file, secret_file


def load_keypair(secret_file: str | Path) -> KeyPair:
    public, secret = _load(secret_file)
    if secret is None:
        raise ConfigError(f"{secret_file} has no secret key: give the NAME.key_secret file, not NAME.key")
    mode = Path(secret_file).stat().st_mode & 0o077
    if mode:
        raise ConfigError(f"{secret_file} is readable by others (mode {oct(mode)}); run: chmod 600 {secret_file}")
    return KeyPair(public, secret)


def load_public_key(public_file: str | Path) -> bytes:
    return _load(public_file)[0]


def read_allow_list(directory: str | Path) -> dict[bytes, AllowedKey]:
    """Every ``*.key`` file in ``directory``: z85 public key -> who it is and what it may serve."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"allow-list directory {directory} does not exist")
    allowed = {}
    for path in sorted(directory.glob("*.key")):
        public, _ = _load(path)
        models = _metadata(path).get("models")
        names = frozenset(m.strip() for m in models.split(",") if m.strip()) if models else None
        allowed[public] = AllowedKey(path.stem, names)
    return allowed


def _load(path: str | Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read key file {path}: {exc}") from exc
    if len(public) != 40 or (secret is not None and len(secret) != 40):
        raise ConfigError(f"{path} does not hold a 40-character z85 CURVE key")
    return public, secret


def _metadata(path: Path) -> dict[str, str]:
    values, section = {}, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line[0].isspace():
            section = line.strip()
        elif section == "metadata" and (match := _METADATA_LINE.match(line)):
            values[match.group(1)] = match.group(2)
    return values


def _write(path: Path, public: bytes, secret: bytes | None, metadata: dict[str, str], mode: int) -> None:
    kind = "secret" if secret else "public"
    lines = [
        f"#   ****  Generated on {datetime.datetime.now():%Y-%m-%d %H:%M:%S} by qmesh-keys  ****",
        f"#   ZeroMQ CURVE **{kind}** certificate" + ("; keep it private" if secret else ""),
        "",
        "metadata",
        *(f'    {key} = "{value}"' for key, value in metadata.items()),
        "curve",
        f'    public-key = "{public.decode()}"',
    ]
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, mode)


HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


def handshake_failure(event: int, broker: str, value: int = 0, curve: bool | None = None) -> str | None:
    """What a failed handshake with the broker means, for the person running the command; None if it did not fail.

    ``value`` is the monitor event's value and ``curve`` whether this side uses keys: with both, a mechanism
    mismatch (one side uses CURVE, the other not) says which side lacks what.
    """
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"the broker at {broker} refused this key: it is not on the broker's allow-list"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:  # the broker could not read our HELLO and hung up
        return (
            f"the secure handshake with the broker at {broker} failed: wrong --broker-key (it must be this "
            "broker's public key file)"
        )
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH and curve is False:
            return f"the broker at {broker} requires CURVE keys: give --curve-secret and --broker-key"
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH and curve:
            return f"the broker at {broker} does not use CURVE: connect without --curve-secret and --broker-key"
        return (
            f"the secure handshake with the broker at {broker} failed: wrong --broker-key, or the broker "
            "and this side do not agree on using CURVE"
        )
    return None


# A broker that dies while a handshake is under way hangs up as one that cannot read our HELLO does (a wrong broker
# key): only this many such failures in a row, with no success between, are taken for a wrong key.
WRONG_KEY_AFTER = 3


@dataclass(slots=True)
class HandshakeWatch:
    """The handshake events of one connection (libzmq retries a failed handshake by itself), judged: a refusal that
    retrying cannot fix, or nothing. One hang-up during the handshake is not yet a wrong key."""

    broker: str
    curve: bool | None = None
    hang_ups: int = 0  # EVENT_HANDSHAKE_FAILED_NO_DETAIL in a row

    def refusal(self, event: int, value: int = 0) -> str | None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.hang_ups = 0
        elif event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self.hang_ups += 1
            if self.hang_ups < WRONG_KEY_AFTER:
                return None
        return handshake_failure(event, self.broker, value, self.curve)
