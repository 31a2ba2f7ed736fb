"""The two ways to write the CFG scale (runtime/guidance.py): 0-based s0 is 1-based s0 + 1, bit for
bit, through the pipeline, the CLI's infotext and the server; torch-free (the fake bundle)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.bundle import Bundle
from runtime.errors import RequestError
from runtime.generate import main
from runtime.guidance import combine, one_based, uses_uncond
from runtime.options import GenerateOptions, validate
from runtime.pipeline import Pipeline


def test_the_identity_on_the_formula() -> None:
    rng = np.random.default_rng(0)
    eps = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)  # [uncond; cond]
    eps_u, eps_c = eps[:1].astype(np.float64), eps[1:].astype(np.float64)
    for s0 in (0.5, 3.0, 6.5):
        zero_based = eps_c + s0 * (eps_c - eps_u)  # the note's 0-based form, written out
        np.testing.assert_allclose(combine(eps, one_based(s0, "0-based")), zero_based, rtol=0, atol=1e-5)
    assert one_based(7.5, "1-based") == 7.5 and one_based(6.5, "0-based") == 7.5
    assert not uses_uncond(one_based(0.0, "0-based"))  # s0 = 0: the conditional prediction alone


@pytest.mark.parametrize(("s1", "scheduler"), [(7.5, "ddim"), (1.0, "euler_a"), (3.0, "dpmpp_2m")])
def test_both_conventions_make_the_same_image(fake_bundle: Path, s1: float, scheduler: str) -> None:
    pipeline = Pipeline(fake_bundle)

    def run(guidance: float, convention: str) -> np.ndarray:
        options = GenerateOptions(
            prompts=("a cat",),
            steps=4,
            seed=3,
            scheduler=scheduler,
            guidance=guidance,
            cfg_convention=convention,
        )
        return pipeline.generate(options).images

    one = run(s1, "1-based")
    assert np.array_equal(one, run(s1 - 1, "0-based"))
    assert not np.array_equal(one, run(s1, "0-based"))  # the convention is not ignored


def test_unknown_convention_is_refused(fake_bundle: Path) -> None:
    with pytest.raises(RequestError, match="cfg_convention must be one of 1-based, 0-based; got 'half'"):
        validate(GenerateOptions(prompts=("a",), cfg_convention="half"), Bundle.open(fake_bundle))


def test_cli_writes_the_convention_only_when_not_default(fake_bundle: Path, tmp_path: Path) -> None:
    base = ["a cat", "--bundle", str(fake_bundle), "--steps", "2"]
    assert main([*base, "--out", str(tmp_path / "a.png")]) == 0
    assert (
        main([*base, "--guidance", "6.5", "--cfg-convention", "0-based", "--out", str(tmp_path / "b.png")])
        == 0
    )
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert "CFG convention" not in a.text["parameters"]
    assert "CFG scale: 6.5" in b.text["parameters"] and "CFG convention: 0-based" in b.text["parameters"]


def test_server_takes_the_convention_on_both_routes(fake_bundle: Path) -> None:
    pytest.importorskip("fastapi")
    from tests.serve_client import open_client

    body = {"prompt": "a cat", "steps": 2, "seed": 1}
    with open_client(fake_bundle) as client:
        one = client.post("/v1/generate", json={**body, "guidance": 7.5}).json()
        zero = client.post("/v1/generate", json={**body, "guidance": 6.5, "cfg_convention": "0-based"}).json()
        assert (
            zero["parameters"]["cfg_convention"] == "0-based"
            and one["parameters"]["cfg_convention"] == "1-based"
        )
        assert "CFG convention: 0-based" in zero["infotexts"][0]
        pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["images"][0])))) for r in (one, zero)]
        assert np.array_equal(*pixels)
        bad = client.post("/v1/generate", json={**body, "cfg_convention": "2-based"})
        assert bad.status_code == 422 and "cfg_convention must be one of 1-based, 0-based" in bad.text
        v2 = {"inputs": [
            {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat"]},
            {"name": "steps", "shape": [1], "datatype": "INT32", "data": [2]},
            {"name": "seed", "shape": [1], "datatype": "INT64", "data": [1]},
            {"name": "guidance", "shape": [1], "datatype": "FP32", "data": [6.5]},
            {"name": "cfg_convention", "shape": [1], "datatype": "BYTES", "data": ["0-based"]},
        ]}  # fmt: skip
        outputs = {o["name"]: o for o in client.post("/v2/models/sdrt/infer", json=v2).json()["outputs"]}
        image = np.asarray(outputs["image"]["data"], np.uint8).reshape(outputs["image"]["shape"])[0]
        assert (
            np.array_equal(image, pixels[0]) and "CFG convention: 0-based" in outputs["parameters"]["data"][0]
        )
