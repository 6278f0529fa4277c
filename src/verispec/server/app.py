"""The OpenAI-compatible HTTP API on FastAPI, in front of a :class:`Scheduler`.

``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as
server-sent events or not), ``GET /v1/models``, ``GET /health``,
``GET /metrics`` (Prometheus), ``GET /openapi.json``, and the playground page
at ``/`` (:mod:`verispec.server.playground`). Every error is a JSON body in
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Extension: a request's ``verispec`` object picks the drafter and draft length
for that request and, streamed, asks for each token's origin in a ``verispec``
field of the chunks (:class:`verispec.server.schemas.Provenance`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from verispec.errors import VerispecError
from verispec.generate import encode_prompt
from verispec.sampling import SamplingParams
from verispec.server import schemas as s
from verispec.server.metrics import Metrics
from verispec.server.playground import add_playground
from verispec.server.scheduler import (
    GenerationRequest,
    QueueFullError,
    Scheduler,
    ShuttingDownError,
    Update,
    asyncio_delivery,
)
from verispec.stats import GenerationStats

log = logging.getLogger("verispec.server")
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.5
GREEDY_BELOW = 1e-5  # temperatures under this decode greedily (as vLLM does)
MIN_TOP_P = 1e-6
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorResponse, "description": what}
    for code, what in [
        (400, "Invalid request (bad JSON, a field of the wrong type or out of range, a limit)"),
        (401, "Missing or wrong API key (only with --api-key)"),
        (429, "The queue is full; retry after the Retry-After header's seconds"),
        (503, "The server is shutting down"),
    ]
}
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "JSON: a ChatCompletionChunk (chat) or a CompletionChunk "
            "(completions), or an error object; the last event is [DONE]",
        },
        "event": {"type": "string"},
    },
}
_SSE = {"content": {"text/event-stream": {"schema": _SSE_EVENT}}}


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers


_BEARER = HTTPBearer(auto_error=False)


def _check_key(
    request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)]
) -> None:
    api_key = request.app.state.api_key
    if api_key is not None and (creds is None or creds.credentials != api_key):
        raise APIError(
            401,
            "missing or wrong API key (send 'Authorization: Bearer <key>')",
            code="invalid_api_key",
        )


def _error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def create_app(
    scheduler: Scheduler,
    *,
    model_name: str,
    api_key: str | None = None,
    max_tokens: int = 256,
    max_tokens_limit: int = 4096,
) -> FastAPI:
    """The app. ``max_tokens`` is the default when a request gives none;
    ``max_tokens_limit`` the most a request may ask for (the context window limits too)."""
    metrics: Metrics = scheduler.metrics or Metrics()
    scheduler.metrics = metrics
    target = scheduler.target
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not scheduler.alive:
            scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(
        title="verispec",
        version="0.1.0",
        summary="OpenAI-compatible server: continuous batching, lossless speculative decoding",
        lifespan=lifespan,
    )
    app.state.api_key = api_key
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    check_key = _check_key

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        body = _error_body(exc.message, exc.type, exc.param, exc.code)
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(
                _error_body("the request body is not valid JSON", "invalid_request_error"), 400
            )
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(loc) or None
        message = (
            f"{param}: {first.get('msg', 'invalid value')}"
            if param
            else first.get("msg", "invalid request")
        )
        return JSONResponse(_error_body(message, "invalid_request_error", param), 400)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = _error_body(str(exc.detail), "invalid_request_error")
        return JSONResponse(
            body, status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse(_error_body(f"internal error: {exc}", "server_error"), 500)

    @app.get("/health", response_model=s.Health)
    async def health() -> s.Health:
        return s.Health(status="ok", running=scheduler.num_running, waiting=scheduler.num_waiting)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get(
        "/v1/models",
        response_model=s.ModelList,
        responses=_ERRORS,
        dependencies=[Depends(check_key)],
    )
    async def models() -> s.ModelList:
        return s.ModelList(data=[s.ModelCard(id=model_name, created=created)])

    def prepare(body: s._GenerationFields, prompt_ids: list[int], param: str) -> GenerationRequest:
        limit_context = target.max_context - len(prompt_ids)
        if limit_context < 1:
            raise APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; the context window of {model_name} is "
                f"{target.max_context} tokens",
                param=param,
                code="context_length_exceeded",
            )
        limit = min(max_tokens_limit, limit_context)
        asked = getattr(body, "max_completion_tokens", None) or body.max_tokens
        if asked is not None and asked > limit:
            raise APIError(
                400,
                f"max_tokens is {asked}, but at most {limit} tokens can be generated here "
                f"(server limit {max_tokens_limit}; the prompt has {len(prompt_ids)} of the "
                f"{target.max_context}-token context window)",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        # A temperature this close to 0 is greedy (dividing logits by it overflows); a
        # top_p this small keeps only the most likely token (and must not round to 0).
        temperature = body.temperature if body.temperature >= GREEDY_BELOW else 0.0
        top_p = max(body.top_p, MIN_TOP_P)
        try:
            params = SamplingParams(
                temperature=temperature, top_k=body.top_k, top_p=top_p, seed=body.seed
            )
        except VerispecError as exc:
            raise APIError(400, str(exc)) from exc
        options = body.verispec or s.VerispecOptions.model_validate({})
        try:
            scheduler.drafter_for(options.drafter)
        except ValueError as exc:
            raise APIError(400, str(exc), param="verispec.drafter") from exc
        if options.provenance and not body.stream:
            raise APIError(400, "verispec.provenance needs stream: true", param="verispec")
        return GenerationRequest(
            prompt_ids=prompt_ids,
            params=params,
            max_tokens=asked or min(max_tokens, limit),
            stop=body.stop_list(),
            deliver=lambda update: None,
            drafter=options.drafter,
            num_draft_tokens=options.num_draft_tokens,
            provenance=options.provenance,
        )

    @app.post(
        "/v1/completions",
        response_model=s.CompletionResponse,
        responses={**_ERRORS, 200: _SSE},
        dependencies=[Depends(check_key)],
    )
    async def completions(body: s.CompletionRequest, request: Request) -> Any:
        received = time.perf_counter()
        prompt = (
            body.prompt[0]
            if isinstance(body.prompt, list) and isinstance(body.prompt[0], str)
            else body.prompt
        )
        if isinstance(prompt, list):
            bad = [t for t in prompt if not 0 <= t < target.vocab_size]  # type: ignore[operator]
            if bad:
                raise APIError(
                    400, f"token id {bad[0]} is outside [0, {target.vocab_size})", param="prompt"
                )
            ids = [int(t) for t in prompt]
        else:
            ids = _encode(target.tokenizer, str(prompt), chat=False, param="prompt")
        gen = prepare(body, ids, "prompt")
        return await run(gen, body, request, received, chat=False, endpoint="completions")

    @app.post(
        "/v1/chat/completions",
        response_model=s.ChatCompletionResponse,
        responses={**_ERRORS, 200: _SSE},
        dependencies=[Depends(check_key)],
    )
    async def chat_completions(body: s.ChatCompletionRequest, request: Request) -> Any:
        received = time.perf_counter()
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        ids = _encode(target.tokenizer, messages, chat=True, param="messages")
        gen = prepare(body, ids, "messages")
        return await run(gen, body, request, received, chat=True, endpoint="chat")

    async def run(
        gen: GenerationRequest,
        body: s._GenerationFields,
        request: Request,
        received: float,
        *,
        chat: bool,
        endpoint: str,
    ) -> Any:
        queue: asyncio.Queue[Update] = asyncio.Queue()
        gen.deliver = asyncio_delivery(asyncio.get_running_loop(), queue)
        try:
            scheduler.submit(gen)
        except QueueFullError as exc:
            metrics.requests.labels(endpoint=endpoint, status="429").inc()
            raise APIError(
                429,
                str(exc),
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from exc
        except ShuttingDownError as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down") from exc
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream(
                scheduler,
                gen,
                queue,
                meta,
                chat=chat,
                include_usage=include_usage,
                metrics=metrics,
                received=received,
                endpoint=endpoint,
            )
            return StreamingResponse(events, media_type="text/event-stream")
        text, reason, stats = "", None, None
        first = True
        try:
            while True:
                try:
                    update = await asyncio.wait_for(queue.get(), DISCONNECT_POLL_SECONDS)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if update.error is not None:
                    raise _generation_error(update.error)
                if first and update.num_tokens:
                    metrics.time_to_first_token.observe(time.perf_counter() - received)
                    first = False
                text += update.text
                if update.finish_reason is not None:
                    reason, stats = update.finish_reason, update.stats
                    break
        finally:
            scheduler.cancel(gen)
        metrics.request_latency.observe(time.perf_counter() - received)
        metrics.requests.labels(endpoint=endpoint, status="200").inc()
        assert stats is not None
        payload = {
            **meta,
            "usage": _usage(len(gen.prompt_ids), stats).model_dump(),
            "speculation": _speculation(stats).model_dump(),
        }
        if chat:
            message = {"role": "assistant", "content": text}
            payload["choices"] = [{"index": 0, "message": message, "finish_reason": reason}]
            return s.ChatCompletionResponse.model_validate(payload)
        payload["choices"] = [{"index": 0, "text": text, "finish_reason": reason}]
        return s.CompletionResponse.model_validate(payload)

    add_playground(
        app,
        scheduler,
        model_name=model_name,
        max_tokens=max_tokens,
        max_tokens_limit=max_tokens_limit,
        api_key_required=api_key is not None,
    )
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document without its default 422 responses: invalid input is a 400 here."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi
        from pydantic.json_schema import models_json_schema

        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        # The streamed chunk's shape, for readers of the document.
        _, chunk = models_json_schema(
            [(s.ChatCompletionChunk, "serialization"), (s.CompletionChunk, "serialization")],
            ref_template="#/components/schemas/{model}",
        )
        components.update(chunk["$defs"])
        app.openapi_schema = schema
    return app.openapi_schema


def _encode(tokenizer: Any, prompt: Any, *, chat: bool, param: str) -> list[int]:
    try:
        return encode_prompt(tokenizer, prompt, chat=chat)
    except VerispecError as exc:
        raise APIError(400, str(exc), param=param) from exc


def _generation_error(message: str) -> APIError:
    if "shutting down" in message:
        return APIError(503, message, type="server_error", code="shutting_down")
    return APIError(500, message, type="server_error")


def _usage(prompt_tokens: int, stats: GenerationStats) -> s.Usage:
    return s.Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=stats.new_tokens,
        total_tokens=prompt_tokens + stats.new_tokens,
        prompt_tokens_details=s.PromptTokensDetails(cached_tokens=stats.cached_prompt_tokens),
    )


def _speculation(stats: GenerationStats) -> s.Speculation:
    return s.Speculation(
        drafted=stats.drafted,
        accepted=stats.accepted,
        free_drafted=stats.free_drafted,
        acceptance_rate=stats.acceptance_rate,
        mean_accepted_length=stats.mean_accepted_length,
        target_passes=stats.target_passes,
    )


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _stream(
    scheduler: Scheduler,
    gen: GenerationRequest,
    queue: asyncio.Queue[Update],
    meta: dict[str, Any],
    *,
    chat: bool,
    include_usage: bool,
    metrics: Metrics,
    received: float,
    endpoint: str,
) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.

    A client that goes away cancels this generator; ``finally`` then takes the
    request out of the batch before the next target pass.
    """
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, reason: str | None, *, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"content": text} if text is not None else {}
            if role:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        return {**meta, "object": kind, "choices": [choice]}

    passes: list[s.PassRecord] = []  # provenance of passes whose text is still held back

    def with_provenance(payload: dict[str, Any], update: Update) -> dict[str, Any]:
        if update.provenance is not None:
            passes.extend(update.provenance.passes)
            provenance = s.Provenance(pieces=update.provenance.pieces, passes=list(passes))
            payload["verispec"] = provenance.model_dump(exclude_none=True)
            passes.clear()
        return payload

    try:
        if chat:
            yield _sse(chunk("", None, role=True))
        first = True
        while True:
            update = await queue.get()
            if update.error is not None:
                err = _generation_error(update.error)
                yield _sse(_error_body(err.message, err.type, code=err.code))
                break
            if first and update.num_tokens:
                metrics.time_to_first_token.observe(time.perf_counter() - received)
                first = False
            if update.finish_reason is None:
                if update.text:
                    yield _sse(with_provenance(chunk(update.text, None), update))
                elif update.provenance is not None:
                    passes.extend(update.provenance.passes)
                continue
            stats = update.stats
            assert stats is not None
            last = with_provenance(chunk(update.text or None, update.finish_reason), update)
            last["speculation"] = _speculation(stats).model_dump()
            yield _sse(last)
            if include_usage:
                usage = _usage(len(gen.prompt_ids), stats).model_dump()
                yield _sse({**meta, "object": kind, "choices": [], "usage": usage})
            metrics.request_latency.observe(time.perf_counter() - received)
            metrics.requests.labels(endpoint=endpoint, status="200").inc()
            break
        yield "data: [DONE]\n\n"
    finally:
        scheduler.cancel(gen)
