"""`python -m runtime.serve_ray --bundle DIR --replicas N`: the HTTP server as a Ray Serve application.

Ray Serve does what one process cannot: replicas on several hosts, routing, autoscaling, health
checks and restarts. Each replica is the same `Engine` and the same FastAPI app as
`python -m runtime.serve` (`create_app`), so the JSON body, the status codes and the error body
are those of the single-process server; Ray only sits in front of it. One replica per GPU on GPU
hosts (`--num-gpus-per-replica 1`, the default for `--device cuda|tensorrt`), CPU replicas
otherwise, each with its share of cores as ONNX Runtime intra-op threads.

`serve run deploy/ray_serve.yaml` deploys the same application from a config file:
`build_app(args)` takes the CLI's options as a dict. Ray is the optional extra `sdrt[ray]`;
this module imports it only when an application is built or run.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runtime.backends import BACKENDS, PRECISIONS, BackendError
from runtime.bundle import Bundle, BundleError
from runtime.serve import engine_config, is_loopback, limits_from_args
from runtime.serving.engine import Engine, EngineConfig, default_threads
from runtime.serving.limits import Limits

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


def is_retryable(status: int, content_type: str) -> bool:
    """True for a response a client should resend: back-pressure, or a replica lost mid-request."""
    return status in RETRYABLE_STATUSES or (status == 500 and not content_type.startswith("application/json"))


@dataclass(frozen=True)
class ReplicaSpec:
    """Everything one replica needs to load its engine; pickled by Ray and sent to each replica."""

    bundle: str
    backend: str = "onnxruntime"
    device: str = "cpu"
    precision: str | None = None
    threads: int | None = None  # None: the CPUs Ray assigned to the replica, split between workers
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: Limits = field(default_factory=Limits)
    token: str | None = None
    model_name: str = "sdrt"
    shutdown_grace_s: float = 30.0


def replica_threads(spec: ReplicaSpec, assigned_cpus: float | None) -> int | None:
    """Intra-op threads for one replica: its Ray CPU share split between its workers.

    Several replicas share a host, so a replica must not take every core as ORT would by default;
    Ray's CPU reservation says how many are its own. Without one, fall back to `default_threads`."""
    if spec.threads is not None:
        return spec.threads
    if assigned_cpus is not None and assigned_cpus >= 1:
        return max(1, int(assigned_cpus) // spec.engine.workers)
    return default_threads(spec.engine.workers)


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

    async def __init__(self, spec: ReplicaSpec) -> None:  # type: ignore[misc]  # Ray awaits it
        import asyncio

        from ray import get_runtime_context

        self.spec = spec
        cpus = get_runtime_context().get_assigned_resources().get("CPU")
        threads = replica_threads(spec, cpus)
        options: dict[str, object] = {"threads": threads}
        if spec.backend == "onnxruntime":
            options["device"] = spec.device
        self.engine = Engine.open(spec.bundle, spec.backend, spec.precision, spec.engine, **options)
        # Warm-up here, not in the app's lifespan: Ray marks the replica RUNNING (and routes to it)
        # only once the constructor returns, so no request ever meets a cold or half-loaded replica.
        await asyncio.to_thread(self.engine.start)
        log.info("replica ready: %s, %s thread(s), %d worker(s)", spec.bundle, threads, spec.engine.workers)

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """The single-process server's app, unchanged; the engine's lifetime is this replica's."""
        from ray import serve

        from runtime.serving.app import ServerSettings, create_app

        settings = ServerSettings(
            model_name=self.spec.model_name,
            backend=self.spec.backend,
            limits=self.spec.limits,
            token=self.spec.token,
            shutdown_grace_s=self.spec.shutdown_grace_s,
            manage_engine=False,
        )
        replica_id = serve.get_replica_context().replica_id.unique_id
        return ReplicaHeaderMiddleware(create_app(self.engine, settings), replica_id)

    def check_health(self) -> None:
        """Ray's health probe: a replica whose engine failed or is closing gets replaced."""
        if not self.engine.ready:
            raise RuntimeError(self.engine.error or "engine is not accepting work")

    def __del__(self) -> None:
        """Ray's graceful shutdown: finish admitted work, then release the sessions."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close(self.spec.shutdown_grace_s)


@dataclass(frozen=True)
class DeploymentSpec:
    """Ray Serve's side: how many replicas, what each reserves, how much each may hold."""

    replica: ReplicaSpec
    replicas: int = 1  # fixed count, or the initial count when autoscaling
    min_replicas: int | None = None  # both set: autoscaling between them
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0  # autoscaling target per replica
    max_ongoing_requests: int = 4  # per replica; more wait in Ray's queue
    max_queued_requests: int = 64  # per caller (proxy) of Ray's queue; more get 503 (-1: unbounded)
    num_cpus: float = 1.0  # reserved per replica
    num_gpus: float = 0.0  # 1 on GPU hosts: one replica per GPU
    health_check_period_s: float = 10.0

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
            "graceful_shutdown_timeout_s": self.replica.shutdown_grace_s,
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
    """The bound Ray Serve application: `serve.run(deployment(spec))`."""
    from ray import serve

    ingress = serve.ingress()(SdrtReplica)
    return serve.deployment(**spec.deployment_options())(ingress).bind(spec.replica)


class _Parser(argparse.ArgumentParser):
    """argparse that raises ValueError instead of exiting when used by `build_app`."""

    raise_errors = False

    def error(self, message: str) -> Any:
        if self.raise_errors:
            raise ValueError(message)
        return super().error(message)


def _ranged(kind: type[float], low: float, high: float) -> Any:
    """argparse type: a number in [low, high]; the error names the option and its range."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # `not <=` also refuses NaN
            raise argparse.ArgumentTypeError(f"must be {what} from {low:g} to {high:g}; got {text!r}")
        return value

    return parse


def make_parser() -> _Parser:
    p = _Parser(
        prog="python -m runtime.serve_ray",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a config key must be spelled out: "replica" is not "replicas"
    )

    def number(group: Any, flag: str, kind: type[float], low: float, high: float, **kw: Any) -> None:
        group.add_argument(flag, type=_ranged(kind, low, high), **kw)

    p.add_argument("--bundle", type=Path, default=Path("bundles/tiny"), help="the same path on every node")
    p.add_argument("--address", default=None, help="Ray cluster to join; default: a local one")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default loopback only)")
    number(p, "--port", int, 1, 65535, default=8000)
    p.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    p.add_argument("--device", choices=("cpu", "cuda", "tensorrt"), default="cpu", help="onnxruntime device")
    p.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the backend's own")
    r = p.add_argument_group("replicas")
    number(r, "--replicas", int, 1, MAX_REPLICAS, default=1, help="count (initial count when autoscaling)")
    number(r, "--min-replicas", int, 0, MAX_REPLICAS, default=None, help="autoscale from this")
    number(r, "--max-replicas", int, 1, MAX_REPLICAS, default=None, help="autoscale up to")
    number(r, "--target-ongoing-requests", float, 0.1, 1000, default=2.0, help="autoscaling target")
    number(r, "--max-ongoing-requests", int, 1, 1000, default=4,
           help="requests one replica holds (running + in its engine queue); more wait in Ray")  # fmt: skip
    number(r, "--max-queued-requests", int, -1, 100_000, default=64,
           help="requests Ray queues per proxy when all replicas are full; then 503 (-1: none)")  # fmt: skip
    number(r, "--num-gpus-per-replica", float, 0, 16, default=None,
           help="default: 1 with --device cuda/tensorrt or --backend tensorrt, else 0")  # fmt: skip
    number(r, "--cpus-per-replica", float, 0, 1024, default=None,
           help="CPUs reserved per replica, also its threads (default: GPU replicas 1; CPU replicas "
           "this host's cores / --max-replicas or --replicas)")  # fmt: skip
    number(r, "--threads", int, 1, 1024, default=None, help="default: replica CPUs / workers")
    number(r, "--workers", int, 1, 64, default=1, help="generations one replica runs concurrently")
    number(r, "--max-batch", int, 1, 64, default=1, help="same-shape requests merged per call (1: off)")
    number(r, "--max-wait-ms", float, 0, 10_000, default=5.0, help="how long to wait for a batch to fill")
    r.add_argument("--no-warmup", action="store_true", help="skip running each model once at replica start")
    p.add_argument("--token", default=os.environ.get("SDRT_TOKEN"), help="bearer token (or env SDRT_TOKEN)")
    p.add_argument("--model-name", default="sdrt", help="model name on the KServe v2 routes")
    d = Limits()
    limits = p.add_argument_group("limits (per request)")
    number(limits, "--max-steps", int, 1, 1000, default=d.max_steps)
    number(limits, "--max-side", int, 8, 16384, default=d.max_side, help="pixels (default: the bundle's)")
    number(limits, "--max-images", int, 1, 64, default=d.max_images)
    number(limits, "--max-prompt-chars", int, 1, 1 << 20, default=d.max_prompt_chars)
    number(limits, "--max-body-bytes", int, 1, 1 << 30, default=d.max_body_bytes)
    number(limits, "--timeout", float, 0.001, 86_400, default=d.timeout_s, help="deadline in seconds")
    number(p, "--shutdown-grace", float, 0, 3600, default=30.0, help="seconds to finish in-flight work")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def parse_args(argv: Sequence[str] | None = None, *, raise_errors: bool = False) -> argparse.Namespace:
    """Parse and cross-check; errors name the parameter and its allowed range (exit 2, or ValueError)."""
    p = make_parser()
    p.raise_errors = raise_errors
    args = p.parse_args(argv)
    if (args.min_replicas is None) != (args.max_replicas is None):
        p.error("autoscaling needs both --min-replicas and --max-replicas")
    if args.max_replicas is not None:
        if args.min_replicas > args.max_replicas:
            p.error(f"--min-replicas ({args.min_replicas}) must be <= --max-replicas ({args.max_replicas})")
        if not args.min_replicas <= args.replicas <= args.max_replicas:
            # --replicas defaults to 1: with autoscaling it only sets the initial count
            args.replicas = min(max(args.replicas, args.min_replicas), args.max_replicas)
    if args.max_ongoing_requests < args.workers:
        p.error(f"--max-ongoing-requests ({args.max_ongoing_requests}) must be >= --workers ({args.workers})")
    return args


def uses_gpu(args: argparse.Namespace) -> bool:
    return args.backend == "tensorrt" or args.device in ("cuda", "tensorrt")


def spec_from_args(args: argparse.Namespace) -> DeploymentSpec:
    """CLI options -> what Ray deploys. Defaults: one GPU per replica on GPU backends, else CPU shares."""
    gpu = uses_gpu(args)
    num_gpus = args.num_gpus_per_replica if args.num_gpus_per_replica is not None else (1.0 if gpu else 0.0)
    if args.cpus_per_replica is not None:
        num_cpus = args.cpus_per_replica
    elif gpu:
        num_cpus = 1.0
    else:  # replicas on this host share its cores; on a cluster, pass --cpus-per-replica
        num_cpus = float(max(1, (os.cpu_count() or 1) // (args.max_replicas or args.replicas)))
    replica = ReplicaSpec(
        bundle=str(Path(args.bundle).resolve()),
        backend=args.backend,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        # the engine's queue holds whatever Ray lets through, so its 429 is a last resort
        engine=engine_config(args, max_queue=args.max_ongoing_requests),
        limits=limits_from_args(args),
        token=args.token,
        model_name=args.model_name,
        shutdown_grace_s=args.shutdown_grace,
    )
    return DeploymentSpec(
        replica=replica,
        replicas=args.replicas,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        target_ongoing_requests=args.target_ongoing_requests,
        max_ongoing_requests=args.max_ongoing_requests,
        max_queued_requests=args.max_queued_requests,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )


def args_to_argv(args: Mapping[str, Any]) -> list[str]:
    """{"bundle": "b", "max_replicas": 4, "no_warmup": True} -> [--bundle b --max-replicas 4 --no-warmup]"""
    argv: list[str] = []
    for key, value in args.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv


def build_app(args: Mapping[str, Any]) -> Application:
    """Application builder for `serve run` / `serve deploy` configs (`runtime.serve_ray:build_app`).

    `args` are the CLI's long options with underscores (bundle, max_replicas, device, ...); the
    same checks apply and a bad one raises ValueError naming it. --host/--port/--address belong to
    the config file's http_options and the cluster, not here."""
    parsed = parse_args(args_to_argv(args), raise_errors=True)
    check_bundle(parsed.bundle)
    return deployment(spec_from_args(parsed))


def check_bundle(path: Path) -> None:
    """Fail on the driver, at once, rather than in every replica."""
    try:
        Bundle.open(path)
    except BundleError as exc:
        raise ValueError(f"--bundle: {exc}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        check_bundle(args.bundle)
        spec = spec_from_args(args)
    except (ValueError, BackendError) as exc:
        log.error("error: %s", exc)
        return 2
    try:
        import ray
        from ray import serve
    except ImportError:
        log.error("error: Ray Serve is not installed: pip install 'sdrt[ray]'")
        return 3
    if not is_loopback(args.host) and not args.token:
        log.warning("binding %s without --token: anyone who can reach it can generate", args.host)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    start = time.monotonic()
    if args.address:
        ray.init(address=args.address, namespace="sdrt", log_to_driver=args.log_level == "debug")
    else:
        local: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if is_loopback(args.host) else {}
        ray.init(include_dashboard=False, namespace="sdrt", log_to_driver=args.log_level == "debug", **local)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own (abrupt) handlers
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(deployment(spec), name=APP_NAME, route_prefix="/", blocking=False)
        log.info("ready in %.1f s: http://%s:%d/v1/generate (%s)", time.monotonic() - start, args.host,
                 args.port, describe(spec))  # fmt: skip
        while not stop.wait(1.0):
            pass
        log.info("stopping: replicas finish in-flight requests (up to %g s)", spec.replica.shutdown_grace_s)
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
