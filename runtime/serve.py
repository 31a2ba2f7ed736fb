"""`python -m runtime.serve --bundle DIR`: the HTTP server (FastAPI + uvicorn), on 127.0.0.1 by default.

Endpoints: POST /v1/generate, GET /healthz, /readyz, /metrics, the KServe v2 / Triton routes
under /v2, and the OpenAPI docs at /docs. SIGTERM / Ctrl-C stops accepting connections, lets
in-flight requests finish (up to --shutdown-grace seconds), then unloads the models.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from runtime.backends import BACKENDS, PRECISIONS, BackendError
from runtime.bundle import BundleError
from runtime.serving.engine import Engine, EngineConfig
from runtime.serving.limits import Limits

log = logging.getLogger("sdrt.serve")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__)
    p.add_argument("--bundle", type=Path, default=Path("bundles/tiny"), help="bundle from `python -m export`")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--device", default="cpu", help="onnxruntime device: cpu, cuda or tensorrt")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the backend's own")
    p.add_argument(
        "--threads", type=int, default=None, help="intra-op threads per session (default: cores / workers)"
    )
    p.add_argument("--workers", type=int, default=1, help="generations run concurrently")
    p.add_argument("--max-queue", type=int, default=16, help="waiting requests; more get 429")
    p.add_argument("--max-batch", type=int, default=1, help="same-shape requests merged per call (1: off)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long to wait for a batch to fill")
    p.add_argument("--token", default=os.environ.get("SDRT_TOKEN"), help="bearer token (or env SDRT_TOKEN)")
    p.add_argument("--model-name", default="sdrt", help="model name on the KServe v2 routes")
    p.add_argument("--no-warmup", action="store_true", help="skip running each model once at start")
    d = Limits()
    limits = p.add_argument_group("limits (per request)")
    limits.add_argument("--max-steps", type=int, default=d.max_steps)
    limits.add_argument("--max-side", type=int, default=d.max_side, help="pixels (default: the bundle's)")
    limits.add_argument("--max-images", type=int, default=d.max_images)
    limits.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars)
    limits.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    limits.add_argument("--timeout", type=float, default=d.timeout_s, help="deadline in seconds")
    p.add_argument("--shutdown-grace", type=float, default=30.0, help="seconds to finish in-flight work")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def engine_config(args: argparse.Namespace, max_queue: int) -> EngineConfig:
    """The engine options both servers take (`runtime.serve_ray` sizes the queue from Ray's limit)."""
    return EngineConfig(
        workers=args.workers,
        max_queue=max_queue,
        max_batch=args.max_batch,
        max_wait_s=args.max_wait_ms / 1000,
        warmup=not args.no_warmup,
    )


def limits_from_args(args: argparse.Namespace) -> Limits:
    """The per-request limits group, shared with `runtime.serve_ray`."""
    return Limits(
        max_steps=args.max_steps,
        max_side=args.max_side,
        max_images=args.max_images,
        max_prompt_chars=args.max_prompt_chars,
        max_body_bytes=args.max_body_bytes,
        timeout_s=args.timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn  # here, so `import runtime.serve` stays cheap

    from runtime.serving.app import ServerSettings, create_app

    if not is_loopback(args.host) and not args.token:
        log.warning("binding %s without --token: anyone who can reach it can generate", args.host)
    config = engine_config(args, args.max_queue)
    backend_options: dict[str, object] = {"threads": args.threads}
    if args.backend == "onnxruntime":
        backend_options["device"] = args.device
    try:
        engine = Engine.open(args.bundle, args.backend, args.precision, config, **backend_options)
    except (ValueError, BundleError, BackendError) as exc:
        log.error("error: %s", exc)
        return 2
    limits = limits_from_args(args)
    settings = ServerSettings(
        model_name=args.model_name,
        backend=args.backend,
        limits=limits,
        token=args.token,
        shutdown_grace_s=args.shutdown_grace,
    )
    app = create_app(engine, settings)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(args.shutdown_grace),
            access_log=args.log_level == "debug",
        )
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
