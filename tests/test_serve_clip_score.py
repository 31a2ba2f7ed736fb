"""CLIP scores through the server, torch-free (the fake bundle, in-process TestClient).

/v1/generate's `clip_score` field gives `clip_scores` (and X-Clip-Score for an image/png answer);
KServe v2's `clip_score` BOOL input gives a `clip_score` FP32 [N] output; both equal the
pipeline's scores; each scored image is observed once by the `sdrt_clip_score` histogram; a
request that does not ask gets what it got before, and a bundle without the tower answers 422.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from runtime.backends.config import BackendConfig  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from runtime.serving import Limits  # noqa: E402
from runtime.serving.metrics import CLIP_SCORE_BUCKETS  # noqa: E402
from tests.fake_bundle import write_fake_bundle  # noqa: E402
from tests.serve_client import open_client  # noqa: E402

LIMITS = Limits(max_steps=50, max_images=4, timeout_s=30)
BODY: dict[str, Any] = {"prompt": "a red hat in the garden", "steps": 3, "seed": 8, "num_images": 2}
HEADER = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def client(fake_bundle: Path) -> Iterator[TestClient]:
    with open_client(fake_bundle, LIMITS) as c:
        yield c


@pytest.fixture(scope="module")
def expected(fake_bundle: Path) -> list[float]:
    """The pipeline's scores for BODY."""
    pipeline = Pipeline(fake_bundle, BackendConfig(threads=1))
    try:
        result = pipeline.generate(
            GenerateOptions(prompts=(BODY["prompt"],), steps=3, seed=8, num_images=2, clip_score=True)
        )
    finally:
        pipeline.close()
    assert result.clip_scores is not None
    return result.clip_scores


def pngs(response: Any) -> list[tuple[bytes, str]]:
    assert response.status_code == 200, response.text
    out = []
    for text in response.json()["images"]:
        png = base64.b64decode(text)
        out.append((png, Image.open(io.BytesIO(png)).info["parameters"]))
    return out


def test_v1_clip_scores(client: TestClient, expected: list[float]) -> None:
    plain = client.post("/v1/generate", json=BODY)
    scored = client.post("/v1/generate", json={**BODY, "clip_score": True})
    body = scored.json()
    assert body["clip_scores"] == pytest.approx(expected, abs=1e-6)
    assert body["parameters"]["clip_score"] is True and body["timings"]["clip_score"] > 0
    assert plain.json()["clip_scores"] is None and plain.json()["parameters"]["clip_score"] is False
    assert "clip_score" not in plain.json()["timings"]
    for k, ((plain_png, plain_text), (scored_png, scored_text)) in enumerate(
        zip(pngs(plain), pngs(scored), strict=True)
    ):
        assert np.array_equal(
            np.asarray(Image.open(io.BytesIO(plain_png))), np.asarray(Image.open(io.BytesIO(scored_png)))
        )
        assert "CLIP score" not in plain_text
        assert scored_text == f"{plain_text}, CLIP score: {expected[k]:.2f}" == body["infotexts"][k]


def test_v1_png_answer_carries_the_score_in_a_header(client: TestClient, expected: list[float]) -> None:
    png = client.post("/v1/generate", json={**BODY, "clip_score": True}, headers={"accept": "image/png"})
    assert png.status_code == 200 and float(png.headers["x-clip-score"]) == pytest.approx(
        expected[0], abs=1e-4
    )
    plain = client.post("/v1/generate", json=BODY, headers={"accept": "image/png"})
    assert "x-clip-score" not in plain.headers


def test_v1_clip_score_is_a_strict_bool(client: TestClient) -> None:
    r = client.post("/v1/generate", json={**BODY, "clip_score": "yes"})
    assert r.status_code == 422 and "clip_score: Input should be a valid boolean" in r.json()["detail"]
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert "clip_score" in schema["GenerateRequest"]["properties"]
    assert "clip_scores" in schema["GenerateResponse"]["properties"]


def v2(*extra: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
    def t(name: str, datatype: str, value: Any) -> dict[str, Any]:
        return {"name": name, "datatype": datatype, "shape": [1], "data": [value]}

    body: dict[str, Any] = {
        "inputs": [t("prompt", "BYTES", BODY["prompt"]), t("steps", "INT32", 3), t("seed", "INT64", 8),
                   t("num_images", "INT32", 2), *extra],
    }  # fmt: skip
    if outputs is not None:
        body["outputs"] = [{"name": name} for name in outputs]
    return body


ASK = {"name": "clip_score", "datatype": "BOOL", "shape": [1], "data": [True]}
NO = {"name": "clip_score", "datatype": "BOOL", "shape": [1], "data": [False]}


def test_v2_clip_score_output(client: TestClient, expected: list[float]) -> None:
    r = client.post("/v2/models/sdrt/infer", json=v2(ASK))
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert list(outputs) == ["image", "seed", "parameters", "clip_score"]
    score = outputs["clip_score"]
    assert score["datatype"] == "FP32" and score["shape"] == [2]
    assert score["data"] == pytest.approx(expected, abs=1e-4)
    assert outputs["parameters"]["data"][1].endswith(f", CLIP score: {expected[1]:.2f}")
    only = client.post("/v2/models/sdrt/infer", json=v2(ASK, outputs=["clip_score"])).json()["outputs"]
    assert [o["name"] for o in only] == ["clip_score"]
    for body in (v2(), v2(NO)):
        plain = client.post("/v2/models/sdrt/infer", json=body).json()["outputs"]
        assert [o["name"] for o in plain] == ["image", "seed", "parameters"]
        assert "CLIP score" not in plain[2]["data"][0]


def test_v2_clip_score_binary_with_tritonclient(client: TestClient, expected: list[float]) -> None:
    tc = pytest.importorskip("tritonclient.http")
    inputs = []
    for name, value, datatype in (("prompt", np.array([BODY["prompt"].encode()], dtype=object), "BYTES"),
                                  ("steps", np.array([3], np.int32), "INT32"),
                                  ("seed", np.array([8], np.int64), "INT64"),
                                  ("num_images", np.array([2], np.int32), "INT32"),
                                  ("clip_score", np.array([True]), "BOOL")):  # fmt: skip
        tensor = tc.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value, binary_data=True)
        inputs.append(tensor)
    outputs = [tc.InferRequestedOutput(name, binary_data=True) for name in ("image", "clip_score")]
    body, json_size = tc.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    r = client.post("/v2/models/sdrt/infer", content=body, headers={HEADER: str(json_size)})
    assert r.status_code == 200, r.text
    result = tc.InferenceServerClient.parse_response_body(r.content, header_length=int(r.headers[HEADER]))
    scores = result.as_numpy("clip_score")
    assert scores.dtype == np.float32 and scores.shape == (2,)
    np.testing.assert_allclose(scores, expected, atol=1e-4)


@pytest.mark.parametrize(
    "body, status, message",
    [
        (v2(outputs=["image", "clip_score"]), 400,
         "output clip_score needs the input clip_score (BOOL) set to true"),
        (v2(NO, outputs=["clip_score"]), 400, "output clip_score needs the input clip_score"),
        (v2({"name": "clip_score", "datatype": "INT32", "shape": [1], "data": [1]}), 400,
         "input clip_score must be BOOL; got INT32"),
    ],
    ids=["output without the input", "output with the input false", "INT32"],
)  # fmt: skip
def test_v2_bad_clip_score_requests(
    client: TestClient, body: dict[str, Any], status: int, message: str
) -> None:
    r = client.post("/v2/models/sdrt/infer", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_v2_metadata_lists_the_input_and_output(client: TestClient) -> None:
    meta = client.get("/v2/models/sdrt").json()
    assert {"name": "clip_score", "datatype": "BOOL", "shape": [1]} in meta["inputs"]
    assert {"name": "clip_score", "datatype": "FP32", "shape": [-1]} in meta["outputs"]


def _histogram(text: str) -> dict[str, float]:
    """sdrt_clip_score's samples: bucket bounds ('le') and 'count' / 'sum' -> value."""
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r'sdrt_clip_score_(bucket\{le="([^"]+)"\}|count|sum) (\S+)', line)
        if match:
            samples[match[2] or match[1]] = float(match[3])
    return samples


def test_metric_observes_each_scored_image_once(fake_bundle: Path, expected: list[float]) -> None:
    with open_client(fake_bundle, LIMITS) as client:
        before = _histogram(client.get("/metrics").text)
        assert before["count"] == 0 and [float(b) for b in list(before)[:-3]] == list(CLIP_SCORE_BUCKETS)
        assert client.post("/v1/generate", json={**BODY, "clip_score": True}).status_code == 200
        assert client.post("/v1/generate", json=BODY).status_code == 200  # not asked: not observed
        assert client.post("/v2/models/sdrt/infer", json=v2(ASK)).status_code == 200
        assert client.post("/v1/generate", json={**BODY, "clip_score": True, "steps": 0}).status_code == 422
        after = _histogram(client.get("/metrics").text)
        assert after["count"] == 4 and after["sum"] == pytest.approx(2 * sum(expected), abs=1e-3)
        lowest = min(b for b in CLIP_SCORE_BUCKETS if b >= max(expected))
        assert after[str(float(lowest))] == 4


def test_batched_requests_get_their_own_scores(fake_bundle: Path, expected: list[float]) -> None:
    """Same-shape requests with clip_score merge into one call and still get their own scores."""
    from concurrent.futures import ThreadPoolExecutor

    with open_client(fake_bundle, LIMITS, max_batch=4) as client:
        bodies = [{**BODY, "clip_score": True}, {**BODY, "prompt": "a blue cat", "clip_score": True}, BODY]
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda b: client.post("/v1/generate", json=b).json(), bodies))
        assert answers[0]["clip_scores"] == pytest.approx(expected, abs=1e-4)
        assert len(answers[1]["clip_scores"]) == 2 and answers[2]["clip_scores"] is None


def test_a_bundle_without_the_tower_answers_422(tmp_path_factory: pytest.TempPathFactory) -> None:
    bundle = write_fake_bundle(tmp_path_factory.mktemp("blind") / "bundle", vision=False)
    with open_client(bundle, LIMITS) as client:
        r = client.post("/v1/generate", json={**BODY, "clip_score": True})
        assert r.status_code == 422
        assert r.json()["detail"].startswith("clip_score needs CLIP's image tower (clip_vision)")
        assert "--projection" in r.json()["detail"]
        r = client.post("/v2/models/sdrt/infer", json=v2(ASK))
        assert r.status_code == 422 and "clip_score needs CLIP's image tower" in r.json()["error"]
        assert client.post("/v1/generate", json=BODY).status_code == 200
