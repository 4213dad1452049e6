"""Domain exceptions shared by every QMesh component.

Each carries a message written for the person running the command: what went wrong, which file or address,
and what to do about it. Transport failures are raised ``from`` the underlying error.
"""

from __future__ import annotations


class QMeshError(Exception):
    """Base class of every error QMesh raises on purpose."""


class ConfigError(QMeshError):
    """A bad option, path or setting given by the user."""


class LlamaServerNotFound(QMeshError):
    """No usable llama-server binary was found."""


class ModelNotFound(QMeshError):
    """A model name or path does not lead to a GGUF file."""


class NotAGGUF(QMeshError):
    """A model file exists but is not a GGUF file."""


class SidecarError(QMeshError):
    """llama-server failed: it would not start, crashed, or answered with an error."""


class SidecarStartError(SidecarError):
    """llama-server did not become healthy (bad model, crash at load, timeout)."""


class SidecarRefused(QMeshError):
    """llama-server refused the request as invalid (a bad JSON schema, say): the caller's error (a 400)."""


class PromptTooLong(SidecarRefused):
    """The prompt does not fit the model's context: the caller's error, not llama-server's (a 400)."""

    def __init__(self, prompt_tokens: int, context: int) -> None:
        super().__init__(
            f"the prompt is {prompt_tokens} tokens; the model's context is {context} tokens per request: "
            "shorten the prompt (or the conversation)"
        )
        self.prompt_tokens = prompt_tokens
        self.context = context


class MeshError(QMeshError):
    """A request through the mesh ended in an error reply; ``code`` is one of the protocol's error codes, ``param``
    the part of the request at fault when the reply names one (``"model"``)."""

    def __init__(self, code: int, message: str, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param


class BrokerUnreachable(MeshError):
    """The broker cannot be reached: nothing accepts the connection, its handshake refused this side's keys, or it
    did not answer in time. MMI calls raise it; a request it ends carries it as its error, with code 504 (the
    request got no answer), so a caller that sorts errors by code needs nothing new."""

    def __init__(self, message: str) -> None:
        super().__init__(504, message)  # protocol.QUEUE_TIMEOUT (protocol imports this module)
        self.args = (message,)  # printed by the commands as is: the code means nothing to a person


class TransferFailed(QMeshError):
    """A model could not be pulled or pushed through the mesh: no holder, a refusal, bytes that did not verify, no
    disk space. The message names the model and what to do."""
