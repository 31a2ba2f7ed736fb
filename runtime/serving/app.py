"""The FastAPI app: /v1/generate, health, readiness and metrics, plus the KServe v2 routes.

`create_app(engine, options)` wires an `Engine` to HTTP with a validated `ServerOptions`. By
default the app's lifespan starts the engine (warm-up runs in a thread, so /healthz answers and
/readyz says 503 meanwhile) and closes it at shutdown, after uvicorn has let in-flight requests
finish. Every failure reaches the client as one JSON line: RequestError 4xx, SetupError and
anything unexpected 5xx naming only its kind (the log has the rest), never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.errors import RequestError, SetupError
from runtime.image import infotext, png_bytes
from runtime.options import ResolvedOptions
from runtime.pipeline import Result
from runtime.serving.auth import bearer_auth
from runtime.serving.dispatch import generate, prepare, request_timeout
from runtime.serving.engine import Engine, one_line
from runtime.serving.errors import describe_validation, error_response, server_fault, unparsable_body
from runtime.serving.kserve import build_router
from runtime.serving.metrics import Metrics, MetricsMiddleware
from runtime.serving.middleware import BodyMiddleware, ShutdownMiddleware
from runtime.serving.options import ServerOptions
from runtime.serving.schemas import ErrorResponse, GenerateRequest, GenerateResponse, GenerationParameters

log = logging.getLogger(__name__)


def wants_png(accept: str) -> bool:
    """True when Accept ranks image/png above application/json (ties: whichever comes first)."""
    best: tuple[float, int, bool] | None = None
    for position, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        if media.lower() not in ("image/png", "application/json"):
            continue
        q = 1.0
        for param in params:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        candidate = (q, -position, media.lower() == "image/png")
        if q > 0 and (best is None or candidate[:2] > best[:2]):
            best = candidate
    return bool(best and best[2])


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed JSON",
        415: "body not sent as application/json",
        401: "missing or wrong bearer token",
        413: "body too large",
        422: "a parameter is of the wrong type or out of range (the message names it)",
        429: "queue full; see Retry-After",
        503: "warming up or shutting down",
        504: "the request's deadline passed; generation cancelled",
    }.items()
}


def create_app(
    engine: Engine,
    options: ServerOptions | None = None,
    *,
    manage_engine: bool = True,
    on_start_failure: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app for `engine`. manage_engine: the lifespan starts the engine and closes it at shutdown
    (Ray replicas start their own); on_start_failure(exc): told when that start (warm-up) fails."""
    options = (options or ServerOptions()).validate()
    limits = options.limits
    backend_name = options.backend.backend
    metrics = Metrics(engine)
    auth = bearer_auth(options.token)
    model_dir = engine.bundle.root.resolve().name

    def started(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and on_start_failure is not None:
            on_start_failure(task.exception())  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starter = asyncio.create_task(asyncio.to_thread(engine.start)) if manage_engine else None
        if starter is not None:
            starter.add_done_callback(started)
        yield
        if manage_engine:
            await asyncio.to_thread(engine.close, options.shutdown_grace_s)
        if starter is not None and starter.done() and not starter.cancelled() and starter.exception():
            log.error("the engine had failed to start: %s", one_line(engine.error or "unknown error"))

    app = FastAPI(
        title="sdrt",
        version="0.1.0",
        summary="Stable Diffusion 1.x on ONNX Runtime: JSON/PNG API and the KServe v2 (Triton) protocol",
        lifespan=lifespan,
    )
    # Added inner first: Metrics sees every answer (503 at shutdown too), then the shutdown guard,
    # then the body reader, which counts a request in flight only once its body has arrived.
    app.add_middleware(BodyMiddleware, max_bytes=limits.max_body_bytes, timeout_s=limits.read_timeout_s,
                       in_flight=metrics.http_in_flight)  # fmt: skip
    app.add_middleware(ShutdownMiddleware, grace_s=options.shutdown_grace_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = describe_validation(exc.errors())
        return error_response(request.url.path, status, message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400:  # FastAPI's opaque "error parsing the body": say why when known
            message = unparsable_body(exc.__cause__) or message
        return error_response(request.url.path, exc.status_code, message, dict(exc.headers or {}))

    @app.exception_handler(RequestError)
    async def on_bad_request(request: Request, exc: RequestError) -> JSONResponse:
        return error_response(request.url.path, 422, str(exc))

    @app.exception_handler(SetupError)
    async def on_broken_setup(request: Request, exc: SetupError) -> JSONResponse:
        log.error("%s: %s", request.url.path, one_line(str(exc)))
        fault = server_fault(exc)
        return error_response(request.url.path, fault.status_code, str(fault.detail))

    @app.exception_handler(Exception)
    async def on_crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {type(exc).__name__}")

    @app.get("/healthz", tags=["health"], summary="liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="readiness: warmed up, accepting work",
        responses={503: {"model": ErrorResponse}},
    )
    async def readyz() -> JSONResponse:
        if engine.ready:
            depth, running = engine.queue_depth, engine.in_flight
            return JSONResponse({"status": "ready", "queue_depth": depth, "in_flight": running})
        reason = engine.error or ("warming up" if not engine.closing else "shutting down")
        return error_response("/readyz", 503, reason)

    @app.get("/metrics", tags=["health"], dependencies=[Depends(auth)], summary="Prometheus text format")
    async def metrics_text() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def _record(result: Result, batch_size: int) -> None:
        metrics.images.inc(len(result.images))
        metrics.batch_size.observe(batch_size)
        for score in result.clip_scores or ():
            metrics.clip_score.observe(score)

    @app.post(
        "/v1/generate",
        tags=["generate"],
        dependencies=[Depends(auth)],
        response_model=GenerateResponse,
        responses={200: {"content": {"image/png": {}}, "description": "JSON, or the first image"}, **_ERRORS},
        summary="prompt in, images out (JSON with base64 PNGs, or one PNG with Accept: image/png)",
    )
    async def generate_v1(body: GenerateRequest, request: Request) -> Response:
        def resolve() -> ResolvedOptions:  # RequestError: 422 (on_bad_request)
            return prepare(body.to_options(options.lora_dir), engine, limits)

        # Decoding and resizing an init image takes CPU time: not on the event loop.
        resolved = await asyncio.to_thread(resolve) if body.has_images else resolve()
        result = await generate(request, engine, resolved, request_timeout(body.timeout, limits), _record)
        precision = engine.pipeline.backend.precision
        texts = [infotext(result, i, backend_name, precision, model_dir) for i in range(len(result.images))]
        pngs = await asyncio.to_thread(
            lambda: [png_bytes(im, t) for im, t in zip(result.images, texts, strict=True)]
        )
        if wants_png(request.headers.get("accept", "")):
            headers = {"X-Seed": str(result.seeds[0])}
            if result.clip_scores is not None:
                headers["X-Clip-Score"] = f"{result.clip_scores[0]:.4f}"
            return Response(pngs[0], media_type="image/png", headers=headers)
        payload = GenerateResponse(
            images=[base64.b64encode(png).decode() for png in pngs],
            seeds=result.seeds,
            infotexts=texts,
            parameters=GenerationParameters.from_options(result.options),
            timings=result.timings,
            clip_scores=result.clip_scores,
        )
        return JSONResponse(payload.model_dump())

    app.include_router(
        build_router(engine, limits, options.model_name, backend_name, auth, _record, options.lora_dir)
    )
    return app
