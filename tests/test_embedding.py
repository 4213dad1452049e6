"""Unit tests of one embeddings request on a slot thread (worker/embedding.py): the FINAL, calls, cancel, errors.

llama-server is replaced by ``FakeEmbeddingSidecar``, a fake that is the point here: it embeds each text as a
small vector computed from the text (exact in float32), counts a token per word, records every call, and can
refuse or cancel on a given call.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from qmesh.common import protocol as p
from qmesh.common.bodies import EmbeddingRequest, unpack_vector
from qmesh.common.errors import PromptTooLong, SidecarError, SidecarRefused
from qmesh.worker.embedding import CALL_CHARS, Embedding, calls
from qmesh.worker.generation import Job
from qmesh.worker.http_client import Embedded


def vector_of(text: str) -> list[float]:
    return [float(len(text)), ord(text[0]) / 4, -0.5]


class FakeEmbeddingSidecar:
    def __init__(self, on_call: Callable[[int], None] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.on_call = on_call or (lambda index: None)

    def embed(self, inputs: list[str]) -> Embedded:
        self.on_call(len(self.calls))
        self.calls.append(list(inputs))
        return Embedded([vector_of(text) for text in inputs], sum(len(text.split()) for text in inputs))


def run(texts: list[str], sidecar: FakeEmbeddingSidecar, job: Job | None = None) -> dict:
    finals: list[bytes] = []
    job = job or Job(b"key", EmbeddingRequest(texts), connection=1)
    Embedding(job, sidecar, finals.append, worker_name="host/1/0", model="smollm2-135m").run()
    (final,) = finals
    return p.unpack(final)


def test_one_final_carries_every_vector_in_order_as_float32_bytes() -> None:
    texts = ["hello world", "a cat", "the quick brown fox"]
    final = run(texts, FakeEmbeddingSidecar())
    assert set(final) == {"embeddings", "prompt_tokens", "worker", "model"}
    assert [unpack_vector(vector) for vector in final["embeddings"]] == [vector_of(text) for text in texts]
    assert all(len(vector) == 3 * 4 for vector in final["embeddings"])
    assert (final["prompt_tokens"], final["worker"], final["model"]) == (8, "host/1/0", "smollm2-135m")


def test_texts_go_to_llama_server_a_few_thousand_characters_at_a_time_in_order() -> None:
    texts = ["x" * (CALL_CHARS // 2), "y" * (CALL_CHARS // 2), "z", "w" * (CALL_CHARS * 2), "v"]
    sidecar = FakeEmbeddingSidecar()
    final = run(texts, sidecar)
    assert sidecar.calls == [texts[:2], texts[2:3], texts[3:4], texts[4:]]  # a longer text goes alone
    assert len(final["embeddings"]) == len(texts)
    assert list(calls([], CALL_CHARS)) == []


def test_a_job_cancelled_before_it_starts_asks_nothing_of_llama_server() -> None:
    job = Job(b"key", EmbeddingRequest(["a"]), connection=1)
    job.cancel()
    sidecar = FakeEmbeddingSidecar()
    assert run(["a"], sidecar, job)["error"]["code"] == p.CANCELLED
    assert sidecar.calls == []


def test_a_cancel_takes_effect_between_calls() -> None:
    job = Job(b"key", EmbeddingRequest(["x" * CALL_CHARS, "y" * CALL_CHARS, "z"]), connection=1)
    sidecar = FakeEmbeddingSidecar(on_call=lambda index: job.cancel() if index == 0 else None)
    assert run(job.request.inputs, sidecar, job)["error"]["code"] == p.CANCELLED
    assert len(sidecar.calls) == 1


@pytest.mark.parametrize(
    ("refusal", "reason"),
    [
        (PromptTooLong(3001, 2048), "a text is 3001 tokens; smollm2-135m embeds at most 2048 per text"),
        (SidecarRefused("the model server refused the request: no"), "the model server refused the request: no"),
    ],
    ids=["too-long", "refused"],
)
def test_what_llama_server_refuses_is_the_callers_400(refusal: Exception, reason: str) -> None:
    def refuse(index: int) -> None:
        raise refusal

    error = run(["a text"], FakeEmbeddingSidecar(on_call=refuse))["error"]
    assert error == {"code": p.BAD_REQUEST, "message": reason}


def test_a_failing_llama_server_is_raised_for_the_slot_thread_to_report() -> None:
    def fail(index: int) -> None:
        raise SidecarError("llama-server at http://127.0.0.1:1/v1/embeddings could not be reached")

    with pytest.raises(SidecarError):
        Embedding(
            Job(b"key", EmbeddingRequest(["a"]), connection=1),
            FakeEmbeddingSidecar(on_call=fail),
            lambda body: None,
            worker_name="w",
            model="m",
        ).run()
