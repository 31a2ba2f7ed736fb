"""The Ray Serve application on a local, loopback-only Ray cluster (one per module), tiny bundle.

Two replicas serve concurrent requests (both answer); images equal the CLI's byte for byte; bad
requests get the same status and body as the single-process server; killing a replica under load
loses no request (what Ray cannot retry the client retries, on the statuses `is_retryable` names)
and the service is back to two healthy replicas afterwards. CLI/config checks need no cluster
(they run on the torch-free fake bundle); every test that starts Ray is marked `integration`.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from runtime.backends.config import BackendConfig  # noqa: E402
from runtime.bundle import BundleError  # noqa: E402
from runtime.errors import RequestError  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.serve_ray import (  # noqa: E402
    APP_NAME,
    DEPLOYMENT_NAME,
    REPLICA_HEADER,
    DeploymentSpec,
    build_app,
    is_retryable,
    parse_args,
    replica_threads,
)

ROOT = Path(__file__).resolve().parents[1]
LIMIT_ARGS = {"max_steps": 400, "max_body_bytes": 64_000, "timeout": 60}
SLOW = {"steps": 40, "size": "128x128", "scheduler": "ddim"}  # ~0.5 s per request on one thread


# --- no cluster needed -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--replicas", "0"], "argument --replicas: must be an integer from 1 to 1024; got 0"),
        (["--port", "70000"], "argument --port: must be an integer from 1 to 65535"),
        (["--max-ongoing-requests", "x"], "argument --max-ongoing-requests: invalid int value: 'x'"),
        (["--num-gpus-per-replica", "nan"], "argument --num-gpus-per-replica: must be a number from 0 to 16"),
        (["--min-replicas", "2"], "autoscaling needs both min_replicas and max_replicas"),
        (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas: (3) must be <= max_replicas (2)"),
        (["--workers", "4", "--max-ongoing-requests", "2"], "--max-ongoing-requests: (2) must be >= workers"),
        (["--device", "tpu"], "device must be cpu or cuda or tensorrt for backend onnxruntime; got 'tpu'"),
        (["--threads", "0"], "argument --threads: must be an integer >= 1; got 0"),
        (["--max-queue", "3"], "unrecognized arguments: --max-queue"),
    ],
)  # fmt: skip
def test_bad_cli_args_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ({"replicas": -1}, RequestError, "replicas must be an integer from 1 to 1024; got -1"),
        ({"replicas": "2"}, RequestError, "replicas must be an integer; got '2'"),
        ({"replica": 2}, RequestError, "unknown setting(s) replica; allowed: "),
        ({"port": 8000}, RequestError, "port: set http_options.port in the config file"),
        ({"max_queue": 8}, RequestError, "max_queue: a replica's engine queue is sized from"),
        ({"keep_alive": 8}, RequestError, "keep_alive: Ray's HTTP proxy owns the connections"),
        ({"verify": "sha1"}, RequestError, "verify must be one of stamp, full, off; got 'sha1'"),
        ({"no_warmup": "yes"}, RequestError, "no_warmup must be true or false; got 'yes'"),
    ],
)  # fmt: skip
def test_build_app_names_the_bad_arg(
    fake_bundle: Path, args: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        build_app({"bundle": str(fake_bundle), **args})
    assert message in str(info.value)


def test_build_app_checks_the_bundle_on_the_driver(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="has no manifest.json"):  # no bundle there: the caller's slip
        build_app({"bundle": str(tmp_path)})
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="manifest.json"):  # a damaged bundle: the installation's fault
        build_app({"bundle": str(tmp_path)})


def test_deployment_options() -> None:
    cpu, address = parse_args(["--replicas", "2", "--address", "auto"])
    assert address == "auto"
    options = cpu.deployment_options()
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    cores = os.cpu_count() or 1
    assert options["ray_actor_options"] == {"num_cpus": float(max(1, cores // 2)), "num_gpus": 0.0}
    assert cpu.server.engine.max_queue == options["max_ongoing_requests"] == 4
    gpu = parse_args(["--device", "cuda", "--min-replicas", "1", "--max-replicas", "8"])[0]
    options = gpu.deployment_options()
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1.0}
    assert options["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 8, "initial_replicas": 1, "target_ongoing_requests": 2.0,
    }  # fmt: skip
    assert "num_replicas" not in options
    trt = parse_args(["--backend", "tensorrt", "--num-gpus-per-replica", "0.5"])[0]
    assert trt.num_gpus == 0.5
    # threads: the replica's Ray CPUs split between its workers; explicit --threads wins
    assert replica_threads(cpu.server, 3.0) == 3
    assert replica_threads(parse_args(["--workers", "2"])[0].server, 3.0) == 1
    assert replica_threads(parse_args(["--threads", "5"])[0].server, 1.0) == 5


def test_cli_and_config_mapping_build_the_same_spec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDRT_TOKEN", "from-env")
    argv = ["--bundle", "b", "--replicas", "3", "--max-wait-ms", "7", "--no-warmup", "--verify", "full",
            "--read-timeout", "4", "--max-steps", "60"]  # fmt: skip
    mapping = {"bundle": "b", "replicas": 3, "max_wait_ms": 7, "no_warmup": True, "verify": "full",
               "read_timeout": 4, "max_steps": 60}  # fmt: skip
    from_cli, from_config = parse_args(argv)[0], DeploymentSpec.from_mapping(mapping).validate()
    assert from_cli == from_config
    assert from_cli.server.token == "from-env" and from_cli.server.engine.max_wait_s == 0.007
    assert from_cli.server.verify == "full" and not from_cli.server.engine.warmup


def test_config_file_args_parse() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "deploy/ray_serve.yaml").read_text())
    app = config["applications"][0]
    assert app["import_path"] == "runtime.serve_ray:build_app"
    spec = DeploymentSpec.from_mapping(app["args"]).validate()
    assert spec.num_gpus == 1.0 and spec.autoscaling and spec.replicas == 2


def test_retryable_statuses() -> None:
    assert is_retryable(503, "text/plain") and is_retryable(429, "application/json")
    assert is_retryable(500, "text/plain; charset=utf-8")  # Ray lost the replica
    assert not is_retryable(500, "application/json")  # the app's own failure: not blindly retried
    assert not is_retryable(422, "application/json") and not is_retryable(504, "application/json")


def png_b64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def init_and_mask(side: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noise image (incompressible: a large PNG) and a mask with a white square in the middle."""
    image = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    mask = np.zeros((side, side), np.uint8)
    mask[side // 4 : 3 * side // 4, side // 4 : 3 * side // 4] = 255
    return image, mask


def test_replica_app_takes_img2img_requests(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The app a replica builds (its own ingress builder, a config's default limits) takes the image
    fields, in a body over the old 1 MiB default; the image is the pipeline's. No cluster needed."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from runtime.pipeline import Pipeline
    from runtime.serve_ray import SdrtReplica
    from runtime.serving import Engine

    server = DeploymentSpec.from_mapping({"bundle": str(fake_bundle), "no_warmup": True}).validate().server
    assert server.limits.max_body_bytes == 16 << 20
    context = SimpleNamespace(replica_id=SimpleNamespace(unique_id="replica-1"))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    image, mask = init_and_mask(700)
    body = {"prompt": "a cat", "steps": 4, "seed": 2, "size": "64x64", "init_image": png_b64(image),
            "mask": png_b64(mask), "strength": 0.8, "mask_blur": 4}  # fmt: skip
    replica = object.__new__(SdrtReplica)  # its engine opened here, not by Ray
    with Engine.open(fake_bundle, BackendConfig(threads=1), server.engine) as engine:
        engine.start()
        replica.engine, replica.options = engine, server
        try:
            web = TestClient(replica.__serve_build_asgi_app__())
            r = web.post("/v1/generate", json=body)
        finally:
            del replica.engine  # closed by the `with`, not by the replica's __del__
    assert len(r.request.content) > 1 << 20
    assert r.status_code == 200, r.text
    assert r.headers[REPLICA_HEADER] == "replica-1"
    params = r.json()["parameters"]
    assert params["strength"] == 0.8 and params["mask"] is True
    assert params["mask_blur"] == 4 and params["mask_mode"] == "blend"
    pipe = Pipeline(fake_bundle, BackendConfig(threads=1))
    try:
        options = GenerateOptions(prompts=("a cat",), steps=4, seed=2, width=64, height=64, init_image=image,
                                  mask=mask, strength=0.8, mask_blur=4)  # fmt: skip
        expected = pipe.generate(options).images[0]
    finally:
        pipe.close()
    pixels, text = decode_png(base64.b64decode(r.json()["images"][0]))
    np.testing.assert_array_equal(pixels, expected)
    assert "Denoising strength: 0.8" in text and "Mask mode: blend" in text


# --- one local Ray cluster for the rest -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def replica_actors() -> dict[str, str]:
    """Replica id (the x-sdrt-replica header) -> actor name, for live replicas of the app."""
    names = ray.util.list_named_actors(all_namespaces=True)
    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT_NAME}#"
    return {a["name"].removeprefix(prefix): a["name"] for a in names if a["name"].startswith(prefix)}


def running_replicas() -> int:
    status = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return int(status.replica_states.get("RUNNING", 0))


@pytest.fixture(scope="module")
def cluster(tiny_bundle: Path) -> Iterator[str]:
    """2 CPU replicas (1 CPU, 1 thread each) behind Ray's proxy on 127.0.0.1; yields the base URL."""
    env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    port = _free_port()
    ray.init(
        num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", namespace="sdrt-test",
        log_to_driver=False, configure_logging=False,
    )  # fmt: skip
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"bundle": str(tiny_bundle), "replicas": 2, "cpus_per_replica": 1, **LIMIT_ARGS})
        serve.run(app, name=APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/readyz", timeout=30).status_code == 200
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="module")
def client(cluster: str) -> Iterator[Any]:
    with httpx.Client(base_url=cluster, timeout=60) as c:
        yield c


def decode_png(data: bytes) -> tuple[np.ndarray, str]:
    image = Image.open(io.BytesIO(data))
    return np.asarray(image), image.info["parameters"]


def local_images(tiny_bundle: Path, bodies: list[dict[str, Any]]) -> list[np.ndarray]:
    """What the runtime makes for each body in this process: the reference for served images."""
    from runtime.pipeline import Pipeline

    pipe = Pipeline(tiny_bundle, BackendConfig(threads=1))
    try:
        out = []
        for b in bodies:
            width, height = (int(v) for v in b.get("size", "128x128").split("x"))
            options = GenerateOptions(
                prompts=(b["prompt"],), steps=b["steps"], seed=b.get("seed", 0), width=width, height=height,
                scheduler=b.get("scheduler", "pndm"),
            )  # fmt: skip
            out.append(pipe.generate(options).images[0])
        return out
    finally:
        pipe.close()


@pytest.mark.integration
def test_two_replicas_serve_concurrent_requests(client: Any, tiny_bundle: Path) -> None:
    assert running_replicas() == 2 and len(replica_actors()) == 2
    bodies = [{"prompt": f"concurrent {i}", "seed": i, **SLOW, "steps": 10} for i in range(8)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: client.post("/v1/generate", json=b), bodies))
    assert [r.status_code for r in responses] == [200] * len(bodies), [r.text[:200] for r in responses]
    assert {r.headers[REPLICA_HEADER] for r in responses} == set(replica_actors())  # both replicas worked
    for r, expected in zip(responses, local_images(tiny_bundle, bodies), strict=True):
        np.testing.assert_array_equal(decode_png(base64.b64decode(r.json()["images"][0]))[0], expected)


@pytest.mark.integration
def test_image_equals_cli(client: Any, tiny_bundle: Path, tmp_path: Path) -> None:
    from runtime.generate import main

    out = tmp_path / "cli.png"
    cli = ["a red fox", "--negative", "blurry", "--steps", "4", "--guidance", "6.5", "--seed", "11",
           "--size", "96x64", "--scheduler", "dpmpp_2m"]  # fmt: skip
    assert main([*cli, "--bundle", str(tiny_bundle), "--out", str(out)]) == 0
    body = {"prompt": "a red fox", "negative_prompt": "blurry", "steps": 4, "guidance": 6.5, "seed": 11,
            "size": "96x64", "scheduler": "dpmpp_2m"}  # fmt: skip
    png = client.post("/v1/generate", json=body, headers={"accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == out.read_bytes()  # same pixels, same parameters chunk, same encoder
    as_json = client.post("/v1/generate", json=body).json()
    assert base64.b64decode(as_json["images"][0]) == png.content
    assert as_json["infotexts"] == [decode_png(png.content)[1]]


@pytest.mark.integration
def test_img2img_through_the_proxy(client: Any, tiny_bundle: Path) -> None:
    """Init image and mask go through Ray's proxy to a replica and back: the local pipeline's image."""
    from runtime.pipeline import Pipeline

    image, mask = init_and_mask(64, seed=4)
    body = {"prompt": "a red fox", "steps": 6, "seed": 5, "init_image": png_b64(image), "mask": png_b64(mask),
            "strength": 0.7, "scheduler": "ddim"}  # fmt: skip
    r = client.post("/v1/generate", json=body, headers={"accept": "image/png"})
    assert r.status_code == 200, r.text
    pixels, text = decode_png(r.content)
    pipe = Pipeline(tiny_bundle, BackendConfig(threads=1))
    try:
        options = GenerateOptions(prompts=("a red fox",), steps=6, seed=5, init_image=image, mask=mask,
                                  strength=0.7, scheduler="ddim")  # fmt: skip
        np.testing.assert_array_equal(pixels, pipe.generate(options).images[0])
    finally:
        pipe.close()
    assert "Denoising strength: 0.7" in text and "Mask mode: blend" in text
    bad = client.post("/v1/generate", json={**body, "mask": png_b64(np.zeros((64, 64), np.uint8))})
    assert bad.status_code == 422 and "mask is all black" in bad.json()["detail"]


BAD: list[tuple[str, Any, dict[str, str]]] = [
    ("malformed json", b'{"prompt": "cat", ', {"content-type": "application/json"}),
    ("not json", b'{"prompt": "cat"}', {"content-type": "text/plain"}),
    ("missing prompt", {"steps": 5}, {}),
    ("steps wrong type", {"prompt": "cat", "steps": "ten"}, {}),
    ("unknown field", {"prompt": "cat", "stepz": 5}, {}),
    ("steps 0", {"prompt": "cat", "steps": 0}, {}),
    ("steps over limit", {"prompt": "cat", "steps": 500}, {}),
    ("size garbage", {"prompt": "cat", "size": "big"}, {}),
    ("huge body", {"prompt": "x" * 100_000}, {}),
    ("unknown scheduler", {"prompt": "cat", "scheduler": "lms"}, {}),
]


@pytest.mark.integration
def test_errors_equal_the_http_servers(client: Any, tiny_bundle: Path) -> None:
    """Same status and body as `python -m runtime.serve` with the same limits (its app, in-process)."""
    from fastapi.testclient import TestClient

    from runtime.serving import Engine, EngineConfig
    from runtime.serving.app import create_app

    options = DeploymentSpec.from_mapping({"bundle": str(tiny_bundle), **LIMIT_ARGS}).validate().server
    with Engine.open(tiny_bundle, BackendConfig(threads=1), EngineConfig(warmup=False)) as engine:
        reference = TestClient(create_app(engine, options, manage_engine=False))
        for name, body, headers in BAD:
            kw: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
            want = reference.post("/v1/generate", headers=headers, **kw)
            got = client.post("/v1/generate", headers=headers, **kw)
            assert 400 <= want.status_code < 500, name
            assert (got.status_code, got.json()) == (want.status_code, want.json()), name
        v2_want = reference.post("/v2/models/nope/infer", json={"inputs": []})
        v2_got = client.post("/v2/models/nope/infer", json={"inputs": []})
        assert (v2_got.status_code, v2_got.json()) == (v2_want.status_code, v2_want.json())


def _wait_for(condition: Any, seconds: float, what: str) -> None:
    until = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < until, f"{what}: not reached in {seconds} s"
        time.sleep(0.2)


@pytest.mark.integration
def test_killed_replica_loses_no_request_and_service_recovers(cluster: str, tiny_bundle: Path) -> None:
    """4 clients keep 2 replicas busy; one replica is killed while it has requests in flight.

    Ray does not replay a request whose replica died mid-generation: that caller gets a plain-text
    500, which `is_retryable` says to resend. Every request must end in a 200 with the right image,
    at least one must have needed that retry (else the kill missed the load and this proved
    nothing), and afterwards Ray must be back to two running replicas, the new one serving."""
    clients, per_client = 4, 5
    before = replica_actors()
    victim = sorted(before)[0]
    attempts: dict[tuple[int, int], list[tuple[int, str]]] = {}
    results: dict[tuple[int, int], bytes] = {}
    lock = threading.Lock()
    victim_busy = threading.Event()

    def run(i: int) -> None:
        with httpx.Client(base_url=cluster, timeout=60) as c:
            for j in range(per_client):
                body = {"prompt": f"load {i}-{j}", "seed": 10 * i + j, **SLOW}
                for _ in range(10):
                    r = c.post("/v1/generate", json=body, headers={"accept": "image/png"})
                    note = r.text[:120] if r.status_code != 200 else ""
                    with lock:
                        attempts.setdefault((i, j), []).append((r.status_code, note))
                    if r.status_code == 200:
                        results[(i, j)] = r.content
                        if r.headers[REPLICA_HEADER] == victim:
                            victim_busy.set()
                        break
                    assert is_retryable(r.status_code, r.headers.get("content-type", "")), r.text
                    time.sleep(float(r.headers.get("retry-after", "0.2")))

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(run, i) for i in range(clients)]
        assert victim_busy.wait(60), "the victim replica never served"
        time.sleep(0.2)  # its next requests are in flight now (4 clients, 2 replicas, max 4 ongoing each)
        ray.kill(ray.get_actor(before[victim], namespace="serve"), no_restart=False)
        killed_at = time.monotonic()
        for f in futures:
            f.result(300)

    retried = {key: tries for key, tries in attempts.items() if len(tries) > 1}
    assert len(results) == clients * per_client, attempts  # no request lost
    assert retried, "no request was in flight on the killed replica: the test did not test anything"
    for tries in retried.values():
        assert all(status in (500, 503) for status, _ in tries[:-1]), tries
    keys = [(i, j) for i in range(clients) for j in range(per_client)]
    bodies = [{"prompt": f"load {i}-{j}", "seed": 10 * i + j, **SLOW} for i, j in keys]
    for (key, png), expected in zip(sorted(results.items()), local_images(tiny_bundle, bodies), strict=True):
        np.testing.assert_array_equal(decode_png(png)[0], expected, err_msg=str(key))

    _wait_for(lambda: running_replicas() == 2 and victim not in replica_actors(), 120, "two running replicas")
    recovered_s = time.monotonic() - killed_at
    after = replica_actors()
    assert len(after) == 2 and victim not in after
    seen: set[str] = set()
    with httpx.Client(base_url=cluster, timeout=60) as c:
        for _ in range(20):  # Ray's router spreads them; both replicas, the new one included, answer
            bodies = [{"prompt": "again", "steps": 5, "seed": s} for s in range(4)]
            with ThreadPoolExecutor(4) as pool:
                responses = list(pool.map(lambda b: c.post("/v1/generate", json=b), bodies))
            assert [r.status_code for r in responses] == [200] * 4
            seen |= {r.headers[REPLICA_HEADER] for r in responses}
            if seen == set(after):
                break
    assert seen == set(after), (seen, after)
    first_failures = sorted({tries[0] for tries in retried.values()})
    print(f"{len(retried)} retried after the kill {first_failures}; {recovered_s:.1f} s to recover")
