"""One model served by one llama-server: the object a worker (or a script) uses to generate text.

It resolves the model and the binary up front, so a bad name fails before any process starts, and keeps a
single chat history for conversational use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qmesh.worker.binary import LlamaServerBinary, find_llama_server
from qmesh.worker.http_client import Completion, CompletionStream, LlamaHttpClient, Prompt
from qmesh.worker.models import ModelFile, resolve_model
from qmesh.worker.process import LlamaProcessManager

Message = dict[str, str]


class InferenceEngine:
    """A started llama-server for ``model`` plus a client for it; ``process_options`` go to the manager."""

    def __init__(self, model: str | Path, *, llama_server: str | None = None, **process_options: Any) -> None:
        self.model: ModelFile = resolve_model(str(model))
        self.binary: LlamaServerBinary = find_llama_server(llama_server)
        self.manager = LlamaProcessManager(self.model.path, self.binary, **process_options)
        self._client: LlamaHttpClient | None = None
        self._history: list[Message] = []

    @property
    def client(self) -> LlamaHttpClient:
        """A client for the manager's current address (a restart may have moved llama-server to a new port)."""
        if self._client is None or self._client.base_url != self.manager.base_url:
            if self._client is not None:
                self._client.close()
            self._client = LlamaHttpClient(self.manager.base_url)
        return self._client

    def start(self) -> None:
        self.manager.start()

    def dispose(self) -> None:
        """Stop llama-server and release the client. Idempotent."""
        self.manager.stop()
        if self._client is not None:
            self._client.close()
            self._client = None

    def generate(self, prompt: Prompt, **opts: Any) -> Completion:
        return self.client.generate(prompt, **opts)

    def generate_stream(self, prompt: Prompt, **opts: Any) -> CompletionStream:
        return self.client.generate_stream(prompt, **opts)

    @property
    def history(self) -> list[Message]:
        """The conversation so far (a copy): an optional system message, then user/assistant turns."""
        return list(self._history)

    def reset_history(self) -> None:
        self._history = []

    def chat_stream(self, user_message: str, *, system: str | None = None, **opts: Any) -> CompletionStream:
        """Stream the reply to ``user_message`` given the history; ``system`` sets (or replaces) the system
        message. The turn joins the history when the stream ends, or with the partial reply if it is closed
        early; a failed request leaves the history unchanged.
        """
        messages = [m for m in self._history if system is None or m["role"] != "system"]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        messages.append({"role": "user", "content": user_message})

        def remember(reply: Completion) -> None:
            self._history = [*messages, {"role": "assistant", "content": reply.text}]

        return self.client.chat_stream(messages, on_done=remember, **opts)

    def chat(self, user_message: str, *, system: str | None = None, **opts: Any) -> Completion:
        """Like :meth:`chat_stream`, returning the whole reply."""
        with self.chat_stream(user_message, system=system, **opts) as stream:
            for _ in stream:
                pass
        assert stream.result is not None
        return stream.result

    def __enter__(self) -> InferenceEngine:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()
