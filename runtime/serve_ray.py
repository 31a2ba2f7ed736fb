"""`python -m runtime.serve_ray --bundle DIR --replicas N`: the HTTP server as a Ray Serve application.

Ray Serve does what one process cannot: replicas on several hosts, routing, autoscaling, health
checks and restarts. Each replica is the same `Engine` and the same FastAPI app as
`python -m runtime.serve` (`create_app`), so the JSON body, the status codes and the error body
are those of the single-process server; Ray only sits in front of it. One replica per GPU on GPU
hosts (`--num-gpus-per-replica 1`, the default for `--device cuda|tensorrt`), CPU replicas
otherwise, each with its share of cores as ONNX Runtime intra-op threads.

`serve run deploy/ray_serve.yaml` deploys the same application from a config file:
`build_app(args)` takes the CLI's options as a mapping (flat keys, the flags with underscores)
and builds the same `ServerOptions` + `DeploymentSpec` the CLI does, with the same checks. Ray
is the optional extra `sdrt[ray]`; this module imports it only when an application is built or run.

Connections: each replica's app reads request bodies under --read-timeout and --max-body-bytes
(`BodyMiddleware`, as in `runtime.serve`), but Ray's HTTP proxy, not uvicorn's guarded listener,
owns the sockets: open-connection caps and idle timeouts are Ray's (`http_options`, e.g.
`keep_alive_timeout_s`), so --max-connections and --keep-alive do not exist here.

Retries: Ray does not replay an HTTP request whose replica died while running it; the caller gets
a 500 with a plain-text body (not the JSON {"detail": ...} of the app). `RETRYABLE_STATUSES` lists
what a client may resend: generation is deterministic (same seed, same image), so a retry is safe.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from runtime.backends.config import THREADED
from runtime.bundle import Bundle
from runtime.cli import report
from runtime.errors import EXIT_SETUP, RequestError, SetupError
from runtime.serve import add_server_flags, flag_error, is_loopback, server_values, setup_logging
from runtime.serving.checks import SettingError, int_in, number_in
from runtime.serving.engine import Engine, default_threads
from runtime.serving.options import SERVER_KEYS, ServerOptions, refuse_unknown, typed

if TYPE_CHECKING:
    from ray.serve import Application
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("sdrt.serve_ray")

APP_NAME = "sdrt"
DEPLOYMENT_NAME = "SdrtReplica"
REPLICA_HEADER = "x-sdrt-replica"  # which replica answered: for logs, load tests and the tests here
# What a client may resend. 429: a replica's engine queue was full (Retry-After). 503: Ray's own
# backpressure (max_queued_requests reached), no replica up yet, or a replica shutting down.
# 500 with a text/plain body: Ray lost the replica mid-request (the app's own 500s are JSON).
RETRYABLE_STATUSES = frozenset({429, 503})
MAX_REPLICAS = 1024

# Server settings a Ray deployment does not take, and why (the error for one says so).
NOT_HERE = {
    "max_queue": "a replica's engine queue is sized from max_ongoing_requests",
    "max_connections": "Ray's HTTP proxy owns the connections",
    "keep_alive": "Ray's HTTP proxy owns the connections (http_options.keep_alive_timeout_s)",
}
NOT_IN_CONFIG = {  # ... and those a config file sets elsewhere
    "host": "set http_options.host in the config file",
    "port": "set http_options.port in the config file",
}
# Ray's own settings: flat key -> (type, None allowed), as ServerOptions' KINDS.
RAY_KINDS: dict[str, tuple[type, bool]] = {
    "replicas": (int, False),
    "min_replicas": (int, True),
    "max_replicas": (int, True),
    "target_ongoing_requests": (float, False),
    "max_ongoing_requests": (int, False),
    "max_queued_requests": (int, False),
    "num_gpus_per_replica": (float, True),
    "cpus_per_replica": (float, True),
}


def is_retryable(status: int, content_type: str) -> bool:
    """True for a response a client should resend: back-pressure, or a replica lost mid-request."""
    return status in RETRYABLE_STATUSES or (status == 500 and not content_type.startswith("application/json"))


def replica_threads(options: ServerOptions, assigned_cpus: float | None) -> int | None:
    """Intra-op threads for one replica: its Ray CPU share split between its workers.

    Several replicas share a host, so a replica must not take every core as ORT would by default;
    Ray's CPU reservation says how many are its own. Without one, fall back to `default_threads`."""
    if options.backend.threads is not None:
        return options.backend.threads
    if assigned_cpus is not None and assigned_cpus >= 1:
        return max(1, int(assigned_cpus) // options.engine.workers)
    return default_threads(options.engine.workers)


class ReplicaHeaderMiddleware:
    """Adds `x-sdrt-replica: <id>` to every response, so a caller can tell replicas apart."""

    def __init__(self, app: ASGIApp, replica_id: str):
        self.app, self.replica_id = app, replica_id.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica_id)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class SdrtReplica:
    """One Ray Serve replica: an Engine, warmed up before Ray routes to it, behind `create_app`.

    Wrapped by `serve.ingress()` (late-bound app) in `deployment()`; kept a plain class so that
    importing this module does not import Ray."""

    async def __init__(self, options: ServerOptions) -> None:  # type: ignore[misc]  # Ray awaits it
        import asyncio

        from ray import get_runtime_context

        self.options = options
        cpus = get_runtime_context().get_assigned_resources().get("CPU")
        backend = options.backend
        if backend.backend in THREADED:
            backend = replace(backend, threads=replica_threads(options, cpus))
        self.engine = Engine.open(
            options.bundle, backend, options.engine, verify=options.verify, lora=options.lora
        )
        # Warm-up here, not in the app's lifespan: Ray marks the replica RUNNING (and routes to it)
        # only once the constructor returns, so no request ever meets a cold or half-loaded replica.
        await asyncio.to_thread(self.engine.start)
        log.info("replica ready: %s, %s thread(s), %d worker(s)", options.bundle, backend.threads,
                 options.engine.workers)  # fmt: skip

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """The single-process server's app, unchanged; the engine's lifetime is this replica's."""
        from ray import serve

        from runtime.serving.app import create_app

        replica_id = serve.get_replica_context().replica_id.unique_id
        return ReplicaHeaderMiddleware(create_app(self.engine, self.options, manage_engine=False), replica_id)

    def check_health(self) -> None:
        """Ray's health probe: a replica whose engine failed or is closing gets replaced."""
        if not self.engine.ready:
            raise RuntimeError(self.engine.error or "engine is not accepting work")

    def __del__(self) -> None:
        """Ray's graceful shutdown: finish admitted work, then release the sessions."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(self.options.shutdown_grace_s)


@dataclass(frozen=True)
class DeploymentSpec:
    """Ray Serve's side: how many replicas, what each reserves, how much each may hold."""

    server: ServerOptions = field(default_factory=ServerOptions)  # what each replica runs
    replicas: int = 1  # fixed count, or the initial count when autoscaling
    min_replicas: int | None = None  # both set: autoscaling between them
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # autoscaling target per replica
    max_ongoing_requests: int = 4  # per replica; more wait in Ray's queue
    max_queued_requests: int = 64  # per caller (proxy) of Ray's queue; more get 503 (-1: unbounded)
    num_cpus: float | None = None  # reserved per replica; None: 1 on GPU hosts, else a share of cores
    num_gpus: float | None = None  # None: 1 on GPU backends (one replica per GPU), else 0
    health_check_period_s: float = 10.0

    def validate(self) -> DeploymentSpec:
        """Ranges, cross-checks and defaults resolved; RequestError naming the setting otherwise."""
        server = self.server.validate()
        int_in("replicas", self.replicas, 1, MAX_REPLICAS)
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise RequestError("autoscaling needs both min_replicas and max_replicas")
        replicas = self.replicas
        if self.min_replicas is not None and self.max_replicas is not None:
            int_in("min_replicas", self.min_replicas, 0, MAX_REPLICAS)
            int_in("max_replicas", self.max_replicas, 1, MAX_REPLICAS)
            if self.min_replicas > self.max_replicas:
                raise SettingError("min_replicas", f"({self.min_replicas}) must be <= max_replicas "
                                   f"({self.max_replicas})")  # fmt: skip
            # replicas defaults to 1: with autoscaling it only sets the initial count
            replicas = min(max(replicas, self.min_replicas), self.max_replicas)
        number_in("target_ongoing_requests", self.target_ongoing_requests, 0.1, 1000)
        int_in("max_ongoing_requests", self.max_ongoing_requests, 1, 1000)
        if self.max_ongoing_requests < server.engine.workers:
            raise SettingError("max_ongoing_requests", f"({self.max_ongoing_requests}) must be >= workers "
                               f"({server.engine.workers})")  # fmt: skip
        int_in("max_queued_requests", self.max_queued_requests, -1, 100_000)
        gpu = server.backend.backend == "tensorrt" or server.backend.device in ("cuda", "tensorrt")
        num_gpus = self.num_gpus if self.num_gpus is not None else (1.0 if gpu else 0.0)
        number_in("num_gpus_per_replica", num_gpus, 0, 16)
        if self.num_cpus is not None:
            num_cpus = number_in("cpus_per_replica", self.num_cpus, 0, 1024)
        elif gpu:
            num_cpus = 1.0
        else:  # replicas on this host share its cores; on a cluster, pass cpus_per_replica
            num_cpus = float(max(1, (os.cpu_count() or 1) // (self.max_replicas or replicas)))
        number_in("health_check_period", self.health_check_period_s, 0.1, 3600, " seconds")
        # the engine's queue holds whatever Ray lets through, so its 429 is a last resort
        engine = replace(server.engine, max_queue=self.max_ongoing_requests)
        server = replace(server, bundle=server.bundle.resolve(), engine=engine)
        return replace(self, server=server, replicas=replicas, num_cpus=num_cpus, num_gpus=float(num_gpus))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, config_file: bool = True) -> DeploymentSpec:
        """From flat keys: ServerOptions' (less NOT_HERE, and host/port for a config file) and
        RAY_KINDS'. Not validated yet: call `validate()`. Unknown keys are refused with the list."""
        excluded = {**NOT_HERE, **(NOT_IN_CONFIG if config_file else {})}
        server_keys = [key for key in SERVER_KEYS if key not in excluded]
        refuse_unknown(values, [*server_keys, *RAY_KINDS], excluded)
        ray = {key: typed(key, value, RAY_KINDS) for key, value in values.items() if key in RAY_KINDS}
        d = cls()
        return cls(
            server=ServerOptions.from_mapping(server_values(values, server_keys), exclude=excluded),
            replicas=ray.get("replicas", d.replicas),
            min_replicas=ray.get("min_replicas", d.min_replicas),
            max_replicas=ray.get("max_replicas", d.max_replicas),
            target_ongoing_requests=ray.get("target_ongoing_requests", d.target_ongoing_requests),
            max_ongoing_requests=ray.get("max_ongoing_requests", d.max_ongoing_requests),
            max_queued_requests=ray.get("max_queued_requests", d.max_queued_requests),
            num_cpus=ray.get("cpus_per_replica", d.num_cpus),
            num_gpus=ray.get("num_gpus_per_replica", d.num_gpus),
        )

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment(...)`."""
        options: dict[str, Any] = {
            "name": DEPLOYMENT_NAME,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": max(30.0, 3 * self.health_check_period_s),
            "graceful_shutdown_timeout_s": self.server.shutdown_grace_s,
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": self.replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


def deployment(spec: DeploymentSpec) -> Application:
    """The bound Ray Serve application: `serve.run(deployment(spec))`; `spec` is validated."""
    from ray import serve

    ingress = serve.ingress()(SdrtReplica)
    return serve.deployment(**spec.deployment_options())(ingress).bind(spec.server)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m runtime.serve_ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("--address", default=None, help="Ray cluster to join; default: a local one")
    add_server_flags(p, exclude=NOT_HERE)
    d = DeploymentSpec()
    r = p.add_argument_group("replicas")

    def add(flag: str, kind: type, help: str) -> None:
        r.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help)

    add("--replicas", int, f"count, 1-{MAX_REPLICAS} (initial count when autoscaling; default {d.replicas})")
    add("--min-replicas", int, "autoscale from this (with --max-replicas)")
    add("--max-replicas", int, "autoscale up to this")
    add("--target-ongoing-requests", float, f"autoscaling target (default {d.target_ongoing_requests:g})")
    add("--max-ongoing-requests", int, "requests one replica holds (running + in its engine queue); "
        f"more wait in Ray (default {d.max_ongoing_requests})")  # fmt: skip
    add("--max-queued-requests", int, "requests Ray queues per proxy when all replicas are full; then "
        f"503 (-1: none; default {d.max_queued_requests})")  # fmt: skip
    add("--num-gpus-per-replica", float, "default: 1 with --device cuda/tensorrt or --backend tensorrt, "
        "else 0")  # fmt: skip
    add("--cpus-per-replica", float, "CPUs reserved per replica, also its threads (default: GPU replicas "
        "1; CPU replicas this host's cores / --max-replicas or --replicas)")  # fmt: skip
    return p


def parse_args(argv: Sequence[str] | None = None) -> tuple[DeploymentSpec, str | None]:
    """(validated spec, cluster address); a bad flag exits 2 with a message naming it."""
    p = make_parser()
    args = vars(p.parse_args(argv))
    address = args.pop("address")
    try:
        return DeploymentSpec.from_mapping(args, config_file=False).validate(), address
    except RequestError as exc:
        flag_error(p, exc)


def build_app(args: Mapping[str, Any]) -> Application:
    """Application builder for `serve run` / `serve deploy` configs (`runtime.serve_ray:build_app`).

    `args` are the CLI's long options with underscores (bundle, max_replicas, device, ...), checked
    as the CLI checks them: RequestError naming a bad one, SetupError for a broken bundle. host and
    port belong to the config file's http_options, the cluster address to `serve deploy`."""
    spec = DeploymentSpec.from_mapping(args).validate()
    check_bundle(spec.server)
    return deployment(spec)


def check_bundle(options: ServerOptions) -> None:
    """Fail on the driver, at once, rather than in every replica."""
    Bundle.open(options.bundle, verify=options.verify)


def main(argv: Sequence[str] | None = None) -> int:
    spec, address = parse_args(argv)
    options = spec.server
    setup_logging(options.log_level)
    try:
        check_bundle(options)
    except (RequestError, SetupError) as exc:
        return report(log, exc)
    try:
        import ray
        from ray import serve
    except ImportError:
        log.error("error: Ray Serve is not installed: pip install 'sdrt[ray]'")
        return EXIT_SETUP
    if not is_loopback(options.host) and not options.token:
        log.warning("binding %s without --token: anyone who can reach it can generate", options.host)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.monotonic()
    quiet = options.log_level != "debug"
    if address:
        ray.init(address=address, namespace="sdrt", log_to_driver=not quiet)
    else:
        local: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if is_loopback(options.host) else {}
        ray.init(include_dashboard=False, namespace="sdrt", log_to_driver=not quiet, **local)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own (abrupt) handlers
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": options.host, "port": options.port})
        serve.run(deployment(spec), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("ready in %.1f s: http://%s:%d/v1/generate (%s)", time.monotonic() - start, options.host,
                 options.port, describe(spec))  # fmt: skip
        while not stop.wait(1.0):
            pass
        log.info("stopping: replicas finish in-flight requests (up to %g s)", options.shutdown_grace_s)
    except Exception as exc:
        log.error("error: %s", exc)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


def describe(spec: DeploymentSpec) -> str:
    count = (f"autoscaling {spec.min_replicas}-{spec.max_replicas} replicas" if spec.autoscaling
             else f"{spec.replicas} replica(s)")  # fmt: skip
    each = f"{spec.num_cpus:g} CPU + {spec.num_gpus:g} GPU each"
    return f"{count}, {each}, max {spec.max_ongoing_requests} ongoing requests each"


if __name__ == "__main__":
    sys.exit(main())
