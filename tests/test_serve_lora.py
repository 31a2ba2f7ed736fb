"""LoRAs through the servers: /v1's `loras` field, KServe v2's `loras` BYTES input, `<lora:...>`
prompt tags, `--lora-dir` / `--lora-cache`, Ray's config mapping.

Torch-free part (the fake bundle, which no LoRA fits): every refusal is a 422 naming the field
(a malformed v2 tensor a 400) and never the server's folder; a LoRA that resolves reaches the
pipeline, whose content check refuses it by file name. With the tiny bundle (integration): the
served image equals `Pipeline.generate` with the same LoRA, byte for byte, whichever way the LoRA
was named, and its infotext carries A1111's `Lora hashes`.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from runtime.lora import LoraRef, LoraSettings  # noqa: E402
from runtime.lora.infotext import short_hash  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.serve import parse_args  # noqa: E402
from runtime.serving import Engine, EngineConfig  # noqa: E402
from runtime.serving.loras import MAX_LORAS  # noqa: E402
from runtime.serving.options import ServerOptions  # noqa: E402
from tests.serve_client import client_for, open_engine  # noqa: E402
from tests.test_lora_tags import write_lora  # noqa: E402

BASE: dict[str, Any] = {"prompt": "a cat", "steps": 2, "seed": 1, "size": "64x64"}


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("served-loras")
    for seed, name in enumerate(("style", "detail")):
        write_lora(folder / f"{name}.safetensors", seed)
    return folder


@pytest.fixture(scope="module")
def engine(fake_bundle: Path) -> Iterator[Engine]:
    with open_engine(fake_bundle) as e:
        yield e


@pytest.fixture(scope="module")
def web(engine: Engine, lora_dir: Path) -> TestClient:
    return client_for(engine, lora_dir=lora_dir)


def v2(inputs: list[dict[str, Any]], prompt: str = "a cat") -> dict[str, Any]:
    head = [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [prompt]},
            {"name": "steps", "shape": [1], "datatype": "INT32", "data": [2]}]  # fmt: skip
    return {"inputs": [*head, *inputs]}


def loras_input(*elements: str) -> dict[str, Any]:
    return {"name": "loras", "shape": [len(elements)], "datatype": "BYTES", "data": list(elements)}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"loras": [{"name": "../style"}]}, "loras[0].name: LoRA name '../style' is not a plain file name"),
        ({"loras": [{"name": "sub/style"}]}, "loras[0].name"),
        ({"loras": [{"name": "nul\x00"}]}, "loras[0].name"),
        ({"loras": [{"name": "style"}, {"name": "gone"}]}, "loras[1].name: no LoRA named 'gone'"),
        (
            {"loras": [{"name": "style", "scale": 11.0}]},
            "loras[0].scale must be a finite number from -10 to 10",
        ),
        ({"loras": [{"name": "style", "scale": "0.5"}]}, "loras"),
        ({"loras": [{"name": "style", "path": "/etc/passwd"}]}, "loras"),
        ({"loras": [{"name": "style"}] * (MAX_LORAS + 1)}, f"at most {MAX_LORAS} LoRAs"),
        ({"loras": [{"name": "style"}], "prompt": "a <lora:style:0.5>"}, "'style' is given twice"),
        ({"prompt": "a <lora:style:0.5:0.2>"}, "separate text-encoder / UNet weights"),
        ({"prompt": "a <lora:../../x>"}, "not a plain file name"),
        ({"prompt": "a <lora:gone>"}, "no LoRA named 'gone'"),
    ],
)
def test_v1_refusals_name_the_field(
    web: TestClient, lora_dir: Path, body: dict[str, Any], expected: str
) -> None:
    r = web.post("/v1/generate", json={**BASE, **body})
    assert r.status_code == 422, r.text
    assert expected in r.json()["detail"]
    assert str(lora_dir) not in r.text  # a client never learns the server's folder
    assert web.post("/v1/generate", json=BASE).status_code == 200  # and the server still works


def test_a_server_without_lora_dir_refuses_loras(engine: Engine) -> None:
    plain = client_for(engine)
    r = plain.post("/v1/generate", json={**BASE, "loras": [{"name": "style"}]})
    assert r.status_code == 422 and "loras: this server offers no LoRAs" in r.json()["detail"]
    r = plain.post("/v1/generate", json={**BASE, "prompt": "a <lora:style>"})
    assert r.status_code == 422 and "started without --lora-dir" in r.json()["detail"]
    r = plain.post("/v2/models/sdrt/infer", json=v2([loras_input("style")]))
    assert r.status_code == 422 and "loras: this server offers no LoRAs" in r.json()["error"]


def test_a_resolved_lora_reaches_the_pipeline(web: TestClient, lora_dir: Path) -> None:
    """The fake bundle has no layer the file names: the pipeline's content check refuses it,
    naming the file by its name only."""
    for r in (
        web.post("/v1/generate", json={**BASE, "loras": [{"name": "style", "scale": 0.5}]}),
        web.post("/v1/generate", json={**BASE, "prompt": "a cat <lora:style:0.5>"}),
        web.post("/v2/models/sdrt/infer", json=v2([loras_input("style:0.5")])),
    ):
        assert r.status_code == 422, r.text
        assert "style.safetensors" in r.text and str(lora_dir) not in r.text


@pytest.mark.parametrize(
    ("tensor", "status", "expected"),
    [
        (loras_input("../style"), 422, "loras[0].name"),
        (loras_input("style", "gone:0.5"), 422, "loras[1].name: no LoRA named 'gone'"),
        (loras_input("style:strong"), 422, "input loras[0] must be NAME or NAME:SCALE"),
        (loras_input("style:99"), 422, "loras[0].scale"),
        (
            {"name": "loras", "shape": [1], "datatype": "INT32", "data": [1]},
            400,
            "must be BYTES with shape [N]",
        ),
        ({"name": "loras", "shape": [1, 1], "datatype": "BYTES", "data": [["style"]]}, 400, "shape [N]"),
    ],
)
def test_v2_loras_input_refusals(web: TestClient, tensor: dict[str, Any], status: int, expected: str) -> None:
    r = web.post("/v2/models/sdrt/infer", json=v2([tensor]))
    assert r.status_code == status, r.text
    assert expected in r.json()["error"]


def test_v2_metadata_lists_the_loras_input(web: TestClient) -> None:
    inputs = {i["name"]: i for i in web.get("/v2/models/sdrt").json()["inputs"]}
    assert inputs["loras"] == {"name": "loras", "datatype": "BYTES", "shape": [-1]}
    assert inputs["prompt"]["shape"] == [1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lora-dir", "/nonexistent/loras"], "argument --lora-dir: must be an existing folder"),
        (["--lora-cache", "0"], "argument --lora-cache: must be an integer from 1 to 64"),
    ],
)
def test_server_flags_exit_2_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        parse_args(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err


def test_server_flags_reach_the_options(lora_dir: Path) -> None:
    options = parse_args(["--lora-dir", str(lora_dir), "--lora-cache", "3"])
    assert options.lora_dir == lora_dir and options.lora == LoraSettings(cache_size=3)
    assert ServerOptions.from_mapping({"lora_dir": str(lora_dir), "lora_cache": 3}).validate() == options
    assert ServerOptions().validate().lora_dir is None


def test_ray_config_and_replica_take_loras(
    fake_bundle: Path, lora_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config file's `lora_dir` / `lora_cache` args reach the replica's app; no cluster needed."""
    serve = pytest.importorskip("ray.serve")
    from types import SimpleNamespace

    from runtime.backends.config import BackendConfig
    from runtime.serve_ray import DeploymentSpec, SdrtReplica

    args = {"bundle": str(fake_bundle), "no_warmup": True, "lora_dir": str(lora_dir), "lora_cache": 4}
    server = DeploymentSpec.from_mapping(args).validate().server
    assert server.lora_dir == lora_dir and server.lora.cache_size == 4
    monkeypatch.setattr(
        serve, "get_replica_context", lambda: SimpleNamespace(replica_id=SimpleNamespace(unique_id="r"))
    )
    replica = object.__new__(SdrtReplica)
    with Engine.open(fake_bundle, BackendConfig(threads=1), server.engine, lora=server.lora) as engine:
        engine.start()
        replica.engine, replica.options = engine, server
        try:
            web = TestClient(replica.__serve_build_asgi_app__())
            bad = web.post("/v1/generate", json={**BASE, "loras": [{"name": "gone"}]})
            resolved = web.post("/v1/generate", json={**BASE, "loras": [{"name": "style"}]})
        finally:
            del replica.engine
    assert bad.status_code == 422 and "no LoRA named 'gone'" in bad.json()["detail"]
    assert resolved.status_code == 422 and "style.safetensors" in resolved.text


# --- with a LoRA that fits: the tiny bundle (integration) ----------------------------------------


@pytest.fixture(scope="module")
def tiny_lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.models import build_preset
    from tests.test_lora_parity import write_kohya

    folder = tmp_path_factory.mktemp("tiny-loras")
    components = build_preset("tiny", cache_dir=tmp_path_factory.mktemp("cache"), with_vision=False)
    write_kohya(folder / "style.safetensors", components, seed=1)
    return folder


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_served_lora_images_equal_the_pipelines(tiny_bundle: Path, tiny_lora_dir: Path) -> None:
    path = tiny_lora_dir / "style.safetensors"
    body = {"prompt": "a cat maid", "steps": 3, "seed": 5, "scheduler": "ddim"}
    config = EngineConfig(workers=1, warmup=False, max_batch=2, max_wait_s=0.05)
    with Engine.open(tiny_bundle, None, config, lora=LoraSettings(cache_size=2)) as engine:
        engine.start()
        web = client_for(engine, lora_dir=tiny_lora_dir)
        by_field = web.post("/v1/generate", json={**body, "loras": [{"name": "style", "scale": 0.8}]})
        by_tag = web.post("/v1/generate", json={**body, "prompt": "a cat maid<lora:style:0.8>"})
        plain = web.post("/v1/generate", json=body)
        by_v2 = web.post(
            "/v2/models/sdrt/infer",
            json={"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": [body["prompt"]]},
                             {"name": "steps", "shape": [1], "datatype": "INT32", "data": [3]},
                             {"name": "seed", "shape": [1], "datatype": "INT64", "data": [5]},
                             {"name": "scheduler", "shape": [1], "datatype": "BYTES", "data": ["ddim"]},
                             loras_input("style:0.8")]},
        )  # fmt: skip
        expected = engine.pipeline.generate(
            GenerateOptions(
                prompts=("a cat maid",), steps=3, seed=5, scheduler="ddim", loras=(LoraRef(path, 0.8),)
            )
        ).images[0]
    for r in (by_field, by_tag, by_v2, plain):
        assert r.status_code == 200, r.text
    field_json, tag_json = by_field.json(), by_tag.json()
    for payload in (field_json, tag_json):
        np.testing.assert_array_equal(png_pixels(base64.b64decode(payload["images"][0])), expected)
        assert payload["parameters"]["loras"] == [{"name": "style", "scale": 0.8}]
        assert payload["parameters"]["prompt"] == "a cat maid"  # the tags are not text for CLIP
        infotext = payload["infotexts"][0]
        assert infotext.startswith("a cat maid<lora:style:0.8>\n")
        assert f"Lora hashes: {json.dumps(f'style: {short_hash(path)}')}" in infotext
    v2_out = {o["name"]: o for o in by_v2.json()["outputs"]}
    image = np.asarray(v2_out["image"]["data"], np.uint8).reshape(v2_out["image"]["shape"])[0]
    np.testing.assert_array_equal(image, expected)
    assert not np.array_equal(png_pixels(base64.b64decode(plain.json()["images"][0])), expected)
    assert "Lora hashes" not in plain.json()["infotexts"][0]
