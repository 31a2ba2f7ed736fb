"""CLIP guidance's torch-free parts (runtime/clip_guidance.py): the resize matrices against PIL, the
note's formulas, and the refusals of the CLI, the server and `validate` for a bundle without the
gradient graph or with bad values (the fake bundle has none)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.bundle import Bundle
from runtime.clip_guidance import MAX_SCALE, blend, resample_matrix, resize_matrices
from runtime.clip_score import resized_size
from runtime.errors import RequestError
from runtime.generate import main
from runtime.options import GenerateOptions, validate


@pytest.mark.parametrize(
    ("height", "width", "size"), [(128, 192, 32), (256, 256, 224), (512, 384, 224), (64, 64, 224)]
)
def test_resize_matrices_are_pils_bicubic_resize_and_centre_crop(height: int, width: int, size: int) -> None:
    """Against PIL's float ('F') resize, which computes in float with the same coefficients: the
    differentiable map equals clip_score's resize but for the uint8 roundings it cannot have."""
    image = np.random.default_rng(0).random((height, width)).astype(np.float32)
    new_width, new_height = resized_size(width, height, size)
    pil = np.asarray(Image.fromarray(image, "F").resize((new_width, new_height), Image.Resampling.BICUBIC))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    rows, cols = resize_matrices(height, width, size)
    assert rows.shape == (size, height) and cols.shape == (size, width) and rows.dtype == np.float32
    np.testing.assert_allclose(
        rows @ image @ cols.T, pil[top : top + size, left : left + size], rtol=0, atol=1e-6
    )


def test_resample_rows_are_normalised() -> None:
    for n_in, n_out in ((512, 224), (64, 224), (100, 37)):
        np.testing.assert_allclose(resample_matrix(n_in, n_out).sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_blend_is_the_notes_formula_with_its_minus_sign() -> None:
    rng = np.random.default_rng(1)
    x0, x_t = (rng.standard_normal((1, 4, 8, 8)).astype(np.float32) for _ in range(2))
    c = np.float32(0.6)
    np.testing.assert_allclose(blend(x0, x_t, c), 0.6 * x0 - 0.4 * x_t, rtol=0, atol=1e-6)


def test_validate_refuses_a_bundle_without_the_gradient_graph(fake_bundle: Path) -> None:
    bundle = Bundle.open(fake_bundle)
    with pytest.raises(RequestError, match="clip_guidance needs the clip_guidance graph.*--clip-guidance"):
        validate(GenerateOptions(prompts=("a",), clip_guidance=5.0), bundle)
    resolved = validate(GenerateOptions(prompts=("a",), clip_guidance=0), bundle)  # off: no graph needed
    assert resolved.clip_guidance == 0.0 and resolved.clip_guidance_skip == 10


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"clip_guidance": -1.0}, "clip_guidance must be a number from 0 .off. to 1e"),
        ({"clip_guidance": float("nan")}, "clip_guidance must be a number"),
        ({"clip_guidance": MAX_SCALE * 2}, "clip_guidance must be a number"),
        ({"clip_guidance": True}, "clip_guidance must be a number"),
        ({"clip_guidance_skip": -1}, "clip_guidance_skip must be an integer >= 0; got -1"),
        ({"clip_guidance_skip": 1.5}, "clip_guidance_skip must be an integer"),
    ],
)
def test_bad_values_are_refused_by_name(fake_bundle: Path, fields: dict[str, object], message: str) -> None:
    with pytest.raises(RequestError, match=message):
        validate(GenerateOptions(prompts=("a",), steps=4, **fields), Bundle.open(fake_bundle))  # type: ignore[arg-type]


def test_cli_exits_2_without_the_graph(
    fake_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "a.png"
    code = main(
        ["a cat", "--bundle", str(fake_bundle), "--steps", "12", "--clip-guidance", "5", "--out", str(out)]
    )
    assert code == 2 and not out.exists()
    assert "clip_guidance needs the clip_guidance graph" in caplog.text


def test_server_answers_422_without_the_graph(fake_bundle: Path) -> None:
    pytest.importorskip("fastapi")
    from tests.serve_client import open_client

    with open_client(fake_bundle) as client:
        r = client.post("/v1/generate", json={"prompt": "a cat", "steps": 12, "clip_guidance": 5.0})
        assert r.status_code == 422 and "clip_guidance needs the clip_guidance graph" in r.json()["detail"]
        r = client.post("/v1/generate", json={"prompt": "a cat", "clip_guidance": "x"})
        assert r.status_code == 422 and "clip_guidance" in r.json()["detail"]


def test_the_server_batches_only_equal_guidance_together(fake_bundle: Path) -> None:
    from runtime.serving.batching import batch_key

    bundle = Bundle.open(fake_bundle)
    plain = validate(GenerateOptions(prompts=("a",), scheduler="ddim"), bundle)
    guided = replace(plain, clip_guidance=5.0)
    assert batch_key(guided, bundle) == batch_key(replace(plain, clip_guidance=5.0), bundle)
    assert batch_key(guided, bundle) != batch_key(plain, bundle)
    assert batch_key(guided, bundle) != batch_key(replace(guided, clip_guidance_skip=3), bundle)
