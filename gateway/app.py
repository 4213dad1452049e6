"""The ASGI application: OpenAI's ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` over the mesh.

A request is checked, sent through the bridge, and answered once its first event arrives: an error before the
first token gets its proper HTTP status (404, 503, 504...); after that the answer streams as server-sent events
(or is collected for ``stream: false``). An error in the middle of a stream becomes an SSE event with an
``error`` object. An HTTP client that goes away cancels its generation upstream, whether it was waiting,
streaming or waiting for a whole answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qmesh.client.sdk import Result
from qmesh.common import protocol as p
from qmesh.common.errors import MeshError
from qmesh.gateway import dashboard
from qmesh.gateway.bridge import Bridge, BridgedRequest, Delta, Event
from qmesh.gateway.errors import SERVER, APIError, bad_request, from_mesh, invalid_api_key
from qmesh.gateway.openai_api import (
    Answer,
    EmbeddingsRequest,
    OpenAIRequest,
    parse_chat,
    parse_embeddings,
    parse_text,
)

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # and no buffering in nginx either


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was complete."""


def create_app(bridge: Bridge, api_keys: Sequence[str] = ()) -> Starlette:
    """The gateway app; it starts and stops ``bridge`` with its lifespan. No ``api_keys``: no authentication."""
    keys = [key.encode() for key in api_keys if key]

    def authorize(request: Request) -> None:
        if not keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        token = given.strip().encode()
        # Compare with every key so the time taken says nothing about which one (or how much of it) matched.
        matches = [hmac.compare_digest(token, key) for key in keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise invalid_api_key()

    async def list_models(request: Request) -> Response:
        authorize(request)
        try:
            served = await bridge.models()
        except MeshError as exc:  # no broker (503), or its refusal (403: the gateway's key is not a client key)
            raise from_mesh(exc) from exc
        data = [_model_object(name, service) for name, service in sorted(served.items()) if service.get("workers")]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(request: Request) -> Response:
        authorize(request)
        return await _complete(request, bridge, parse_chat(await _json(request), request.headers.get("x-session-id")))

    async def completions(request: Request) -> Response:
        authorize(request)
        return await _complete(request, bridge, parse_text(await _json(request), request.headers.get("x-session-id")))

    async def embeddings(request: Request) -> Response:
        authorize(request)
        return await _embed(request, bridge, parse_embeddings(await _json(request)))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        bridge.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            bridge.stop()

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    routes += dashboard.routes(bridge, authorize)  # /dashboard, its data and assets; / redirects there
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _internal_error}
    return Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)  # type: ignore[arg-type]


def _model_object(name: str, service: dict[str, Any]) -> dict[str, Any]:
    """One model of ``/v1/models``, with ``context_length`` (tokens per request, prompt and answer together; the
    field vLLM and OpenRouter use) when its workers announce it, and ``capabilities``: chat and/or embeddings."""
    model: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "qmesh"}
    model["capabilities"] = service.get("capabilities", [p.CHAT])
    if "context" in service:
        model["context_length"] = service["context"]
    return model


async def _json(request: Request) -> Any:
    """The body as JSON, read no further than the largest message the mesh takes (413 beyond)."""
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > p.MAX_BODY_BYTES:
            raise APIError(413, f"the request body is larger than {p.MAX_BODY_BYTES} bytes", code="request_too_large")
        parts.append(part)
    try:
        return json.loads(b"".join(parts))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from exc


async def _complete(request: Request, bridge: Bridge, openai_request: OpenAIRequest) -> Response:
    """Each of the request's ``n`` choices is a mesh request of its own, spread over free slots."""
    choices = [bridge.submit(openai_request.model, **options) for options in _choice_options(openai_request)]
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        first = await _next(choices[0], watcher)
        if isinstance(first, Result) and first.error is not None:
            raise from_mesh(first.error)
        if openai_request.stream:
            watcher.cancel()  # from here Starlette's StreamingResponse watches for the disconnect itself
            return StreamingResponse(
                _sse(bridge, choices, openai_request, first), media_type="text/event-stream", headers=SSE_HEADERS
            )
        answers = [
            await _whole(bridged, watcher, first if index == 0 else None) for index, bridged in enumerate(choices)
        ]
        return JSONResponse(openai_request.response(answers))
    except ClientGone:
        for bridged in choices:
            bridge.cancel(bridged)
        log.info("client went away; cancelled its %s request", openai_request.model)
        return Response(status_code=499)
    except APIError:
        for bridged in choices:  # one choice failed: the others are not wanted
            bridge.cancel(bridged)
        raise
    finally:
        watcher.cancel()


async def _embed(request: Request, bridge: Bridge, embeddings: EmbeddingsRequest) -> Response:
    """An embeddings request has one event: its Result, with every vector (spread over the model's free embedding
    slots by the bridge's client) or the error."""
    bridged = bridge.submit_embeddings(embeddings.model, embeddings.inputs)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        result = await _next(bridged, watcher)
    except ClientGone:
        bridge.cancel(bridged)
        log.info("client went away; cancelled its %s embeddings", embeddings.model)
        return Response(status_code=499)
    finally:
        watcher.cancel()
    assert isinstance(result, Result)
    if result.error is not None:
        raise from_mesh(result.error)
    return JSONResponse(embeddings.response(result))


def _choice_options(openai_request: OpenAIRequest) -> list[dict[str, Any]]:
    """The submit options of each choice: with a seed, choice i samples with seed + i, so the choices differ."""
    options, seed = openai_request.options, openai_request.options.get("seed")
    if seed is None:
        return [options] * openai_request.n
    return [{**options, "seed": (seed + index) % 2**63} for index in range(openai_request.n)]


async def _whole(bridged: BridgedRequest, watcher: asyncio.Future[None], first: Event | None) -> Answer:
    parts: list[str] = []
    logprobs: list[dict[str, Any]] = []
    event = first if first is not None else await _next(bridged, watcher)
    while isinstance(event, Delta):
        parts.append(event.text)
        logprobs += event.logprobs
        event = await _next(bridged, watcher)
    if event.error is not None:
        raise from_mesh(event.error)
    return Answer("".join(parts), logprobs, event)


async def _next(bridged: BridgedRequest, watcher: asyncio.Future[None]) -> Event:
    """The next event of a bridged request, or ClientGone if the client disconnects first."""
    if not bridged.events.empty():
        return await bridged.next()
    getter = asyncio.ensure_future(bridged.next())
    await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    raise ClientGone


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only ``http.disconnect`` can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(choices: list[BridgedRequest], first: Event) -> AsyncIterator[tuple[int, Event]]:
    """(choice index, event) of every choice as they arrive, until each has ended."""
    if len(choices) == 1:  # nothing to merge: no task per event, the stream's hot path
        event = first
        yield 0, event
        while not isinstance(event, Result):
            event = await choices[0].next()
            yield 0, event
        return
    pending = {asyncio.ensure_future(bridged.next()): index for index, bridged in enumerate(choices[1:], 1)}
    yield 0, first
    if not isinstance(first, Result):
        pending[asyncio.ensure_future(choices[0].next())] = 0
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                event = task.result()
                yield index, event
                if not isinstance(event, Result):
                    pending[asyncio.ensure_future(choices[index].next())] = index
    finally:
        for task in pending:
            task.cancel()


async def _sse(
    bridge: Bridge, choices: list[BridgedRequest], openai_request: OpenAIRequest, first: Event
) -> AsyncIterator[bytes]:
    """The stream as server-sent events, the choices' chunks as they come; leaving it early (a disconnect)
    cancels the generations."""
    results: list[Result] = []
    texts = _TextEvents(openai_request)
    try:
        for index in range(len(choices)):
            opening = openai_request.first_chunk(index)
            if opening is not None:
                yield _data(opening)
        async for index, event in _events(choices, first):
            if isinstance(event, Delta):
                if event.text and not event.logprobs:
                    yield texts.event(index, event.text)
                else:
                    yield _data(openai_request.chunk(index, event.text, event.logprobs))
                continue
            if event.error is not None:
                yield _data(from_mesh(event.error).body())
                yield DONE
                return
            results.append(event)
            for chunk in openai_request.last_chunks(index, event):
                yield _data(chunk)
        if openai_request.include_usage:
            yield _data(openai_request.usage_chunk(results))
        yield DONE
    finally:
        for bridged in choices:
            if not bridged.finished:
                bridge.cancel(bridged)
                log.info("client went away mid-stream; cancelled its %s request", openai_request.model)


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # json.dumps would make one per call
_encode = _ENCODER.encode
DONE = b"data: [DONE]\n\n"


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + _encode(obj).encode() + b"\n\n"


class _TextEvents:
    """The event of a choice's text chunk (no log-probabilities), byte for byte what ``_data(request.chunk(index,
    text))`` makes: the chunk object is encoded once per choice around a placeholder, and each token only encodes
    its text as a JSON string between the two halves, instead of building and encoding the whole object."""

    PLACEHOLDER = "\x00text\x00"

    def __init__(self, openai_request: OpenAIRequest) -> None:
        self.openai_request = openai_request
        self.halves: dict[int, tuple[bytes, bytes]] = {}

    def event(self, index: int, text: str) -> bytes:
        halves = self.halves.get(index)
        if halves is None:
            marker = _encode(self.PLACEHOLDER).encode()
            before, found, after = _data(self.openai_request.chunk(index, self.PLACEHOLDER)).partition(marker)
            assert found and marker not in after, "the placeholder must appear exactly once"
            halves = self.halves[index] = before, after
        before, after = halves
        return before + _encode(text).encode() + after


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths and wrong methods, in the same error shape as everything else."""
    assert isinstance(exc, HTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else SERVER
    return JSONResponse(APIError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error on %s", request.url.path, exc_info=exc)
    return JSONResponse(APIError(500, "internal error in the gateway", SERVER).body(), status_code=500)
