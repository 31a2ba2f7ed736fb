"""img2img and inpainting: the runtime against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline on the same tiny weights.

Both draw the same numbers: diffusers' `randn_tensor` (the VAE's latent sample, the start noise,
the ancestral step noise) is replaced by draws from the generator the runtime uses for the image,
in the order both make them. Tolerance as for text-to-image: max pixel difference <= 2/255.
"""

from __future__ import annotations

import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint as inpaint_module
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import numpy as np
import pytest
import torch
from PIL import Image

from export.models import build_preset
from export.reference import ReferencePipeline
from runtime.backends import BackendConfig
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.integration  # the PyTorch reference

SIZE, STEPS, SEED = 128, 6, 11
MAX_PIXEL_DIFF = 2  # out of 255
SCHEDULERS = ["ddim", "euler_a", "dpmpp_2m"]
STRENGTHS = [0.3, 0.75, 1.0]


def _init_image() -> np.ndarray:
    """Smooth colour gradients with a bright disc: structure the VAE keeps, not flat noise."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(float)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1) * 0.7 + 0.3 * disc[..., None]
    return (rgb * 255).round().astype(np.uint8)


def _mask() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[32:96, 40:112] = 255
    return mask


def _same_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' random tensors from the runtime's generator for image 0 (seed SEED), in call order."""
    rng = np.random.default_rng(SEED)

    def draw(shape, generator=None, device=None, dtype=None, **_):
        return torch.from_numpy(rng.standard_normal(tuple(shape)[1:], dtype=np.float32)[None])

    for module in (vae_module, img2img_module, inpaint_module, euler_a_module):
        monkeypatch.setattr(module, "randn_tensor", draw)


def _reference(bundle_seed_preset: str, tmp_path_factory) -> ReferencePipeline:
    return ReferencePipeline(build_preset(bundle_seed_preset, cache_dir=tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _reference("tiny", tmp_path_factory)


@pytest.fixture(scope="module")
def inpaint_reference(tmp_path_factory):
    return _reference("tiny-inpaint", tmp_path_factory)


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def backend(request):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    return request.param


def _compare(pipeline: Pipeline, reference, monkeypatch, scheduler, strength, mask, negative, blur=0):
    image = _init_image()
    ours = pipeline.generate(
        GenerateOptions(
            prompts=("a photo of a cat",), negative_prompts=(negative,), steps=STEPS, seed=SEED,
            scheduler=scheduler, init_image=image, mask=mask, strength=strength, mask_blur=blur,
        )
    ).images  # fmt: skip
    _same_draws(monkeypatch)
    theirs = reference.generate(
        "a photo of a cat", negative, steps=STEPS, seed=SEED, height=SIZE, width=SIZE, scheduler=scheduler,
        init_image=Image.fromarray(image), mask=None if mask is None else Image.fromarray(mask),
        strength=strength, mask_blur=blur,
    )  # fmt: skip
    theirs = (theirs * 255).round().astype(np.uint8)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert ours.std() > 5, "degenerate image: the comparison would prove nothing"
    diff = np.abs(ours.astype(int) - theirs).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255"
    return ours


@pytest.fixture(scope="module")
def pipeline(backend, tiny_bundle):
    p = Pipeline(tiny_bundle, BackendConfig(backend))
    yield p
    p.close()


@pytest.fixture(scope="module")
def inpaint_pipeline(backend, tiny_inpaint_bundle):
    p = Pipeline(tiny_inpaint_bundle, BackendConfig(backend))
    yield p
    p.close()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "blend"])
@pytest.mark.parametrize("negative", ["", "blurry, dog"])
def test_standard_unet_matches_diffusers(
    pipeline, reference, monkeypatch, scheduler, strength, masked, negative
):
    mask = _mask() if masked else None
    _compare(pipeline, reference, monkeypatch, scheduler, strength, mask, negative)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("negative", ["", "blurry, dog"])
def test_inpainting_unet_matches_diffusers(
    inpaint_pipeline, inpaint_reference, monkeypatch, scheduler, strength, negative
):
    _compare(inpaint_pipeline, inpaint_reference, monkeypatch, scheduler, strength, _mask(), negative)


@pytest.mark.parametrize("blur", [4, 12])
def test_mask_blur_matches_diffusers(inpaint_pipeline, inpaint_reference, monkeypatch, blur):
    _compare(inpaint_pipeline, inpaint_reference, monkeypatch, "ddim", 0.75, _mask(), "", blur)


def test_blend_keeps_the_unmasked_latents(pipeline):
    """Latent blending: after the last step the latents outside the mask are the init image's (the
    same for any prompt); inside, the prompt matters. (Pixels outside can still move: the VAE
    decoder's attention sees the whole image.)"""
    image, mask = _init_image(), _mask()

    def final_latents(prompt: str) -> np.ndarray:
        seen: list[np.ndarray] = []
        options = GenerateOptions(
            prompts=(prompt,),
            steps=STEPS,
            seed=SEED,
            scheduler="ddim",
            init_image=image,
            mask=mask,
            strength=1.0,
        )
        pipeline.generate(options, on_step=lambda i, t, x: seen.append(x))
        return seen[-1][0]

    a, b = final_latents("a photo of a cat"), final_latents("a red car on the moon")
    inside = mask[::8, ::8] > 0
    assert np.array_equal(a[:, ~inside], b[:, ~inside])
    assert np.abs(a - b)[:, inside].mean() > 1e-3


def test_a_diffusers_inpainting_folder_exports_like_the_preset(tiny_inpaint_bundle, tmp_path):
    """A local diffusers folder with an inpainting UNet (here: the tiny-inpaint weights saved as one)
    exports to a 9-channel bundle that paints exactly what the preset's bundle paints."""
    from export.build import ExportOptions, export_bundle
    from export.models import save_diffusers_folder
    from runtime.bundle import Bundle

    folder = save_diffusers_folder(
        build_preset("tiny-inpaint", cache_dir=tmp_path / "cache"), tmp_path / "sd"
    )
    out = tmp_path / "bundle"
    export_bundle(ExportOptions(model=str(folder), out=out, precision="fp32", deprojector="none"))
    assert Bundle.open(out).unet_in_channels == 9
    options = GenerateOptions(
        prompts=("a cat",), steps=3, seed=SEED, scheduler="ddim", init_image=_init_image(), mask=_mask()
    )
    ours, preset = (
        Pipeline(out).generate(options).images,
        Pipeline(tiny_inpaint_bundle).generate(options).images,
    )
    assert np.array_equal(ours, preset)
