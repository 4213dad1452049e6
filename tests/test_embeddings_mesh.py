"""Embeddings through the mesh, end to end: real broker, real llama-servers in embedding mode (SmolLM2 with mean
pooling), the SDK's ``embed`` and the gateway's ``/v1/embeddings`` driven by the official ``openai`` client.

The module's mesh serves two models by capability: MODEL by one chat worker, EMBED by two embeddings workers of
one slot each, so a batch of the SDK can be seen spread over both.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from meshkit import MODEL, BrokerThread, GatewayThread, run_cli, worker_threads
from qmesh.client.sdk import QMeshClient, split_texts
from qmesh.common import protocol as p
from qmesh.common.bodies import MAX_EMBED_INPUTS
from qmesh.common.errors import MeshError
from qmesh.gateway.bridge import Bridge
from qmesh.gateway.errors import APIError
from qmesh.gateway.openai_api import parse_embeddings
from qmesh.testing import wait_for_workers

EMBED = "smollm2-embed"  # the same GGUF, served by embeddings workers only
SIZE = 576  # SmolLM2-135M's embedding length
TEXTS = ["The cat sat on the mat.", "The cat sat on the mat.", "Quantum chromodynamics describes the strong force."]


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[BrokerThread, list[Any], Any]]:
    with (
        BrokerThread() as broker,
        worker_threads(broker.endpoint, count=1, slots=1),
        worker_threads(broker.endpoint, count=2, slots=1, service=EMBED, embeddings=True) as embedders,
        GatewayThread(Bridge(broker.endpoint, connect_timeout=5)) as front,
    ):
        yield broker, embedders, front


@pytest.fixture
def api(mesh) -> openai.OpenAI:
    return mesh[2].client()


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


# ------------------------------------------------------------------------------------------ the gateway


def test_models_say_what_they_serve(api):
    capabilities = {model.id: model.capabilities for model in api.models.list()}
    assert capabilities == {MODEL: ["chat"], EMBED: ["embeddings"]}


def test_embeddings_of_a_list_as_floats_and_as_base64(api):
    floats = api.embeddings.create(model=EMBED, input=TEXTS, encoding_format="float")
    assert floats.object == "list" and floats.model == EMBED
    assert [item.index for item in floats.data] == [0, 1, 2]
    vectors = [item.embedding for item in floats.data]
    assert all(len(vector) == SIZE for vector in vectors)
    assert vectors[0] == vectors[1], "identical texts, identical vectors"
    assert vectors[0] != vectors[2] and cosine(vectors[0], vectors[2]) < 0.99
    assert floats.usage.prompt_tokens > 10 and floats.usage.total_tokens == floats.usage.prompt_tokens

    raw = api.embeddings.create(model=EMBED, input=TEXTS, encoding_format="base64")
    decoded = [list(struct.unpack(f"<{SIZE}f", base64.b64decode(item.embedding))) for item in raw.data]
    assert all(cosine(a, b) > 0.9999 for a, b in zip(decoded, vectors, strict=True))
    default = api.embeddings.create(model=EMBED, input=TEXTS[2])  # the client asks for base64 and decodes it
    assert len(default.data) == 1 and cosine(default.data[0].embedding, vectors[2]) > 0.9999


def test_dimensions_must_be_the_models_size(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=EMBED, input="hello", dimensions=64)
    assert caught.value.body["param"] == "dimensions" and str(SIZE) in caught.value.body["message"]
    assert len(api.embeddings.create(model=EMBED, input="hello", dimensions=SIZE).data[0].embedding) == SIZE


def test_embeddings_from_a_chat_model_is_a_400_naming_model(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model=MODEL, input=TEXTS)
    assert caught.value.body["param"] == "model"
    assert caught.value.body["message"] == f"model '{MODEL}' does not serve embeddings"


def test_chat_to_an_embeddings_model_is_a_400_naming_model(api):
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert caught.value.body["param"] == "model"
    assert caught.value.body["message"] == f"model '{EMBED}' serves embeddings only"


# ------------------------------------------------------------------------------------------ the SDK


def test_embed_spreads_a_batch_over_the_free_embedding_slots(mesh):
    broker, embedders, _ = mesh
    texts = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(["cats", "ships", "tea", "rain"] * 3)]
    with QMeshClient(broker.endpoint) as client:
        vectors = client.embed(texts, model=EMBED)
        alone = client.embed(texts[7], model=EMBED)
    assert len(vectors) == len(texts) and all(len(vector) == SIZE for vector in vectors)
    assert [len(part.embeddings or []) for part in vectors.parts] == [6, 6]
    assert {part.worker for part in vectors.parts} == {node.worker_name for node in embedders}, "both served a part"
    assert cosine(vectors[7], alone[0]) > 0.9999, "the vectors come back in input order"
    assert vectors.prompt_tokens == sum(part.prompt_tokens or 0 for part in vectors.parts) > len(texts)


def test_embed_raises_mesh_errors_as_generate_does(mesh):
    with QMeshClient(mesh[0].endpoint) as client:
        with pytest.raises(MeshError) as caught:
            client.embed(TEXTS, model=MODEL)
        assert (caught.value.code, caught.value.param) == (p.BAD_REQUEST, "model")
        with pytest.raises(MeshError) as caught:
            client.embed(["fine", ""], model=EMBED)  # refused before it travels, as a worker would
        assert caught.value.code == p.BAD_REQUEST and "non-empty" in caught.value.message


def test_one_model_name_served_by_a_chat_and_an_embeddings_worker():
    """Each kind of request goes to the worker of its kind, under the one name: the broker's table of workers
    counts each one's prompt tokens."""
    with (
        BrokerThread() as broker,
        worker_threads(broker.endpoint, count=1, slots=1),
        worker_threads(broker.endpoint, count=1, slots=1, embeddings=True),
    ):
        wait_for_workers(broker.endpoint, MODEL, 2, 60)  # the second group counted the first one's worker
        with QMeshClient(broker.endpoint) as client:
            assert client.models()[MODEL]["capabilities"] == ["chat", "embeddings"]
            answer = client.generate("Say hi.", model=MODEL, max_tokens=4)
            vectors = client.embed(TEXTS, model=MODEL)
            served = {tuple(w["info"]["capabilities"]): w["prompt_tokens"] for w in client.workers()}
    assert answer.text and len(vectors) == len(TEXTS) and len(vectors[0]) == SIZE
    assert served == {("chat",): answer.prompt_tokens, ("embeddings",): vectors.prompt_tokens}


# ------------------------------------------------------------------------------------------ no llama-server


def test_a_batch_is_split_in_order_into_runs_of_about_equal_characters():
    assert split_texts(["a", "b", "c", "d"], 2) == [["a", "b"], ["c", "d"]]
    assert split_texts(["a" * 30, "b", "c", "d"], 2) == [["a" * 30], ["b", "c", "d"]]
    assert split_texts(["a", "b"], 5) == [["a"], ["b"]], "no more runs than texts"
    assert split_texts(["a", "b"], 0) == [["a", "b"]], "one run when no slot is known free"
    texts = [str(i) * (i % 7 + 1) for i in range(50)]
    for parts in range(1, 9):
        runs = split_texts(texts, parts)
        assert len(runs) == parts and all(runs) and [t for run in runs for t in run] == texts


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ["a"]}, "model"),
        ({"model": EMBED}, "input"),
        ({"model": EMBED, "input": [1, 2, 3]}, "input"),
        ({"model": EMBED, "input": []}, "input"),
        ({"model": EMBED, "input": ["a", ""]}, "input"),
        ({"model": EMBED, "input": ["a"] * (MAX_EMBED_INPUTS + 1)}, "input"),
        ({"model": EMBED, "input": "a", "encoding_format": "int8"}, "encoding_format"),
        ({"model": EMBED, "input": "a", "dimensions": 0}, "dimensions"),
    ],
    ids=["no-model", "no-input", "token-ids", "empty-list", "empty-text", "too-many", "encoding", "dimensions"],
)
def test_an_embeddings_body_the_mesh_cannot_serve_is_a_400_naming_the_field(body: dict[str, Any], param: str):
    with pytest.raises(APIError) as caught:
        parse_embeddings(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_pooling_is_for_an_embeddings_worker():
    done = run_cli("qmesh-worker", "--model", MODEL, "--pooling", "cls")
    assert done.returncode == 2 and "--pooling applies to an embeddings worker" in done.stderr
