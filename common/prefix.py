"""Prefix block hashes: the routing hint that lets the broker send a conversation back to the llama-server that
already holds its beginning, without reading request bodies.

A request's conversation (system message, then the turns) is written out as text, cut into blocks of
``BLOCK_CHARS`` characters, and each full block is hashed together with the hash before it. A hash therefore
names the whole prefix up to the end of its block: turn k+1 of a conversation starts with every hash of turn k
(its text starts with turn k's text), and two conversations with the same system prompt share that prompt's
hashes. The last, partial block is left out, so a hint never names text that a later turn may continue
differently. Clients (the SDK, so ``qmesh-client`` and the gateway too) compute it where the messages are built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

BLOCK_CHARS = 128  # about 32 tokens of English text
HASH_BYTES = 8
MAX_BLOCKS = 8192  # a hint covers at most the first ~1 M characters (the largest prompt a request may carry)

_ROLE_END, _MESSAGE_END = "\x1f", "\x1e"  # separators no chat text contains, so no two conversations write alike


def conversation_text(messages: Sequence[dict[str, str]]) -> str:
    """The conversation as one text whose prefixes are exactly the conversation's prefixes."""
    return "".join(f"{m['role']}{_ROLE_END}{m['content']}{_MESSAGE_END}" for m in messages)


def prefix_hashes(text: str) -> bytes:
    """The chained hashes of ``text``'s full blocks, ``HASH_BYTES`` each, concatenated."""
    hashes = bytearray()
    previous = b""
    for start in range(0, min(len(text), BLOCK_CHARS * MAX_BLOCKS) - BLOCK_CHARS + 1, BLOCK_CHARS):
        block = text[start : start + BLOCK_CHARS].encode("utf-8", "surrogatepass")
        previous = hashlib.blake2b(previous + block, digest_size=HASH_BYTES).digest()
        hashes += previous
    return bytes(hashes)


def split_hashes(hashes: bytes) -> list[bytes]:
    return [hashes[i : i + HASH_BYTES] for i in range(0, len(hashes), HASH_BYTES)]
