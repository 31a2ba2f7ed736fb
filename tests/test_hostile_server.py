"""The server against hostile clients: every bad request gets one clear 4xx, and the next works.

In-process (TestClient against `create_app`, one real engine for the module, on the torch-free
`fake_bundle`: the server neither knows nor cares what the weights are, and the unit loop stays fast):
bad types, ranges, unicode, huge and deeply nested bodies, wrong content types, auth, unknown
fields, NaN/inf, negative counts, on /v1/generate and the KServe v2 route; after each one a valid
request must still succeed. Real processes (`integration`): a slowloris body gets 408 and never
counts in flight, headers that never finish get 408, the connection cap answers 503, SIGTERM past
the shutdown grace answers a JSON 503 and exits cleanly, kill -9 then a restart on the same port
serves again, and a bad flag exits 2 naming it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from runtime.backends.config import BackendConfig  # noqa: E402
from runtime.serving import Engine, EngineConfig, Limits  # noqa: E402
from runtime.serving.app import create_app  # noqa: E402
from runtime.serving.options import ServerOptions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMITS = Limits(max_steps=50, max_images=4, max_prompt_chars=500, max_body_bytes=64_000, timeout_s=30)
VALID = {"prompt": "still alive", "steps": 1, "size": "64x64"}  # a few ms on the fake bundle
JSON = {"content-type": "application/json"}
TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def engine(fake_bundle: Path) -> Iterator[Engine]:
    with Engine.open(fake_bundle, BackendConfig(threads=1), EngineConfig(workers=1, warmup=False)) as e:
        e.start()
        yield e


@pytest.fixture(scope="module")
def client(engine: Engine) -> TestClient:
    return TestClient(create_app(engine, ServerOptions(limits=LIMITS), manage_engine=False))


@pytest.fixture(scope="module")
def guarded(engine: Engine) -> TestClient:
    """The same engine behind an app that wants a bearer token."""
    return TestClient(create_app(engine, ServerOptions(limits=LIMITS, token=TOKEN), manage_engine=False))


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# (id, body: dict/list sent as JSON or bytes sent raw, extra headers, status, text in the message)
V1: list[tuple[str, Any, dict[str, str], int, str]] = [
    ("lone surrogate in prompt", b'{"prompt": "a\\ud800cat"}', {}, 422, "prompt must be valid UTF-8"),
    ("lone surrogate in negative", b'{"prompt": "a", "negative_prompt": "\\udfff"}', {}, 422,
     "negative prompt must be valid UTF-8"),
    ("surrogate as raw UTF-8 bytes", b'{"prompt": "a\xed\xa0\x80"}', {}, 422, "prompt must be valid UTF-8"),
    ("invalid UTF-8 byte", b'{"prompt": "a\xffcat"}', {}, 400, "not UTF-8"),
    ("latin-1 body", '{"prompt": "café"}'.encode("latin-1"), {}, 400, "not UTF-8"),
    ("nested 5000 deep", nested(5000), {}, 400, "nested too deeply"),
    ("prompt nested 5000 deep", b'{"prompt": ' + nested(5000) + b"}", {}, 400, "nested too deeply"),
    ("object nested 5000 deep", b'{"prompt": "a", "x": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
     {}, 400, "nested too deeply"),
    ("prompt nested 500 deep", b'{"prompt": ' + nested(500) + b"}", {}, 422, "prompt: Input should be"),
    ("truncated JSON", b'{"prompt": "cat", ', {}, 400, "malformed JSON"),
    ("empty body", b"", {}, 422, "body: Field required"),
    ("body null", b"null", {}, 422, "valid dictionary"),
    ("body a string", b'"cat"', {}, 422, "valid dictionary"),
    ("body a list", [{"prompt": "cat"}], {}, 422, "valid dictionary"),
    ("text/plain", b'{"prompt": "cat"}', {"content-type": "text/plain"}, 415, "Content-Type: application/"),
    ("form encoded", b"prompt=cat", {"content-type": "application/x-www-form-urlencoded"}, 415,
     "Content-Type: application/json"),
    ("body over the limit", {"prompt": "x" * 70_000}, {}, 413, "at most 64000 bytes"),
    ("prompt over max chars", {"prompt": "x" * 600}, {}, 422, "prompt must be at most 500 characters"),
    ("negative over max chars", {"prompt": "x", "negative_prompt": "y" * 600}, {}, 422,
     "negative_prompt must be at most 500"),
    ("prompt null", {"prompt": None}, {}, 422, "prompt: Input should be a valid string"),
    ("prompt an object", {"prompt": {"text": "cat"}}, {}, 422, "prompt: Input should be a valid string"),
    ("prompt a number", {"prompt": 5}, {}, 422, "prompt: Input should be a valid string"),
    ("unknown field", {"prompt": "cat", "cfg_scale": 7}, {}, 422, "cfg_scale: Extra inputs are not"),
    ("steps negative", {"prompt": "cat", "steps": -5}, {}, 422, "steps must be an integer from 1 to 999"),
    ("steps a float", {"prompt": "cat", "steps": 2.5}, {}, 422, "steps: Input should be a valid integer"),
    ("steps a string", {"prompt": "cat", "steps": "2"}, {}, 422, "steps: Input should be a valid integer"),
    ("steps 10**30", {"prompt": "cat", "steps": 10**30}, {}, 422, "steps must be an integer from 1 to 999"),
    ("steps over server limit", {"prompt": "cat", "steps": 51}, {}, 422, "steps must be from 1 to 50 on"),
    ("num_images 0", {"prompt": "cat", "num_images": 0}, {}, 422, "num_images must be >= 1"),
    ("num_images negative", {"prompt": "cat", "num_images": -3}, {}, 422, "num_images must be >= 1"),
    ("num_images over limit", {"prompt": "cat", "num_images": 5}, {}, 422, "num_images must be from 1 to 4"),
    ("seed negative", {"prompt": "cat", "seed": -1}, {}, 422, "seed must be an integer from 0 to 2**63-1"),
    ("seed 2**63", {"prompt": "cat", "seed": 2**63}, {}, 422, "seed must be an integer from 0 to 2**63-1"),
    ("guidance NaN", b'{"prompt": "cat", "guidance": NaN}', {}, 422, "guidance must be a finite number"),
    ("guidance Infinity", b'{"prompt": "cat", "guidance": Infinity}', {}, 422, "guidance must be a finite"),
    ("guidance -Infinity", b'{"prompt": "cat", "guidance": -Infinity}', {}, 422, "guidance must be a finite"),
    ("guidance a string", {"prompt": "cat", "guidance": "7.5"}, {}, 422, "guidance: Input should be a valid"),
    ("timeout NaN", b'{"prompt": "cat", "timeout": NaN}', {}, 422, "timeout: Input should be greater than 0"),
    ("timeout negative", {"prompt": "cat", "timeout": -1}, {}, 422, "timeout: Input should be greater"),
    ("width 0", {"prompt": "cat", "width": 0, "height": 64}, {}, 422, "width must be a multiple of 8"),
    ("height negative", {"prompt": "cat", "width": 64, "height": -64}, {}, 422, "height must be a multiple"),
    ("size with 3 parts", {"prompt": "cat", "size": "64x64x64"}, {}, 422, "size must look like 512x512"),
    ("size negative", {"prompt": "cat", "size": "-64x64"}, {}, 422, "width must be a multiple of 8"),
    ("size and width", {"prompt": "cat", "size": "64x64", "width": 64}, {}, 422, "not both"),
    ("scheduler look-alike", {"prompt": "cat", "scheduler": "ddіm"}, {}, 422, "scheduler must be one of"),
    ("compose of commas", {"prompt": ",,,", "mode": "compose"}, {}, 422, "at least one non-empty"),
    ("deproject with chunk", {"prompt": "cat", "mode": "deproject", "long_prompt": "chunk"}, {}, 422,
     "long_prompt 'chunk' works with mode 'standard' only"),
    ("normalize a string", {"prompt": "cat", "normalize": "yes"}, {}, 422, "normalize: Input should be"),
]  # fmt: skip


def send(client: TestClient, url: str, body: Any, headers: dict[str, str]) -> Any:
    if isinstance(body, bytes):
        return client.post(url, content=body, headers={**JSON, **headers})
    return client.post(url, json=body, headers=headers)


def assert_next_request_works(client: TestClient, headers: dict[str, str] | None = None) -> None:
    r = client.post("/v1/generate", json=VALID, headers=headers or {})
    assert r.status_code == 200, r.text
    assert r.json()["seeds"] == [0]


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"), [c[1:] for c in V1], ids=[c[0] for c in V1]
)
def test_v1_hostile(
    client: TestClient, body: Any, headers: dict[str, str], status: int, message: str
) -> None:
    r = send(client, "/v1/generate", body, headers)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert message in r.json()["detail"]
    assert len(r.content) < 1000  # one line, never the input or a traceback echoed back
    assert_next_request_works(client)


@pytest.mark.parametrize(
    "prompt",
    ["\u0000\u0000", "\u202e\u200b\ufeff", "🐱" * 100, "a" * 500, " ", ""],
    ids=["NULs", "bidi and zero-width", "emoji", "at the limit", "blank", "empty"],
)
def test_v1_odd_but_valid_prompts_generate(client: TestClient, prompt: str) -> None:
    r = client.post("/v1/generate", json={**VALID, "prompt": prompt})
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["prompt"] == prompt


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v1/generate", 405), ("PUT", "/v1/generate", 405), ("POST", "/v1/generat", 404),
     ("POST", "/v2/models/sdrt/versions/7/infer", 404), ("DELETE", "/healthz", 405)],
)  # fmt: skip
def test_wrong_method_or_path(client: TestClient, method: str, path: str, status: int) -> None:
    r = client.request(method, path, json=VALID)
    assert r.status_code == status, r.text
    key = "error" if path.startswith("/v2") else "detail"
    assert isinstance(r.json()[key], str)
    assert_next_request_works(client)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"},
     {"Authorization": f"bearer {TOKEN} extra"}, {"Authorization": "Bearer " + "x" * 4000}],
    ids=["none", "wrong", "basic scheme", "empty bearer", "trailing junk", "4 kB token"],
)  # fmt: skip
def test_auth_refused(guarded: TestClient, headers: dict[str, str]) -> None:
    for path, body in (("/v1/generate", VALID), ("/v2/models/sdrt/infer", {"inputs": []})):
        r = guarded.post(path, json=body, headers=headers)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert "bearer token" in r.text
    assert guarded.get("/metrics", headers=headers).status_code == 401
    assert_next_request_works(guarded, AUTH)


def v2_tensor(name: str, datatype: str, data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


PROMPT = v2_tensor("prompt", "BYTES", ["a cat"])
FAST_V2 = [PROMPT, v2_tensor("steps", "INT32", [1]), v2_tensor("width", "INT32", [64]),
           v2_tensor("height", "INT32", [64])]  # fmt: skip


def binary_prompt(text: bytes) -> tuple[bytes, dict[str, str]]:
    """A v2 request whose prompt travels as a binary BYTES tensor (length-prefixed)."""
    blob = struct.pack("<I", len(text)) + text
    header = json.dumps({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(blob)}}]}).encode()  # fmt: skip
    return header + blob, {"Inference-Header-Content-Length": str(len(header)),
                           "content-type": "application/octet-stream"}  # fmt: skip


def with_inputs(*tensors: dict[str, Any]) -> bytes:
    return json.dumps({"inputs": list(tensors)}).encode()


V2: list[tuple[str, Any, dict[str, str], int, str]] = [
    ("lone surrogate in prompt", b'{"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], '
     b'"data": ["a\\ud800cat"]}]}', {}, 422, "input prompt must be valid UTF-8"),
    ("invalid UTF-8 binary prompt", *binary_prompt(b"a\xffcat"), 422, "input prompt must be valid UTF-8"),
    ("nested 5000 deep", nested(5000), {}, 400, "nested too deeply"),
    ("data nested 5000 deep", b'{"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": '
     + nested(5000, b'"a"') + b"}]}", {}, 400, "nested too deeply"),
    ("data nested 100 deep", b'{"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": '
     + nested(100, b'"a"') + b"}]}", {}, 400, "nested deeper than 32 levels"),
    ("not JSON", b"{not json", {}, 400, "malformed JSON"),
    ("no inputs", with_inputs(), {}, 400, "input prompt (BYTES, shape [1]) is required"),
    ("inputs not a list", b'{"inputs": {"prompt": "cat"}}', {}, 400, "invalid inference request: inputs"),
    ("prompt twice", with_inputs(PROMPT, PROMPT), {}, 400, "input prompt is given twice"),
    ("unknown input", with_inputs(PROMPT, v2_tensor("cfg", "FP32", [7.0])), {}, 400, "unknown input(s) cfg"),
    ("steps as FP32", with_inputs(PROMPT, v2_tensor("steps", "FP32", [2.0])), {}, 400,
     "input steps must be an INT or UINT type"),
    ("prompt as INT32", with_inputs(v2_tensor("prompt", "INT32", [1])), {}, 400, "must be BYTES"),
    ("unknown datatype", with_inputs(v2_tensor("prompt", "STRING", ["a"])), {}, 400, "unknown datatype"),
    ("shape too big for data", with_inputs(v2_tensor("prompt", "BYTES", ["a"], [2])), {}, 400,
     "needs 2 elements; got 1"),
    ("negative shape", with_inputs(v2_tensor("prompt", "BYTES", ["a"], [-1])), {}, 400, "negative dimension"),
    ("two prompts", with_inputs(v2_tensor("prompt", "BYTES", ["a", "b"])), {}, 400, "exactly one element"),
    ("steps 0", with_inputs(PROMPT, v2_tensor("steps", "INT32", [0])), {}, 422,
     "steps must be an integer from 1 to 999; got 0"),
    ("seed negative", with_inputs(PROMPT, v2_tensor("seed", "INT64", [-1])), {}, 422, "seed must be an"),
    ("guidance NaN", b'{"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a"]}, '
     b'{"name": "guidance", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', {}, 422,
     "guidance must be a finite number"),
    ("num_images over limit", with_inputs(PROMPT, v2_tensor("num_images", "INT32", [64])), {}, 422,
     "num_images must be from 1 to 4"),
    ("header length garbage", with_inputs(PROMPT), {"Inference-Header-Content-Length": "ten"}, 400,
     "must be an integer"),
    ("header length past the body", with_inputs(PROMPT), {"Inference-Header-Content-Length": "99999"}, 400,
     "outside the body"),
    ("binary size past the body", json.dumps({"inputs": [{"name": "prompt", "datatype": "BYTES", "shape": [1],
     "parameters": {"binary_data_size": 1000}}]}).encode(), {}, 400, "does not fit the request body"),
    ("unknown output", json.dumps({"inputs": [PROMPT], "outputs": [{"name": "latents"}]}).encode(), {}, 400,
     "unknown output(s) latents"),
    ("compressed", with_inputs(PROMPT), {"content-encoding": "gzip"}, 415, "send them uncompressed"),
    ("body over the limit", with_inputs(v2_tensor("prompt", "BYTES", ["x" * 70_000])), {}, 413,
     "at most 64000 bytes"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "message"), [c[1:] for c in V2], ids=[c[0] for c in V2]
)
def test_v2_hostile(
    client: TestClient, body: bytes, headers: dict[str, str], status: int, message: str
) -> None:
    r = send(client, "/v2/models/sdrt/infer", body, headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert len(r.content) < 1000
    ok = client.post("/v2/models/sdrt/infer", json={"inputs": FAST_V2})
    assert ok.status_code == 200, ok.text
    assert_next_request_works(client)


def test_v2_binary_prompt_is_read_as_utf8(client: TestClient) -> None:
    """The control for the invalid-UTF-8 case above: the same framing with valid text works."""
    body, headers = binary_prompt("café".encode())
    r = client.post("/v2/models/sdrt/infer", content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert "café" in r.json()["outputs"][2]["data"][0]


def test_setup_error_is_a_json_500_without_details(
    client: TestClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken model found mid-request is the server's fault: 500, its kind only, no traceback."""
    from runtime.backends import BackendError

    def broken(models: object) -> None:
        raise BackendError("/secret/path/unet.onnx: cannot load\nTraceback (most recent call last): ...")

    with monkeypatch.context() as patch:
        patch.setattr(engine.pipeline.backend, "prepare", broken)
        r = client.post("/v1/generate", json=VALID)
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    detail = r.json()["detail"]
    assert "model setup is broken (BackendError)" in detail and "the request itself was valid" in detail
    assert "/secret" not in detail and "Traceback" not in detail
    assert_next_request_works(client)


def test_many_bad_requests_leave_no_trace(client: TestClient, engine: Engine) -> None:
    """200 bad requests in a row: nothing queued or running afterwards, and a valid one works."""
    for i in range(200):
        body = V1[i % len(V1)][1]
        send(client, "/v1/generate", body, {})
    assert engine.queue_depth == 0 and engine.in_flight == 0
    metrics = client.get("/metrics").text
    assert "sdrt_http_requests_in_flight 1.0" in metrics  # the /metrics request itself
    assert_next_request_works(client)


# --- real processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`python -m runtime.serve` in a subprocess on 127.0.0.1:port; stderr collected."""

    def __init__(self, bundle: Path, port: int, *flags: str):
        self.port, self.url = port, f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "runtime.serve", "--bundle", str(bundle), "--port", str(port),
               "--threads", "1", *flags]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_ready(self, seconds: float = 90) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            assert self.proc.poll() is None, "".join(self.lines)
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError("server not ready:\n" + "".join(self.lines))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(60)
        self.reader.join(5)
        return rc

    @property
    def log(self) -> str:
        return "".join(self.lines)


def raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def in_flight(url: str) -> float:
    """The in-flight gauge, less the /metrics request that reads it."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("sdrt_http_requests_in_flight "))
    return float(line.split()[1]) - 1


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    until = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < until, "condition not reached in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def guarded_server(fake_bundle: Path) -> Iterator[Server]:
    server = Server(
        fake_bundle, free_port(), "--read-timeout", "1.5", "--max-connections", "6", "--workers", "1"
    )
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.integration
def test_slowloris_body_gets_408_and_never_counts_in_flight(guarded_server: Server) -> None:
    head = b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: 100\r\n\r\n"
    slow = [raw(guarded_server.port, head + b'{"prompt": "sl') for _ in range(3)]
    time.sleep(0.3)
    assert in_flight(guarded_server.url) == 0  # three half-sent bodies hold no request slot
    started = time.monotonic()
    answers = [read_all(sock) for sock in slow]
    assert time.monotonic() - started < 5
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request body not received within 1.5 s" in answer
    assert httpx.post(f"{guarded_server.url}/v1/generate", json=VALID, timeout=30).status_code == 200


@pytest.mark.integration
def test_headers_that_never_finish_get_408(guarded_server: Server) -> None:
    sock = raw(guarded_server.port, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b"request headers not received within 1.5 s" in answer
    idle = raw(guarded_server.port, b"")  # a connection that sends nothing is closed silently
    assert read_all(idle) == b""
    assert httpx.post(f"{guarded_server.url}/v1/generate", json=VALID, timeout=30).status_code == 200


@pytest.mark.integration
def test_connection_cap_answers_503(guarded_server: Server) -> None:
    wait_for(lambda: in_flight(guarded_server.url) == 0, 5)
    time.sleep(0.2)  # the probe's own connection is closed by now
    held = [raw(guarded_server.port, b"") for _ in range(6)]  # the cap: 6 open connections
    time.sleep(0.2)
    refused = raw(guarded_server.port, b"")
    answer = read_all(refused)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"too many open connections (this server allows 6)" in answer and b"retry-after: 1" in answer
    for sock in held:
        sock.close()
    time.sleep(0.3)
    assert httpx.post(f"{guarded_server.url}/v1/generate", json=VALID, timeout=30).status_code == 200


@pytest.mark.integration
def test_sigterm_past_the_grace_answers_json_503_and_exits_cleanly(tiny_bundle: Path) -> None:
    """On the tiny export, whose generations are slow enough to outlive the grace period."""
    server = Server(tiny_bundle, free_port(), "--shutdown-grace", "1", "--workers", "1", "--max-steps", "400")
    try:
        server.wait_ready()
        done: dict[str, httpx.Response] = {}
        slow = {"prompt": "slow", "steps": 400, "size": "256x256"}  # far longer than the 1 s grace
        worker = threading.Thread(
            target=lambda: done.setdefault(
                "r", httpx.post(f"{server.url}/v1/generate", json=slow, timeout=60)
            )
        )
        worker.start()
        wait_for(lambda: httpx.get(f"{server.url}/readyz", timeout=5).json().get("in_flight") == 1, 30)
        server.proc.send_signal(signal.SIGTERM)
        worker.join(30)
        rc = server.stop()
    finally:
        server.stop()
    r = done["r"]
    assert r.status_code == 503 and r.headers["content-type"] == "application/json", r.text
    assert "retry it" in r.json()["detail"] and r.headers["retry-after"] == "5"
    assert rc in (0, -signal.SIGTERM), server.log
    assert "Traceback" not in server.log and "CancelledError" not in server.log, server.log
    assert server.log.count("POST /v1/generate cancelled after") == 1, server.log


@pytest.mark.integration
def test_kill_9_then_restart_on_the_same_port_serves(fake_bundle: Path) -> None:
    port = free_port()
    first = Server(fake_bundle, port)
    try:
        first.wait_ready()
        first.proc.kill()
        assert first.proc.wait(10) == -signal.SIGKILL
    finally:
        first.stop()
    second = Server(fake_bundle, port)
    try:
        second.wait_ready()
        assert httpx.post(f"{second.url}/v1/generate", json=VALID, timeout=30).status_code == 200
    finally:
        assert second.stop() in (0, -signal.SIGTERM)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("flags", "message", "status"),
    [(["--port", "99999"], "argument --port: must be an integer from 1 to 65535; got 99999", 2),
     (["--threads", "0"], "argument --threads: must be an integer >= 1; got 0", 2),
     (["--read-timeout", "nan"], "argument --read-timeout: must be a number from 0.01 to 3600", 2),
     (["--verify", "sha1"], "argument --verify: invalid choice: 'sha1'", 2),
     (["--bundle", "/nonexistent/bundle"], "bundle /nonexistent/bundle is not a directory", 2)],
)  # fmt: skip
def test_bad_start_exits_with_a_message(flags: list[str], message: str, status: int) -> None:
    run = subprocess.run([sys.executable, "-m", "runtime.serve", *flags], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert run.returncode == status, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr


@pytest.mark.integration
def test_damaged_bundle_at_start_exits_3_naming_the_file(fake_bundle_copy: Path) -> None:
    bundle = fake_bundle_copy
    (bundle / "manifest.json").write_text("[1, 2]")
    cmd = [sys.executable, "-m", "runtime.serve", "--bundle", str(bundle), "--port", str(free_port())]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, run.stderr
    assert "manifest.json" in run.stderr and "Traceback" not in run.stderr
    assert len([line for line in run.stderr.splitlines() if "error" in line.lower()]) == 1, run.stderr
