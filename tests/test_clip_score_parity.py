"""The runtime's CLIP score against PyTorch and transformers on the tiny preset's own weights.

Reference: transformers' CLIPImageProcessor (its PIL backend: CLIPImageProcessorPil on
transformers 5, CLIPImageProcessor on 4) -> CLIPVisionModelWithProjection's image_embeds, and
CLIPTextModel's pooler_output @ the preset's text_projection^T for the prompt (CLIPTokenizer,
truncated to 77), score = 100 * max(cos, 0). The runtime's pixel_values equal the processor's,
and its scores are within 0.01 of the reference on every mode (fp16 files: 0.1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from export.models import build_preset
from runtime.backends import BackendConfig
from runtime.bundle import Bundle
from runtime.clip_score import preprocess
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline
from runtime.specs import CLIP_VISION

pytestmark = pytest.mark.integration  # the PyTorch reference

TOLERANCE = {"fp32": 0.01, "fp16": 0.1}  # CLIP score points (measured: 1e-5 and 0.02)
PROMPTS = ("a cat maid, watercolor", "red hat in the garden, (blue:1.2)")


def _processor_class() -> type:
    """CLIPImageProcessor's PIL implementation (transformers 5 made a torchvision one the default)."""
    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    opened = Bundle.open(tiny_bundle)
    assert CLIP_VISION in opened.models and opened.manifest.vision is not None, (
        "the tiny bundle has no clip_vision: the exporter (export/build.py) does not write CLIP's "
        "image tower for presets yet, so the runtime's CLIP score cannot be compared"
    )
    return opened


@pytest.fixture(scope="module")
def reference(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory):
    seed = int(bundle.manifest.source.get("seed", 0))
    components = build_preset("tiny", seed=seed, cache_dir=tmp_path_factory.mktemp("cache"))
    assert components.vision is not None, "build_preset('tiny') has no CLIP image tower"
    return components


@pytest.fixture(scope="module")
def processor(bundle: Bundle):
    vision = bundle.manifest.vision
    assert vision is not None
    size = vision.image_size
    return _processor_class()(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(vision.mean),
        image_std=list(vision.std),
        resample=3,  # PIL bicubic
        do_center_crop=True,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
    )


def _photo(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / (width - 1), 255 * y / (height - 1), 255 * (x + y) / (width + height)], -1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("width, height", [(128, 96), (96, 128), (77, 64), (200, 33), (64, 64), (20, 27)])
def test_pixels_equal_clip_image_processor(bundle: Bundle, processor, width: int, height: int) -> None:
    image = _photo(width, height, seed=width + height)
    assert bundle.manifest.vision is not None
    ours = preprocess(image[None], bundle.manifest.vision)
    theirs = processor(images=[image], return_tensors="np")["pixel_values"]
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.float32
    np.testing.assert_array_equal(ours, theirs)


def _reference_scores(components, processor, images: np.ndarray, prompts: list[str]) -> list[float]:
    vision = components.vision
    tokenizer = components.tokenizer()
    with torch.no_grad():
        pixels = torch.from_numpy(processor(images=list(images), return_tensors="np")["pixel_values"])
        image_embeds = vision.module(pixel_values=pixels).image_embeds.double()
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        pooled = components.text_encoder(input_ids=ids.input_ids).pooler_output
        text_embeds = (pooled @ components.text_projection.T).double()
        cos = torch.nn.functional.cosine_similarity(image_embeds, text_embeds, dim=-1)
    return (100 * cos.clamp(min=0)).tolist()


@pytest.fixture(scope="module", params=["fp32", "fp16"])
def pipeline(bundle: Bundle, request: pytest.FixtureRequest):
    p = Pipeline(bundle, BackendConfig(precision=request.param))
    yield p
    p.close()


@pytest.mark.parametrize("mode", ["standard", "deproject", "compose"])
def test_scores_match_pytorch(pipeline: Pipeline, reference, processor, mode: str) -> None:
    options = GenerateOptions(prompts=PROMPTS, negative_prompts=("blurry",), num_images=2, steps=4, seed=3,
                              width=128, height=96, mode=mode, clip_score=True)  # fmt: skip
    result = pipeline.generate(options)
    assert result.clip_scores is not None
    expected = _reference_scores(reference, processor, result.images, [p for p in PROMPTS for _ in range(2)])
    tolerance = TOLERANCE[pipeline.backend.precision]
    np.testing.assert_allclose(result.clip_scores, expected, rtol=0, atol=tolerance)


def test_image_embeds_match_pytorch(bundle: Bundle, reference, processor) -> None:
    """The graph alone, on a batch of preprocessed pixels: ONNX Runtime vs the PyTorch tower."""
    images = np.stack([_photo(96, 80, seed=s) for s in range(3)])
    pixels = processor(images=list(images), return_tensors="np")["pixel_values"]
    pipeline = Pipeline(bundle, BackendConfig())
    try:
        ours = pipeline.backend.run(CLIP_VISION, {"pixel_values": pixels})["image_embeds"]
    finally:
        pipeline.close()
    with torch.no_grad():
        theirs = reference.vision.module(pixel_values=torch.from_numpy(pixels)).image_embeds.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
