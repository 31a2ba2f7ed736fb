"""`python -m runtime.serve --bundle DIR`: the HTTP server (FastAPI + uvicorn), on 127.0.0.1 by default.

Endpoints: POST /v1/generate, GET /healthz, /readyz, /metrics, the KServe v2 / Triton routes
under /v2, and the OpenAPI docs at /docs. SIGTERM / Ctrl-C stops accepting connections, lets
in-flight requests finish (up to --shutdown-grace seconds; then they get a JSON 503 saying to
retry), then unloads the models. Exit status: 2 for a bad flag, 3 for a broken bundle or backend.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from runtime.backends.config import BACKENDS, PRECISIONS
from runtime.bundle import VERIFY_MODES
from runtime.cli import positive_int, report
from runtime.errors import EXIT_REQUEST, EXIT_SETUP, RequestError, SetupError
from runtime.serving.checks import SettingError
from runtime.serving.engine import Engine
from runtime.serving.options import LOG_LEVELS, ServerOptions

log = logging.getLogger("sdrt.serve")


def add_server_flags(p: argparse.ArgumentParser, exclude: Collection[str] = ()) -> None:
    """The flags both servers take, named as ServerOptions' flat keys with dashes. Unset flags stay
    out of the Namespace (SUPPRESS), so ServerOptions' own defaults apply: they are written once."""
    d = ServerOptions()
    b, e, lim = d.backend, d.engine, d.limits

    def add(group: Any, flag: str, help: str, **kw: Any) -> None:
        if flag.removeprefix("--").replace("-", "_") not in exclude:
            group.add_argument(flag, default=argparse.SUPPRESS, help=help, **kw)

    add(p, "--bundle", f"bundle from `python -m export` (default {d.bundle})", type=Path)
    add(p, "--verify", "bundle integrity: stamp (hash each file once, then check size/mtime/inode), "
        "full (hash at every start), off (default stamp)", choices=VERIFY_MODES)  # fmt: skip
    add(p, "--host", f"bind address (default {d.host}: loopback only)")
    add(p, "--port", f"1-65535 (default {d.port})", type=int)
    add(p, "--backend", f"default {b.backend}", choices=BACKENDS)
    add(p, "--device", "onnxruntime device: cpu (default), cuda or tensorrt")
    add(p, "--precision", "default: the backend's own", choices=PRECISIONS)
    add(p, "--threads", "intra-op threads per session (default: cores / workers)", type=positive_int)
    add(p, "--static-shapes", "compile per request shape, cached (openvino, onnxruntime cpu)",
        action="store_true")  # fmt: skip
    add(p, "--workers", f"generations run concurrently (default {e.workers})", type=int)
    add(p, "--max-queue", f"waiting requests; more get 429 (default {e.max_queue})", type=int)
    add(p, "--max-batch", f"same-shape requests merged per call (default {e.max_batch}: off)", type=int)
    add(p, "--max-wait-ms", f"how long to wait for a batch to fill (default {e.max_wait_s * 1000:g})",
        type=float)  # fmt: skip
    add(p, "--no-warmup", "skip running each model once at start", action="store_true")
    add(p, "--token", "bearer token (default: env SDRT_TOKEN; unset: no authentication)")
    add(p, "--model-name", f"model name on the KServe v2 routes (default {d.model_name})")
    limits = p.add_argument_group("limits (per request)")
    add(limits, "--max-steps", f"default {lim.max_steps}", type=int)
    add(limits, "--max-side", "pixels (default: the bundle's)", type=int)
    add(limits, "--max-images", f"default {lim.max_images}", type=int)
    add(limits, "--max-prompt-chars", f"default {lim.max_prompt_chars}", type=int)
    add(limits, "--max-body-bytes", "larger bodies get 413; room for an init image and a mask as "
        f"base64 (default {lim.max_body_bytes}: {lim.max_body_bytes / 2**20:g} MiB)", type=int)  # fmt: skip
    add(limits, "--timeout", f"deadline in seconds (default {lim.timeout_s:g})", type=float)
    add(limits, "--read-timeout", "seconds for a request's headers, then its body, to arrive; "
        f"else 408 and the connection is closed (default {lim.read_timeout_s:g})", type=float)  # fmt: skip
    conn = p.add_argument_group("connections")
    add(conn, "--max-connections", "open connections; more get 503 and are closed "
        f"(default {d.max_connections})", type=int)  # fmt: skip
    add(conn, "--keep-alive", f"seconds an idle connection stays open (default {d.keep_alive_s})", type=int)
    lora = p.add_argument_group("LoRA")
    add(lora, "--lora-dir", "folder of NAME.safetensors LoRAs that requests may name (the loras field, "
        "<lora:NAME:WEIGHT> prompt tags); unset: LoRAs are refused", type=Path)  # fmt: skip
    add(lora, "--lora-cache", "prepared LoRA weight sets kept, least recently used dropped "
        f"(default {d.lora.cache_size})", type=int)  # fmt: skip
    add(p, "--shutdown-grace", "seconds in-flight work may finish after SIGTERM, then JSON 503 "
        f"(default {d.shutdown_grace_s:g})", type=float)  # fmt: skip
    add(p, "--log-level", f"default {d.log_level}", choices=LOG_LEVELS)


def server_values(given: Mapping[str, Any], keys: Collection[str]) -> dict[str, Any]:
    """The settings among `keys` that were given; the token falls back to env SDRT_TOKEN."""
    values = {key: value for key, value in given.items() if key in keys}
    if "token" in keys and "token" not in values and os.environ.get("SDRT_TOKEN"):
        values["token"] = os.environ["SDRT_TOKEN"]
    return values


def flag_error(p: argparse.ArgumentParser, exc: RequestError) -> NoReturn:
    """argparse's exit 2, the message naming the flag (`argument --port: must be ...`)."""
    if isinstance(exc, SettingError):
        p.error(f"argument --{exc.setting.replace('_', '-')}: {exc.reason}")
    p.error(str(exc))


def parse_args(argv: Sequence[str] | None = None) -> ServerOptions:
    """The command line as validated ServerOptions; a bad flag exits 2 with a message naming it."""
    p = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__, allow_abbrev=False)
    add_server_flags(p)
    args = p.parse_args(argv)
    try:
        return ServerOptions.from_mapping(server_values(vars(args), vars(args))).validate()
    except RequestError as exc:
        flag_error(p, exc)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    setup_logging(options.log_level)
    import uvicorn  # here, so `import runtime.serve` stays cheap

    from runtime.serving.app import create_app
    from runtime.serving.listener import uvicorn_config

    if not is_loopback(options.host) and not options.token:
        log.warning("binding %s without --token: anyone who can reach it can generate", options.host)
    try:
        engine = Engine.open(
            options.bundle, options.backend, options.engine, verify=options.verify, lora=options.lora
        )
    except (RequestError, SetupError) as exc:
        return report(log, exc)
    failed: list[BaseException] = []

    def stop(exc: BaseException) -> None:  # the warm-up failed: a server that cannot serve exits
        failed.append(exc)
        server.should_exit = True

    server = uvicorn.Server(uvicorn_config(create_app(engine, options, on_start_failure=stop), options))
    server.run()
    if not failed:
        return 0
    if isinstance(failed[0], RequestError):  # the engine has logged why, on one line
        return EXIT_REQUEST
    return EXIT_SETUP if isinstance(failed[0], SetupError) else 1


if __name__ == "__main__":
    sys.exit(main())
