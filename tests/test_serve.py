"""The HTTP server under bad input and load: uvicorn on 127.0.0.1 (ephemeral ports), tiny bundle.

Every bad request gets a 4xx naming the problem and the next valid request still succeeds;
served images equal the CLI's; a full queue answers 429; a client that hangs up cancels its
generation; the KServe v2 routes work with tritonclient; shutdown lets in-flight requests finish.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402

from runtime.backends.config import BackendConfig  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.serving import Engine, EngineConfig, Limits  # noqa: E402
from runtime.serving.app import create_app, wants_png  # noqa: E402
from runtime.serving.listener import uvicorn_config  # noqa: E402
from runtime.serving.options import ServerOptions  # noqa: E402

LIMITS = Limits(max_steps=400, max_images=4, max_prompt_chars=2000, max_body_bytes=64_000, timeout_s=60)
FAST = {"steps": 2}  # a valid request that costs ~0.1 s on tiny


@contextmanager
def serve(engine: Engine, options: ServerOptions) -> Iterator[tuple[str, Any]]:
    """Run the app on 127.0.0.1:<ephemeral> in a thread, on the guarded listener `runtime.serve`
    uses; yields (base url, server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn_config(create_app(engine, options), options, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        until = time.monotonic() + 60
        while time.monotonic() < until:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        else:
            raise RuntimeError("server did not become ready")
        yield url, server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path) -> Engine:
    return Engine.open(tiny_bundle, config=EngineConfig(workers=2, max_queue=8, max_batch=4, max_wait_s=0.02))


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[str]:
    with serve(engine, ServerOptions(limits=LIMITS)) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


def decode_png(data: bytes) -> tuple[np.ndarray, str]:
    image = Image.open(io.BytesIO(data))
    return np.asarray(image), image.info["parameters"]


def assert_next_request_works(client: httpx.Client) -> None:
    r = client.post("/v1/generate", json={"prompt": "still alive", **FAST})
    assert r.status_code == 200, r.text


def test_health_ready_openapi(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    schema = client.get("/openapi.json").json()
    assert "/v1/generate" in schema["paths"] and "/v2/models/{name}/infer" in schema["paths"]
    assert schema["components"]["schemas"]["GenerateRequest"]["examples"][0]["prompt"]


BAD = [
    ("malformed json", b'{"prompt": "cat", ', 400, "malformed JSON"),
    ("not json content type", None, 415, "Content-Type: application/json"),
    ("body is a list", [1, 2], 422, "valid dictionary"),
    ("missing prompt", {"steps": 5}, 422, "prompt: Field required"),
    ("prompt wrong type", {"prompt": 5}, 422, "prompt: Input should be a valid string"),
    ("steps wrong type", {"prompt": "cat", "steps": "ten"}, 422, "steps: Input should be a valid integer"),
    ("steps as bool", {"prompt": "cat", "steps": True}, 422, "steps: Input should be a valid integer"),
    ("unknown field", {"prompt": "cat", "stepz": 5}, 422, "stepz: Extra inputs are not permitted"),
    ("huge prompt", {"prompt": "cat " * 1000}, 422, "prompt must be at most 2000 characters"),
    ("huge body", {"prompt": "x" * 100_000}, 413, "at most 64000 bytes"),
    ("steps 0", {"prompt": "cat", "steps": 0}, 422, "steps must be an integer from 1 to 999; got 0"),
    ("steps 100000", {"prompt": "cat", "steps": 100000}, 422, "steps must be an integer from 1 to 999"),
    ("steps over limit", {"prompt": "cat", "steps": 500}, 422, "steps must be from 1 to 400 on this server"),
    ("size not multiple", {"prompt": "cat", "size": "100x96"}, 422, "width must be a multiple of 16"),
    (
        "size too big",
        {"prompt": "cat", "width": 2048, "height": 64},
        422,
        "width must be a multiple of 16 from 64 to 1024",
    ),  # fmt: skip
    ("size too small", {"prompt": "cat", "size": "32x32"}, 422, "from 64 to 1024"),
    ("size garbage", {"prompt": "cat", "size": "big"}, 422, "size must look like 512x512"),
    ("size and width", {"prompt": "cat", "size": "64x64", "width": 64}, 422, "not both"),
    ("guidance NaN", b'{"prompt": "cat", "guidance": NaN}', 422, "guidance must be a finite number"),
    ("guidance inf", b'{"prompt": "cat", "guidance": 1e999}', 422, "guidance must be a finite number"),
    ("guidance negative", {"prompt": "cat", "guidance": -1}, 422, "guidance must be a finite number >= 0"),
    ("unknown scheduler", {"prompt": "cat", "scheduler": "lms"}, 422, "scheduler must be one of ddim"),
    ("unknown mode", {"prompt": "cat", "mode": "magic"}, 422, "mode must be one of standard"),
    ("seed negative", {"prompt": "cat", "seed": -1}, 422, "seed must be an integer from 0"),
    ("too many images", {"prompt": "cat", "num_images": 9}, 422, "num_images must be from 1 to 4"),
    ("timeout zero", {"prompt": "cat", "timeout": 0}, 422, "timeout: Input should be greater than 0"),
]


@pytest.mark.parametrize(("body", "status", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_request_gets_clear_4xx(client: httpx.Client, body: object, status: int, message: str) -> None:
    if body is None:
        r = client.post("/v1/generate", content=b'{"prompt": "cat"}', headers={"content-type": "text/plain"})
    elif isinstance(body, bytes):
        r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/generate", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert len(r.text) < 1000  # messages do not echo huge inputs
    assert_next_request_works(client)


@pytest.mark.parametrize(
    "cli_args",
    [
        [
            "a red fox",
            "--negative",
            "blurry",
            "--steps",
            "4",
            "--guidance",
            "6.5",
            "--seed",
            "11",
            "--size",
            "96x64",
            "--scheduler",
            "dpmpp_2m",
        ],
        ["cat, (maid:1.3)", "--compose", "--steps", "3", "--seed", "5", "--scheduler", "euler_a"],
    ],  # fmt: skip
    ids=["standard", "compose-ancestral"],
)
def test_image_equals_cli(
    client: httpx.Client, tiny_bundle: Path, tmp_path: Path, cli_args: list[str]
) -> None:
    from runtime.generate import main

    out = tmp_path / "cli.png"
    assert main([*cli_args, "--bundle", str(tiny_bundle), "--out", str(out)]) == 0
    cli_pixels, cli_text = decode_png(out.read_bytes())

    args = dict(zip(cli_args[1::2], cli_args[2::2], strict=False)) if "--compose" not in cli_args else {}
    body: dict[str, object] = {"prompt": cli_args[0]}
    if "--compose" in cli_args:
        body |= {"mode": "compose", "steps": 3, "seed": 5, "scheduler": "euler_a"}
    else:
        body |= {"negative_prompt": args["--negative"], "steps": int(args["--steps"]),
                 "guidance": float(args["--guidance"]), "seed": int(args["--seed"]), "size": args["--size"],
                 "scheduler": args["--scheduler"]}  # fmt: skip
    png = client.post("/v1/generate", json=body, headers={"accept": "image/png"})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    pixels, text = decode_png(png.content)
    np.testing.assert_array_equal(pixels, cli_pixels)
    assert text == cli_text
    as_json = client.post("/v1/generate", json=body).json()
    assert base64.b64decode(as_json["images"][0]) == png.content
    assert as_json["infotexts"] == [cli_text]


def test_concurrent_requests_of_different_shapes(client: httpx.Client, engine: Engine) -> None:
    bodies: list[dict[str, Any]] = [
        {"prompt": "a", "size": "64x64", "steps": 3},
        {"prompt": "b", "size": "128x64", "steps": 2, "scheduler": "ddim"},
        {"prompt": "c", "size": "64x64", "steps": 3, "seed": 4},  # same shape as "a": may be merged
        {"prompt": "d", "size": "64x128", "steps": 2, "mode": "deproject"},
        {"prompt": "e", "size": "64x64", "steps": 3, "seed": 9, "num_images": 2},
        {"prompt": "f", "steps": "3"},  # a bad one in the mix
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: client.post("/v1/generate", json=b), bodies))
    assert [r.status_code for r in responses] == [200] * 5 + [422]
    for body, r in zip(bodies[:5], responses[:5], strict=True):
        width, height = (int(v) for v in str(body["size"]).split("x"))
        options = GenerateOptions(
            prompts=(body["prompt"],), steps=body["steps"], seed=body.get("seed", 0), width=width,
            height=height, scheduler=body.get("scheduler", "pndm"), mode=body.get("mode", "standard"),
            num_images=body.get("num_images", 1),
        )  # fmt: skip
        alone = engine.pipeline.generate(options).images
        served = np.stack([decode_png(base64.b64decode(im))[0] for im in r.json()["images"]])
        np.testing.assert_array_equal(served, alone)


def test_engine_batches_same_shape_exactly(tiny_bundle: Path) -> None:
    config = EngineConfig(workers=1, max_batch=4, max_wait_s=0.5, warmup=False)
    with Engine.open(tiny_bundle, BackendConfig(threads=1), config) as engine:
        engine.start()
        options = [GenerateOptions(prompts=(f"p{i}",), steps=2, seed=i, scheduler="ddim") for i in range(3)]
        jobs = [engine.submit(o, timeout=30) for o in options]
        results = [job.result(30) for job in jobs]
        assert [job.batch_size for job in jobs] == [3, 3, 3]
        for o, result in zip(options, results, strict=True):
            np.testing.assert_array_equal(result.images, engine.pipeline.generate(o).images)
            assert result.seeds == [o.seed]


def test_deadline_cancels_generation(client: httpx.Client) -> None:
    start = time.monotonic()
    r = client.post("/v1/generate", json={"prompt": "slow", "steps": 400, "size": "256x256", "timeout": 0.3})
    assert r.status_code == 504 and "deadline of 0.3 s exceeded" in r.json()["detail"]
    assert time.monotonic() - start < 5
    assert_next_request_works(client)


def test_auth(engine: Engine) -> None:
    app = create_app(engine, ServerOptions(limits=LIMITS, token="s3cret"), manage_engine=False)
    web = TestClient(app)  # no lifespan: shares the module's running engine
    assert web.get("/healthz").status_code == 200
    r = web.post("/v1/generate", json={"prompt": "cat", **FAST})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "bearer token" in r.json()["detail"]
    wrong = web.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert web.post("/v2/models/sdrt/infer", json={"inputs": []}).json()["error"].startswith("missing")
    good = {"Authorization": "Bearer s3cret"}
    assert web.get("/metrics", headers=good).status_code == 200
    assert web.post("/v1/generate", json={"prompt": "cat", **FAST}, headers=good).status_code == 200


def test_metrics_content(client: httpx.Client) -> None:
    client.post("/v1/generate", json={"prompt": "cat", **FAST})
    client.post("/v1/generate", json={"prompt": "cat", "steps": 0})
    text = client.get("/metrics").text
    for expected in [
        'sdrt_http_requests_total{method="POST",route="/v1/generate",status="200"}',
        'sdrt_http_requests_total{method="POST",route="/v1/generate",status="422"}',
        'sdrt_http_request_duration_seconds_bucket{le="0.5",route="/v1/generate"}',
        "sdrt_queue_depth 0.0",
        "sdrt_in_flight ",
        "sdrt_ready 1.0",
        "sdrt_batch_size_count",
        "sdrt_images_generated_total",
        "process_resident_memory_bytes",
    ]:
        assert expected in text, expected


def test_tritonclient_infer(server: str, client: httpx.Client) -> None:
    tc = pytest.importorskip("tritonclient.http")
    from tritonclient.utils import InferenceServerException

    triton = tc.InferenceServerClient(server.removeprefix("http://"), network_timeout=60)
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready("sdrt")
    meta = triton.get_model_metadata("sdrt")
    assert {"name": "prompt", "datatype": "BYTES", "shape": [1]} in meta["inputs"]

    def tensor(name: str, value: np.ndarray, datatype: str, binary: bool = True) -> object:
        t = tc.InferInput(name, list(value.shape), datatype)
        t.set_data_from_numpy(value, binary_data=binary)
        return t

    inputs = [
        tensor("prompt", np.array([b"a blue bird"], dtype=object), "BYTES"),
        tensor("steps", np.array([3], dtype=np.int32), "INT32"),
        tensor("guidance", np.array([6.5], dtype=np.float32), "FP32", binary=False),
        tensor("seed", np.array([21], dtype=np.int64), "INT64"),
        tensor("width", np.array([96], dtype=np.int32), "INT32"),
    ]
    result = triton.infer("sdrt", inputs)  # all outputs, binary
    image = result.as_numpy("image")
    assert image.dtype == np.uint8 and image.shape == (1, 128, 96, 3)
    assert result.as_numpy("seed").tolist() == [21]
    as_json = triton.infer("sdrt", inputs, outputs=[tc.InferRequestedOutput("image", binary_data=False)])
    np.testing.assert_array_equal(as_json.as_numpy("image"), image)

    body = {"prompt": "a blue bird", "steps": 3, "guidance": 6.5, "seed": 21, "width": 96}
    v1 = client.post("/v1/generate", json=body, headers={"accept": "image/png"})
    pixels, text = decode_png(v1.content)
    np.testing.assert_array_equal(image[0], pixels)
    assert result.as_numpy("parameters")[0].decode() == text

    with pytest.raises(InferenceServerException, match="steps must be an integer from 1 to 999"):
        triton.infer("sdrt", [inputs[0], tensor("steps", np.array([0], dtype=np.int32), "INT32")])
    with pytest.raises(InferenceServerException, match="input steps must be an INT or UINT type"):
        triton.infer("sdrt", [inputs[0], tensor("steps", np.array([2.0], dtype=np.float32), "FP32")])
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton.infer("nope", inputs)
    bad = client.post("/v2/models/sdrt/infer", content=b"{not json")
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    triton.close()
    assert_next_request_works(client)


def _raw_request(url: str, body: dict[str, object]) -> socket.socket:
    """Send a request on a bare socket and leave it open; closing it is a client disconnect."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    data = json.dumps(body).encode()
    head = f"POST /v1/generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def _wait_for(condition: object, seconds: float = 20) -> None:
    until = time.monotonic() + seconds
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < until, "condition not reached in time"
        time.sleep(0.02)


def test_full_queue_disconnect_and_graceful_shutdown(tiny_bundle: Path) -> None:
    engine = Engine.open(tiny_bundle, config=EngineConfig(workers=1, max_queue=1, warmup=False))
    slow = {"prompt": "slow", "steps": 400, "size": "256x256"}
    options = ServerOptions(limits=LIMITS, shutdown_grace_s=20)
    with serve(engine, options) as (url, server), httpx.Client(base_url=url) as c:
        running = _raw_request(url, slow)
        _wait_for(lambda: engine.in_flight == 1)
        queued = _raw_request(url, slow)
        _wait_for(lambda: engine.queue_depth == 1)

        busy = c.post("/v1/generate", json={"prompt": "cat", **FAST})
        assert busy.status_code == 429 and "server busy" in busy.json()["detail"]
        assert int(busy.headers["retry-after"]) >= 1
        assert c.get("/healthz").status_code == 200

        queued.close()  # hang up while queued, then while generating: both jobs are dropped
        running.close()
        _wait_for(lambda: engine.in_flight == 0 and engine.queue_depth == 0, 10)
        _wait_for(lambda: 'status="499"} 2.0' in c.get("/metrics").text, 5)
        assert_next_request_works(c)

        # graceful shutdown: a request in flight when the server is told to stop still completes
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(c.post, "/v1/generate", json={"prompt": "last", "steps": 40}, timeout=60)
            _wait_for(lambda: engine.in_flight == 1)
            server.should_exit = True
            assert pending.result(60).status_code == 200
    assert engine.closing


def test_accept_negotiation() -> None:
    assert wants_png("image/png")
    assert wants_png("image/png, application/json;q=0.5")
    assert not wants_png("application/json, image/png")
    assert not wants_png("*/*") and not wants_png("")
    assert not wants_png("image/png;q=0, application/json")
