"""One embeddings request on a slot thread: the vectors of its texts, from llama-server, in one FINAL.

An embedding streams nothing, so it sends no PARTIALs and needs no credit: the FINAL is
``{"embeddings": [vector, ...], "prompt_tokens": n, "worker": name, "model": service}``, each vector as
little-endian float32 bytes (``common.bodies.pack_vector``). The texts go to llama-server a few at a time
(``CALL_CHARS``), so that a cancel takes effect between calls and no call runs into the HTTP read timeout.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from qmesh.common import protocol as p
from qmesh.common.bodies import EmbeddingRequest, final_body, pack_vector
from qmesh.common.errors import PromptTooLong, SidecarRefused
from qmesh.worker.generation import Job, SendBody
from qmesh.worker.http_client import Embedded

CALL_CHARS = 16_000  # characters of text per llama-server call: about 4000 tokens, seconds on a small CPU


class EmbeddingSidecar(Protocol):
    """What an embedding asks of llama-server: ``worker.http_client.LlamaHttpClient``."""

    def embed(self, inputs: list[str]) -> Embedded: ...


class Embedding:
    """Runs ``job`` (an EmbeddingRequest) against llama-server: ``send_final`` once, with every vector or an error."""

    def __init__(
        self,
        job: Job,
        sidecar: EmbeddingSidecar,
        send_final: SendBody,
        *,
        worker_name: str,
        model: str,
        model_sha256: str | None = None,
    ) -> None:
        assert isinstance(job.request, EmbeddingRequest)
        self.job = job
        self.request = job.request
        self.sidecar = sidecar
        self.send_final = send_final
        self.worker_name = worker_name
        self.model = model
        self.model_sha256 = model_sha256  # the model file's, when known: each answer says which file made it

    def run(self) -> None:
        """Raises SidecarError if llama-server fails; every other ending sends a FINAL (a text longer than the
        model embeds at once, or one llama-server refuses: a 400, the caller's error)."""
        vectors: list[bytes] = []
        prompt_tokens = 0
        for texts in calls(self.request.inputs, CALL_CHARS):
            if self.job.cancelled.is_set():  # the client has its 499 already; this ends the slot's work
                self.send_final(p.error_body(p.CANCELLED, "cancelled"))
                return
            try:
                embedded = self.sidecar.embed(texts)
            except PromptTooLong as exc:
                message = f"a text is {exc.prompt_tokens} tokens; {self.model} embeds at most {exc.context} per text"
                self.send_final(p.error_body(p.BAD_REQUEST, message))
                return
            except SidecarRefused as exc:
                self.send_final(p.error_body(p.BAD_REQUEST, str(exc)))
                return
            vectors += [pack_vector(vector) for vector in embedded.vectors]
            prompt_tokens += embedded.prompt_tokens
        provenance = {"model_sha256": self.model_sha256} if self.model_sha256 is not None else {}
        summary = final_body(
            embeddings=vectors, prompt_tokens=prompt_tokens, worker=self.worker_name, model=self.model, **provenance
        )
        self.send_final(summary)


def calls(texts: list[str], chars: int) -> Iterator[list[str]]:
    """``texts`` in order, in groups of at most ``chars`` characters (a longer text goes alone)."""
    group: list[str] = []
    size = 0
    for text in texts:
        if group and size + len(text) > chars:
            yield group
            group, size = [], 0
        group.append(text)
        size += len(text)
    if group:
        yield group
