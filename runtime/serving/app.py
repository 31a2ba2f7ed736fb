"""The FastAPI app: /v1/generate, health, readiness and metrics, plus the KServe v2 routes.

`create_app(engine, settings)` wires an `Engine` to HTTP. By default the app's lifespan starts
the engine (warm-up runs in a thread, so /healthz answers and /readyz says 503 meanwhile) and
closes it at shutdown, after uvicorn has let in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from runtime.image import infotext, png_bytes
from runtime.pipeline import Result
from runtime.serving.auth import bearer_auth
from runtime.serving.body_limit import BodyLimitMiddleware
from runtime.serving.dispatch import generate, prepare, request_timeout
from runtime.serving.engine import Engine
from runtime.serving.errors import describe_validation, error_response
from runtime.serving.kserve import build_router
from runtime.serving.limits import Limits
from runtime.serving.metrics import Metrics, MetricsMiddleware
from runtime.serving.schemas import ErrorResponse, GenerateRequest, GenerateResponse, GenerationParameters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str = "sdrt"  # the KServe v2 model name
    backend: str = "onnxruntime"  # for the PNGs' "Backend" setting, as the CLI writes it
    limits: Limits = field(default_factory=Limits)
    token: str | None = None  # bearer token for /v1, /v2 models and /metrics; None: open
    shutdown_grace_s: float = 30.0  # engine.close() budget once uvicorn has drained connections
    manage_engine: bool = True  # lifespan starts and closes the engine


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


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    limits = settings.limits
    metrics = Metrics(engine)
    auth = bearer_auth(settings.token)
    model_dir = engine.bundle.root.resolve().name

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starter = asyncio.create_task(asyncio.to_thread(engine.start)) if settings.manage_engine else None
        yield
        if settings.manage_engine:
            await asyncio.to_thread(engine.close, settings.shutdown_grace_s)
        if starter is not None and starter.done() and not starter.cancelled() and starter.exception():
            log.error("the engine had failed to start: %s", engine.error)

    app = FastAPI(
        title="sdrt",
        version="0.1.0",
        summary="Stable Diffusion 1.x on ONNX Runtime: JSON/PNG API and the KServe v2 (Triton) protocol",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, message = describe_validation(exc.errors())
        return error_response(request.url.path, status, message)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(request.url.path, exc.status_code, str(exc.detail), dict(exc.headers or {}))

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

    @app.post(
        "/v1/generate",
        tags=["generate"],
        dependencies=[Depends(auth)],
        response_model=GenerateResponse,
        responses={200: {"content": {"image/png": {}}, "description": "JSON, or the first image"}, **_ERRORS},
        summary="prompt in, images out (JSON with base64 PNGs, or one PNG with Accept: image/png)",
    )
    async def generate_v1(body: GenerateRequest, request: Request) -> Response:
        try:
            options = prepare(body.to_options(), engine, limits)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        result = await generate(request, engine, options, request_timeout(body.timeout, limits), _record)
        precision = engine.pipeline.backend.precision
        texts = [
            infotext(result, i, settings.backend, precision, model_dir) for i in range(len(result.images))
        ]
        pngs = await asyncio.to_thread(
            lambda: [png_bytes(im, t) for im, t in zip(result.images, texts, strict=True)]
        )
        if wants_png(request.headers.get("accept", "")):
            return Response(pngs[0], media_type="image/png", headers={"X-Seed": str(result.seeds[0])})
        payload = GenerateResponse(
            images=[base64.b64encode(png).decode() for png in pngs],
            seeds=result.seeds,
            infotexts=texts,
            parameters=GenerationParameters.from_options(result.options),
            timings=result.timings,
        )
        return JSONResponse(payload.model_dump())

    app.include_router(build_router(engine, limits, settings.model_name, settings.backend, auth, _record))
    return app
