"""The runtime against diffusers' StableDiffusionPipeline on the same tiny weights.

Same scheduler, same initial latents (and for ancestral samplers the same per-step noise),
so the only differences are ONNX Runtime's or OpenVINO's fp32 arithmetic vs PyTorch's: max pixel
difference <= 2/255 for each backend.
"""

from __future__ import annotations

import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import diffusers.schedulers.scheduling_lcm as lcm_module
import numpy as np
import pytest
import torch

from export.models import build_preset
from export.reference import ReferencePipeline
from runtime.backends import BackendConfig
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.integration  # the PyTorch reference

SIZE, STEPS, SEED = 128, 6, 7
MAX_PIXEL_DIFF = 2  # out of 255


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def runtime_pipeline(request, tiny_bundle):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    pipeline = Pipeline(tiny_bundle, BackendConfig(request.param))
    yield pipeline
    pipeline.close()


@pytest.fixture(scope="module")
def reference(tiny_bundle, tmp_path_factory):
    from export.deprojector import load_deprojector

    components = build_preset("tiny", cache_dir=tmp_path_factory.mktemp("cache"))
    deprojector_dir = tiny_bundle / "deprojector_checkpoint"
    deprojector = load_deprojector(deprojector_dir) if deprojector_dir.is_dir() else None
    return ReferencePipeline(components, deprojector)


def _latents(seed: int = SEED) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def _reference_image(reference, monkeypatch, scheduler: str, latents: np.ndarray, **kwargs) -> np.ndarray:
    noise_rng = np.random.default_rng(
        SEED
    )  # the runtime's per-image rng draws only noise when latents are given

    def same_noise(shape, generator=None, device=None, dtype=None, **_):
        return torch.from_numpy(noise_rng.standard_normal(tuple(shape)[1:], dtype=np.float32)[None])

    for module in (euler_a_module, lcm_module):  # the samplers that draw per-step noise
        monkeypatch.setattr(module, "randn_tensor", same_noise)
    images = reference.generate(
        seed=SEED,
        height=SIZE,
        width=SIZE,
        steps=STEPS,
        scheduler=scheduler,
        latents=torch.from_numpy(latents),
        **kwargs,
    )
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "pndm", "dpmpp_2m", "lcm"])
@pytest.mark.parametrize("negative", ["", "blurry, dog"])
def test_runtime_matches_diffusers(runtime_pipeline, reference, monkeypatch, scheduler, negative):
    latents = _latents()
    ours = runtime_pipeline.generate(
        GenerateOptions(
            prompts=("a photo of a cat",),
            negative_prompts=(negative,),
            steps=STEPS,
            seed=SEED,
            height=SIZE,
            width=SIZE,
            scheduler=scheduler,
            latents=latents,
        )
    ).images
    theirs = _reference_image(
        reference, monkeypatch, scheduler, latents, prompt="a photo of a cat", negative_prompt=negative
    )
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert ours.std() > 5, "degenerate image: the comparison would prove nothing"
    assert np.abs(ours.astype(int) - theirs).max() <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("mode", ["deproject", "compose"])
def test_deprojector_paths_match_reference(runtime_pipeline, reference, monkeypatch, mode):
    if reference.deprojector is None:
        pytest.fail("the tiny bundle must carry its deprojector checkpoint for this comparison")
    latents = _latents()
    prompt = "a photo of a cat, (maid:1.3), smiling"
    ours = runtime_pipeline.generate(
        GenerateOptions(
            prompts=(prompt,),
            negative_prompts=("blurry",),
            steps=STEPS,
            seed=SEED,
            height=SIZE,
            width=SIZE,
            scheduler="ddim",
            mode=mode,
            compose_mode="diff_only",
            normalize=True,
            latents=latents,
        )
    ).images
    theirs = _reference_image(
        reference,
        monkeypatch,
        "ddim",
        latents,
        prompt=prompt,
        negative_prompt="blurry",
        mode=mode,
        compose_mode="diff_only",
        normalize=True,
    )
    assert ours.std() > 5
    assert np.abs(ours.astype(int) - theirs).max() <= MAX_PIXEL_DIFF


def test_fp16_bundle_runs_close_to_fp32(runtime_pipeline, tiny_bundle):
    fp16 = Pipeline(tiny_bundle, BackendConfig(precision="fp16"))
    options = GenerateOptions(prompts=("a cat",), steps=4, height=SIZE, width=SIZE, scheduler="ddim")
    a, b = runtime_pipeline.generate(options).images, fp16.generate(options).images
    assert np.abs(a.astype(int) - b).mean() < 4
