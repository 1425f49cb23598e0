"""The HTTP routes: OpenAI's (/v1/models, /v1/completions, /v1/chat/completions, streaming as
server-sent events ending in `data: [DONE]`), /health, /metrics (Prometheus text),
/v1/moespac/stats (the same as JSON, with the layers x experts map the chat page draws) and
the chat page at /.

With an API key every route but / and /health needs `Authorization: Bearer KEY` (as
llama-server: a page and a liveness probe carry no model output). A request waits for the
model in the worker's queue; a client that goes away, waiting or mid-stream, cancels its
request, which ends within one decode step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import errors
from .errors import ApiError, error_body
from .metrics import prometheus_text
from .schemas import ChatCompletionRequest, CompletionRequest, Sampling
from .worker import Job, ModelWorker

POLL_S = 0.25  # how often a waiting request looks for its client


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def next_item(job: Job, request: Request) -> tuple:
    """The job's next result, or ClientGone (and the job cancelled) if the client leaves first."""
    getter = asyncio.ensure_future(job.out.get())
    try:
        while True:
            done, _ = await asyncio.wait({getter}, timeout=POLL_S)
            if done:
                return getter.result()
            if await request.is_disconnected():
                job.cancelled.set()
                raise ClientGone
    finally:
        getter.cancel()


async def event_stream(job: Job, first: tuple):
    """Server-sent events of a streaming job, from its first result on."""
    try:
        kind, payload = first
        while kind == "chunk":
            yield f"data: {json.dumps(payload)}\n\n"
            kind, payload = await job.out.get()
        if kind == "error":  # after the first chunk the status is sent: the error is an event
            yield f"data: {json.dumps(error_body(payload.status, payload.message, payload.code))}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # finished, or the client went away (this generator is closed or cancelled)
        job.cancelled.set()


def create_app(worker: ModelWorker, api_key: str | None = None) -> FastAPI:
    """The app serving `worker`'s model; it starts the worker and, at shutdown, cancels what runs
    and stops it."""

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        worker.start()
        yield
        await run_in_threadpool(worker.close)

    app = FastAPI(title="moespac", version="1", lifespan=lifespan, docs_url=None, redoc_url=None)
    errors.install(app)
    page = resources.files(__package__).joinpath("static/index.html").read_text()
    model = worker.model
    names = {worker.model_id, model.model_path, Path(model.model_path).name, Path(model.model_path).stem}
    n_ctx, n_vocab = model.target.n_ctx, model.target.n_vocab

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send Authorization: Bearer KEY", code="invalid_api_key")

    guarded = [Depends(authorized)]

    def sampling_args(body: Sampling, limit: int | None) -> dict:
        if body.model is not None and body.model not in names:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; this server serves {worker.model_id!r}",
                code="model_not_found",
                param="model",
            )
        if limit is not None and limit != -1 and not 1 <= limit <= n_ctx:
            raise ApiError(
                400,
                f"max_tokens must be 1 to {n_ctx} (the context), or -1 (until the end of text or a full context), "
                f"got {limit}",
                code="invalid_value",
                param="max_tokens",
            )
        return dict(
            max_tokens=limit,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            stop=body.stop,
            seed=body.seed,
        )

    async def answer(request: Request, job: Job) -> Response:
        worker.submit(job)
        try:
            first = await next_item(job, request)
        except ClientGone:
            return Response(status_code=499)
        if first[0] == "error":
            raise first[1]
        if job.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(event_stream(job, first), media_type="text/event-stream", headers=headers)
        return JSONResponse(first[1])

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "busy": worker.running is not None, "queue_depth": worker.pending.qsize()}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": worker.model_id, "object": "model", "created": int(time.time()), "owned_by": "moespac"}],
        }

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request, body: CompletionRequest) -> Response:
        args = sampling_args(body, body.token_limit())
        if isinstance(body.prompt, list) and not all(0 <= t < n_vocab for t in body.prompt):
            raise ApiError(400, f"prompt token ids must be in 0..{n_vocab - 1}", code="invalid_value", param="prompt")
        opts = body.stream_options
        job = Job("completion", {"prompt": body.prompt, **args}, body.stream, bool(opts and opts.include_usage))
        return await answer(request, job)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
        args = sampling_args(body, body.token_limit())
        opts = body.stream_options
        job = Job("chat", {"messages": body.chat_messages(), **args}, body.stream, bool(opts and opts.include_usage))
        return await answer(request, job)

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> PlainTextResponse:
        stats = await run_in_threadpool(worker.stats, False)
        return PlainTextResponse(prometheus_text(stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/moespac/stats", dependencies=guarded)
    async def stats() -> dict:
        return await run_in_threadpool(worker.stats)

    return app
