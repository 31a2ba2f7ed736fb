"""CLIP score, torch-free (the fake bundle): CLIPImageProcessor's preprocessing recomputed
independently, the score formula, the request's validation, the pipeline and the CLI, and that
leaving it off changes nothing. Against transformers and PyTorch: test_clip_score_parity.py."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from runtime.backends import BackendConfig
from runtime.bundle import Bundle, BundleError
from runtime.clip_score import preprocess, resized_size, scores
from runtime.errors import RequestError
from runtime.generate import main
from runtime.image import infotext
from runtime.options import GenerateOptions, validate
from runtime.pipeline import Pipeline
from runtime.serving.batching import batch_key, merge, split
from runtime.specs import CLIP_VISION
from runtime.tokenizer import ClipTokenizer
from tests.fake_bundle import CLIP_MEAN, CLIP_STD, VISION, VISION_SIZE, write_fake_bundle
from tests.scripts import import_script

# (width, height): non-square both ways, truncation where rounding would differ, odd crop margins.
SIZES = [(80, 64), (64, 128), (77, 64), (64, 77), (200, 33), (96, 96), (24, 40), (123, 57), (16, 21)]


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise: bicubic overshoot and clipping both get exercised."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 0 * x], axis=-1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


def reference_pixels(image: np.ndarray, size: int) -> np.ndarray:
    """CLIPImageProcessor's steps written out again, in float64: (3, size, size)."""
    height, width = image.shape[:2]
    if width <= height:
        new_w, new_h = size, math.floor(size * height / width)
    else:
        new_w, new_h = math.floor(size * width / height), size
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    cropped = np.array(resized.crop((left, top, left + size, top + size)), dtype=np.float64)
    normalized = (cropped / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return normalized.transpose(2, 0, 1)


def test_resized_size_truncates_like_transformers() -> None:
    assert resized_size(80, 64, 24) == (30, 24)
    assert resized_size(64, 80, 24) == (24, 30)
    assert resized_size(77, 64, 24) == (28, 24)  # 28.875: truncated, not rounded
    assert resized_size(1000, 768, 224) == (291, 224)  # 291.67
    assert resized_size(512, 768, 224) == (224, 336)
    assert resized_size(512, 512, 224) == (224, 224)
    assert resized_size(100, 10, 224) == (2240, 224)  # upscaling follows the same rule


@pytest.mark.parametrize("width, height", SIZES)
def test_preprocess_matches_an_independent_computation(width: int, height: int) -> None:
    image = photo(width, height, seed=width * height)
    pixels = preprocess(image[None], VISION)
    assert pixels.dtype == np.float32 and pixels.shape == (1, 3, VISION_SIZE, VISION_SIZE)
    np.testing.assert_allclose(pixels[0], reference_pixels(image, VISION_SIZE), rtol=0, atol=2e-6)


def test_preprocess_crop_offset_and_dtype_rules() -> None:
    """An image already `size` on its short side is not resampled: the crop alone, offset
    (W - S) // 2; the values are float64 * (1/255) cast to float32, normalized in float32."""
    image = photo(29, VISION_SIZE)  # 5 columns to drop: 2 on the left, 3 on the right
    pixels = preprocess(image[None], VISION)[0]
    kept = image[:, 2 : 2 + VISION_SIZE]
    x = (kept.astype(np.float64) * (1 / 255)).astype(np.float32)
    expected = ((x - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)).transpose(2, 0, 1)
    assert np.array_equal(pixels, expected)


def test_preprocess_batches_images_in_order() -> None:
    images = np.stack([photo(80, 64, seed=s) for s in range(3)])
    batch = preprocess(images, VISION)
    for i, image in enumerate(images):
        assert np.array_equal(batch[i], preprocess(image[None], VISION)[0])


def test_score_formula() -> None:
    v = np.array([[0.3, -1.2, 2.0, 0.5]])
    assert scores(v, v) == pytest.approx([100.0])
    assert scores(v, 7 * v) == pytest.approx([100.0])  # the length does not matter
    assert scores(v, -v) == [0.0]  # clamped at 0, as torchmetrics' CLIPScore does
    assert scores(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])) == [0.0]
    hand = scores(np.array([[3.0, 4.0], [1.0, 0.0]]), np.array([[4.0, 3.0], [1.0, 1.0]]))
    assert hand == pytest.approx([96.0, 100 / math.sqrt(2)])  # 24 / 25; cos 45 degrees
    assert scores(np.zeros((1, 2)), np.ones((1, 2))) == [0.0]  # no direction: no similarity
    with pytest.raises(ValueError, match=r"\(N, P\)"):
        scores(np.ones((2, 3)), np.ones((1, 3)))


# --- the pipeline --------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def pipeline(request: pytest.FixtureRequest, fake_bundle: Path):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    p = Pipeline(fake_bundle, BackendConfig(request.param, threads=1, cache_graphs=False))
    yield p
    p.close()


def _session(bundle: Path, name: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])


def expected_scores(bundle: Path, images: np.ndarray, prompts: list[str]) -> list[float]:
    """The bundle's two graphs run by hand on the prompts' truncated token ids."""
    t = Bundle.open(bundle).manifest.tokenizer
    ids = ClipTokenizer(bundle / t.dir, t.bos_id, t.eos_id, t.pad_id)(prompts).ids
    clip = _session(bundle, "clip")
    text = clip.run(["text_embeds"], {"input_ids": ids})[0]
    pixels = np.stack([reference_pixels(image, VISION_SIZE) for image in images]).astype(np.float32)
    image_embeds = _session(bundle, CLIP_VISION).run(None, {"pixel_values": pixels})[0]
    a, b = image_embeds.astype(np.float64), text.astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return [100 * max(c, 0.0) for c in cos]


@pytest.mark.parametrize("mode", ["standard", "deproject", "compose"])
def test_pipeline_scores_each_image_against_its_own_prompt(
    pipeline: Pipeline, fake_bundle: Path, mode: str
) -> None:
    prompts = ("a cat, (maid:1.3)", "red hat in the garden")
    options = GenerateOptions(prompts=prompts, negative_prompts=("blue dog",), num_images=2, steps=3,
                              width=80, height=64, seed=4, mode=mode)  # fmt: skip
    plain = pipeline.generate(options)
    scored = pipeline.generate(replace(options, clip_score=True))
    assert plain.clip_scores is None and "clip_score" not in plain.timings
    assert np.array_equal(plain.images, scored.images)
    assert (
        scored.clip_scores is not None and len(scored.clip_scores) == 4 and scored.timings["clip_score"] > 0
    )
    want = expected_scores(fake_bundle, scored.images, [prompts[0]] * 2 + [prompts[1]] * 2)
    assert scored.clip_scores == pytest.approx(want, abs=1e-3)
    assert all(0 <= s <= 100 for s in scored.clip_scores)


def test_long_prompts_are_scored_on_their_first_77_tokens(pipeline: Pipeline, fake_bundle: Path) -> None:
    long = " ".join(["red cat in the garden"] * 25)  # 125 words: two chunks
    base = {"prompts": (long,), "steps": 2, "seed": 1, "clip_score": True}
    chunked = pipeline.generate(GenerateOptions(**base, long_prompt="chunk"))
    truncated = pipeline.generate(GenerateOptions(**base))
    assert chunked.clip_scores == pytest.approx(
        expected_scores(fake_bundle, chunked.images, [long]), abs=1e-3
    )
    assert truncated.clip_scores == pytest.approx(
        expected_scores(fake_bundle, truncated.images, [long]), abs=1e-3
    )


def test_one_batched_clip_vision_call_per_generation(fake_bundle: Path) -> None:
    pipeline = Pipeline(fake_bundle, BackendConfig(threads=1, cache_graphs=False))
    calls: list[tuple[str, tuple[int, ...]]] = []
    run = pipeline.backend.run

    def spy(model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        calls.append((model, next(iter(feeds.values())).shape))
        return run(model, feeds)

    pipeline.backend.run = spy  # type: ignore[method-assign]
    pipeline.generate(GenerateOptions(prompts=("cat", "dog", "hat"), num_images=3, steps=1, clip_score=True))
    assert [shape for model, shape in calls if model == CLIP_VISION] == [(9, 3, VISION_SIZE, VISION_SIZE)]
    pipeline.close()


def test_models_for_lists_clip_vision_only_when_asked() -> None:
    plain = GenerateOptions(prompts=("cat",))
    assert CLIP_VISION not in Pipeline.models_for(plain)
    assert Pipeline.models_for(GenerateOptions(prompts=("cat",), clip_score=True))[-1] == CLIP_VISION


def test_infotext_gets_the_score_only_when_asked(pipeline: Pipeline) -> None:
    options = GenerateOptions(prompts=("a cat",), steps=2, seed=9)
    plain = pipeline.generate(options)
    scored = pipeline.generate(replace(options, clip_score=True))
    assert scored.clip_scores is not None
    without, with_score = (infotext(r, 0, "onnxruntime", "fp32", "m") for r in (plain, scored))
    assert "CLIP score" not in without
    assert with_score == f"{without}, CLIP score: {scored.clip_scores[0]:.2f}"


def test_merged_requests_keep_their_own_scores(fake_bundle: Path) -> None:
    """The server merges same-shape requests only with the same clip_score; split hands each its scores."""
    bundle = Bundle.open(fake_bundle)
    one, two, off = (
        validate(GenerateOptions(prompts=(p,), steps=2, seed=s, num_images=2, clip_score=c), bundle)
        for p, s, c in (("a cat", 1, True), ("a dog", 5, True), ("a dog", 5, False))
    )
    assert batch_key(one, bundle) == batch_key(two, bundle) != batch_key(off, bundle)
    pipeline = Pipeline(bundle, BackendConfig(threads=1, cache_graphs=False))
    results = split(pipeline.generate(merge([one, two], bundle)), [one, two])
    for options, result in zip([one, two], results, strict=True):
        alone = pipeline.generate(options)
        assert np.array_equal(result.images, alone.images)
        assert result.clip_scores == pytest.approx(alone.clip_scores, abs=1e-4)
    pipeline.close()


# --- what is refused -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blind_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle exported before CLIP scores: no image tower."""
    return write_fake_bundle(tmp_path_factory.mktemp("blind") / "bundle", vision=False)


@pytest.mark.parametrize(
    "vision, projection, named, not_named",
    [
        (False, True, "CLIP's image tower (clip_vision)", "text projection"),
        (True, False, "CLIP's text projection", "image tower"),
        (False, False, "CLIP's image tower (clip_vision) and CLIP's text projection", None),
    ],
)
def test_a_bundle_that_cannot_score_refuses_naming_what_is_missing(
    tmp_path: Path, vision: bool, projection: bool, named: str, not_named: str | None
) -> None:
    bundle = Bundle.open(write_fake_bundle(tmp_path / "b", vision=vision, projection=projection))
    validate(GenerateOptions(prompts=("cat",)), bundle)  # everything else still works
    with pytest.raises(RequestError) as caught:
        validate(GenerateOptions(prompts=("cat",), clip_score=True), bundle)
    message = str(caught.value)
    assert message.startswith(f"clip_score needs {named}")
    for fix in ("python -m export --model MODEL --out BUNDLE", "--projection", "safety_checker/",
                "image_encoder/"):  # fmt: skip
        assert fix in message
    if not_named:
        assert not_named not in message


def test_clip_score_must_be_a_bool(fake_bundle: Path) -> None:
    with pytest.raises(RequestError, match="clip_score must be true or false; got 1"):
        validate(GenerateOptions(prompts=("cat",), clip_score=1), Bundle.open(fake_bundle))  # type: ignore[arg-type]


def test_towers_that_do_not_fit_are_a_broken_bundle(fake_bundle_copy: Path) -> None:
    manifest = json.loads((fake_bundle_copy / "manifest.json").read_text())
    manifest["vision"]["image_size"] = 32  # the graph takes 24
    (fake_bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="does not fit"):
        validate(GenerateOptions(prompts=("cat",), clip_score=True), Bundle.open(fake_bundle_copy))


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_writes_and_logs_the_score(
    fake_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    args = ["a cat in the garden", "--bundle", str(fake_bundle), "--steps", "3", "--num-images", "2"]
    assert main([*args, "--out", str(tmp_path / "plain.png")]) == 0
    with caplog.at_level(logging.INFO, logger="sdrt"):
        assert main([*args, "--clip-score", "--out", str(tmp_path / "scored.png")]) == 0
    pipeline = Pipeline(fake_bundle, BackendConfig(cache_graphs=False))
    expected = pipeline.generate(
        GenerateOptions(prompts=("a cat in the garden",), steps=3, num_images=2, clip_score=True)
    ).clip_scores
    pipeline.close()
    assert expected is not None
    for k in range(2):
        plain, scored = Image.open(tmp_path / f"plain-{k}.png"), Image.open(tmp_path / f"scored-{k}.png")
        assert np.array_equal(np.asarray(plain), np.asarray(scored))
        assert "CLIP score" not in plain.info["parameters"]
        assert scored.info["parameters"] == f"{plain.info['parameters']}, CLIP score: {expected[k]:.2f}"
        assert f"scored-{k}.png (CLIP score {expected[k]:.2f})" in caplog.text
    assert any(line.startswith("clip_score") for line in caplog.messages)  # the timings table


def test_cli_refuses_a_bundle_without_the_tower(
    blind_bundle: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "x.png"
    assert (
        main(["a cat", "--bundle", str(blind_bundle), "--steps", "2", "--clip-score", "--out", str(out)]) == 2
    )
    assert "clip_score needs CLIP's image tower (clip_vision)" in caplog.text and not out.exists()
    assert main(["a cat", "--bundle", str(blind_bundle), "--steps", "2", "--out", str(out)]) == 0


def test_off_by_default_a_bundle_with_the_tower_makes_the_same_files(
    fake_bundle: Path, blind_bundle: Path, tmp_path: Path
) -> None:
    """The tower in the bundle and the option left off: the same PNG files, byte for byte, as a
    bundle without it (whose other graphs are the same)."""
    for bundle, name in ((fake_bundle, "with"), (blind_bundle, "without")):
        assert main(["a cat, (maid:1.2)", "--bundle", str(bundle), "--steps", "3", "--compose",
                     "--num-images", "2", "--out", str(tmp_path / f"{name}.png")]) == 0  # fmt: skip
    for k in range(2):
        with_tower, without = (tmp_path / f"{n}-{k}.png" for n in ("with", "without"))
        assert with_tower.read_bytes() == without.read_bytes()  # both folders are named "bundle"


def test_cost_tool_reports_the_stage_against_the_generation(
    fake_bundle: Path, blind_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cost_main = import_script("bench_clip_score").main

    assert cost_main(["--bundle", str(fake_bundle), "--steps", "2", "--runs", "1", "--threads", "1"]) == 0
    cpu, line = capsys.readouterr().out.splitlines()
    assert cpu.startswith("CPU: ") and "flags: " in cpu
    match = re.fullmatch(
        r"clip_score (\S+) s of (\S+) s per generation \((\S+) %\): 1 image\(s\), 2 steps, "
        r"onnxruntime, median of 1",
        line,
    )
    assert match and 0 < float(match[1]) < float(match[2]) and 0 < float(match[3]) < 100
    assert cost_main(["--bundle", str(blind_bundle), "--steps", "2", "--runs", "1"]) == 2
    assert "clip_score needs CLIP's image tower" in capsys.readouterr().err
