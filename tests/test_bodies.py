"""Request bodies: what a worker accepts, and the clear 400 reasons for what it does not."""

from __future__ import annotations

import re
import struct

import pytest

from qmesh.common import protocol as p
from qmesh.common.bodies import (
    MAX_EMBED_CHARS,
    MAX_EMBED_INPUTS,
    BadRequest,
    EmbeddingRequest,
    GenerationRequest,
    pack_vector,
    request_from_body,
    resume_body,
    unpack_vector,
)
from qmesh.common.errors import QMeshError


def test_round_trip_keeps_every_field():
    request = GenerationRequest(
        prompt="hi", system="be brief", max_tokens=7, temperature=0.5, seed=3, top_p=0.9, top_k=40, stop=["\n"]
    )
    assert GenerationRequest.from_body([request.to_body()]) == request


def test_chat_messages_put_the_system_prompt_first():
    request = GenerationRequest(messages=[{"role": "user", "content": "hi"}], system="sys")
    assert request.chat_messages() == [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    assert GenerationRequest(prompt="q").chat_messages() == [{"role": "user", "content": "q"}]


def test_a_plain_mdp_body_is_a_utf8_prompt():
    assert GenerationRequest.from_body([b"Hello ", b"there"]).prompt == "Hello there"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({}, "exactly one of"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "exactly one of"),
        ({"prompt": "   "}, "empty"),
        ({"prompt": "a", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "a", "max_tokens": True}, "max_tokens"),
        ({"prompt": "a", "temperature": "hot"}, "temperature"),
        ({"prompt": "a", "top_p": 2}, "top_p"),
        ({"prompt": "a", "stop": "x"}, "stop"),
        ({"prompt": "a", "colour": "red"}, "unknown field"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, r"messages\[0\] must be"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "answer an earlier tool call"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "unknown field"),
        ({"prompt": "a", "tools": [{"name": "f"}], "json_schema": {"type": "object"}}, "not both"),
        ({"prompt": "a", "tools": [{"name": "f/g"}]}, r"tools\[0\].name"),
        ({"prompt": "a", "tools": [{"name": "f"}, {"name": "f"}]}, "two tools"),
        ({"prompt": "a", "tools": [{"name": "f"}], "tool_choice": {"name": "g"}}, "tool_choice"),
        ({"prompt": "a", "tool_choice": "required"}, "no 'tools'"),
        ({"prompt": "a", "json_schema": "object"}, "JSON schema object"),
        ({"prompt": "a", "logprobs": 21}, "logprobs"),
        ({"prompt": "a", "logit_bias": [[5]]}, "logit_bias"),
        ({"prompt": "a", "presence_penalty": 3}, "presence_penalty"),
        ({"messages": [{"role": "user", "content": "x"}], "raw": True}, "'raw' applies"),
        ({"prompt": "a", "seed": 1.5}, "seed"),
    ],
)
def test_bad_bodies_are_refused_with_a_reason(body, reason):
    with pytest.raises(BadRequest, match=reason):
        GenerationRequest.from_body([p.pack(body)])


def test_every_field_survives_the_wire() -> None:
    calls = [{"id": "c1", "name": "weather", "arguments": '{"city": "Paris"}'}]
    request = GenerationRequest(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
        ],
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        logit_bias=[(12, -100.0), (7, 2.5)],
        logprobs=2,
        tools=[{"name": "weather", "description": "today's weather", "parameters": {"type": "object"}}],
        tool_choice={"name": "weather"},
        parallel_tool_calls=False,
    )
    again = GenerationRequest.from_body([request.to_body()])
    assert again == request and again.constrained
    json_mode = GenerationRequest(prompt="x", json_schema={"type": "object"})
    assert GenerationRequest.from_body([json_mode.to_body()]).constrained
    assert not GenerationRequest(prompt="x", tools=request.tools, tool_choice="none").constrained


def test_empty_and_undecodable_bodies_are_refused():
    with pytest.raises(BadRequest):
        GenerationRequest.from_body([])
    with pytest.raises(BadRequest, match="UTF-8"):
        GenerationRequest.from_body([b"\xff\xfe\xfd"])


def test_bad_bodies_and_messages_raise_qmesh_errors() -> None:
    with pytest.raises(QMeshError):
        GenerationRequest.from_body([])
    with pytest.raises(QMeshError):
        p.unpack_map(p.pack([1]))


# ------------------------------------------------------------------------------------------------ failover resume


def _chunks(*token_lists: list[int]) -> bytes:
    """PARTIAL bodies concatenated, as the broker keeps them for a stream."""
    return b"".join(p.pack({"text": "x", "tokens": tokens}) for tokens in token_lists)


def test_resume_body_continues_after_every_delivered_token() -> None:
    body = [p.pack({"prompt": "go on", "max_tokens": 9, "resume": {"tokens": [1, 2], "failovers": 1}})]
    resumed = resume_body(body, _chunks([3], [4, 5], []))
    assert resumed is not None
    fields = p.unpack(resumed[0])
    assert fields["resume"] == {"tokens": [1, 2, 3, 4, 5], "failovers": 2}
    assert fields["prompt"] == "go on" and fields["max_tokens"] == 9
    assert GenerationRequest.from_body(resumed).resume_tokens == [1, 2, 3, 4, 5]


def test_a_request_resumed_twice_carries_every_delivered_token() -> None:
    request = GenerationRequest(prompt="go on", max_tokens=9, stop=["."])
    twice = request.resumed_after([3]).resumed_after([4, 5])
    assert (twice.resume_tokens, twice.failovers) == ([3, 4, 5], 2)
    assert (twice.prompt, twice.max_tokens, twice.stop) == ("go on", 9, ["."])
    assert (request.resume_tokens, request.failovers) == ([], 0), "the request resumed is left as it was"


@pytest.mark.parametrize(
    "delivered",
    [
        _chunks([3])[:-1],  # cut in the middle of a body
        _chunks([3]) + p.pack("not a map"),
        _chunks([3]) + p.pack({"text": "no token ids"}),
        _chunks([3], [-1]),  # not a token id
        b"\xc1",  # never valid msgpack
    ],
    ids=["truncated", "not-a-map", "no-tokens", "negative-token", "garbage"],
)
def test_resume_body_refuses_chunks_it_cannot_trust(delivered: bytes) -> None:
    assert resume_body([p.pack({"prompt": "go on"})], delivered) is None


def test_a_plain_prompt_cannot_be_resumed() -> None:
    assert resume_body([b"a plain MDP prompt"], _chunks([3])) is None


# ------------------------------------------------------------------------------------------------ embeddings


def test_a_body_is_a_generation_or_an_embeddings_request_by_its_fields() -> None:
    embedding = EmbeddingRequest(["one", "two"])
    assert p.unpack(embedding.to_body()) == {"embed": ["one", "two"]}
    assert request_from_body([embedding.to_body()]) == embedding
    assert request_from_body([GenerationRequest(prompt="hi").to_body()]) == GenerationRequest(prompt="hi")
    assert request_from_body([b"a plain MDP prompt"]) == GenerationRequest(prompt="a plain MDP prompt")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"embed": ["a"], "prompt": "b"}, "not a generation's fields (prompt)"),
        ({"embed": ["a"], "max_tokens": 5}, "not a generation's fields (max_tokens)"),
        ({"embed": []}, f"1-{MAX_EMBED_INPUTS} texts"),
        ({"embed": ["a"] * (MAX_EMBED_INPUTS + 1)}, f"1-{MAX_EMBED_INPUTS} texts"),
        ({"embed": "a"}, "must be a list"),
        ({"embed": ["a", ""]}, "non-empty strings"),
        ({"embed": ["a", 3]}, "non-empty strings"),
        ({"embed": ["x" * (MAX_EMBED_CHARS // 2), "y" * (MAX_EMBED_CHARS // 2 + 1)]}, "longer than"),
    ],
    ids=["mixed-prompt", "mixed-option", "none", "too-many", "not-a-list", "empty-text", "not-text", "too-long"],
)
def test_an_embeddings_body_is_embed_and_nothing_else(fields: dict, reason: str) -> None:
    with pytest.raises(BadRequest, match=re.escape(reason)):
        request_from_body([p.pack(fields)])


def test_a_vector_is_little_endian_float32() -> None:
    vector = [0.5, -1.25, 3.0e-5, 0.0]
    packed = pack_vector(vector)
    assert packed == struct.pack("<4f", *vector)
    assert unpack_vector(packed) == [struct.unpack("<f", struct.pack("<f", x))[0] for x in vector]
    with pytest.raises(ValueError, match="float32"):
        unpack_vector(packed[:-1])
