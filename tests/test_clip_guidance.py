"""CLIP guidance on the tiny preset: the exported gradient graph against PyTorch autograd, scale 0
against plain CFG bit for bit (runtime and reference), and the runtime's guided images against the
PyTorch reference (export/reference_guidance.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export.clip_guidance import ClipGuidanceGradient
from export.compare.cli import main as compare_main
from export.models import SDComponents, build_preset
from export.reference import ReferencePipeline
from export.reference_guidance import Sampling, clip_guided, second_pass
from runtime.backends import BackendConfig
from runtime.clip_guidance import resize_matrices
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.integration

PROMPT, NEGATIVE = "a photo of a cat", "blurry"
SIZE, STEPS, SKIP, SCALE = 128, 8, 3, 2000.0


@pytest.fixture(scope="module")
def components() -> SDComponents:
    return build_preset("tiny")


@pytest.fixture(scope="module")
def pipeline(tiny_guidance_bundle: Path) -> Pipeline:
    return Pipeline(tiny_guidance_bundle, BackendConfig("onnxruntime", precision="fp32"))


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    ("file", "min_cos"), [("clip_guidance.onnx", 0.999), ("clip_guidance.fp16.onnx", 0.999)]
)
@pytest.mark.parametrize(("h", "w"), [(16, 16), (8, 24)])
def test_onnx_gradient_matches_autograd(
    tiny_guidance_bundle: Path, components: SDComponents, file: str, min_cos: float, h: int, w: int
) -> None:
    """Cosine >= 0.999 on shapes other than the trace's (measured: fp32 1.0, max abs <= 1e-8 against
    gradients up to ~5e-3; fp16 >= 0.9999)."""
    assert components.vision is not None
    gradient = ClipGuidanceGradient(components.vae, components.vision).eval()
    session = ort.InferenceSession(str(tiny_guidance_bundle / file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(h * w)
    latent = rng.standard_normal((2, 4, h, w)).astype(np.float32)
    text = rng.standard_normal((2, 64)).astype(np.float32)
    rows, cols = resize_matrices(8 * h, 8 * w, components.vision.image_size)
    feeds = {"latent": latent, "text_embeds": text, "resize_rows": rows, "resize_cols": cols}
    (ours,) = session.run(None, feeds)
    torch_grad = gradient(*(torch.from_numpy(v) for v in feeds.values())).numpy()
    assert _cosine(ours, torch_grad) >= min_cos
    if file == "clip_guidance.onnx":
        assert np.abs(ours - torch_grad).max() <= 1e-3 * np.abs(torch_grad).max()
    # rows are independent: the batch of two is two single-image gradients. fp16 kernels round
    # differently at batch 1 and 2, and between runs (a CI run measured 2.2 % of the largest
    # gradient); mixing rows would move the gradient by its own size.
    single = session.run(None, {k: v[:1] if k in ("latent", "text_embeds") else v for k, v in feeds.items()})[
        0
    ]
    relative = 1e-3 if file == "clip_guidance.onnx" else 5e-2
    np.testing.assert_allclose(single, ours[:1], rtol=0, atol=relative * np.abs(ours).max())
    assert _cosine(single, ours[:1]) >= 0.9999


def _options(**fields: object) -> GenerateOptions:
    latents = np.random.default_rng(7).standard_normal((1, 4, SIZE // 8, SIZE // 8)).astype(np.float32)
    base: dict[str, object] = {
        "prompts": (PROMPT,), "negative_prompts": (NEGATIVE,), "steps": STEPS, "seed": 3,
        "height": SIZE, "width": SIZE, "latents": latents, "scheduler": "ddim",
    }  # fmt: skip
    return GenerateOptions(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_scale_zero_is_plain_cfg_bit_for_bit(pipeline: Pipeline, scheduler: str) -> None:
    plain = pipeline.generate(_options(scheduler=scheduler, latents=None))
    zero = pipeline.generate(
        _options(scheduler=scheduler, latents=None, clip_guidance=0.0, clip_guidance_skip=0)
    )
    assert np.array_equal(plain.images, zero.images) and "clip_guidance" not in zero.timings
    guided = pipeline.generate(
        _options(scheduler=scheduler, latents=None, clip_guidance=SCALE, clip_guidance_skip=SKIP)
    )
    assert not np.array_equal(plain.images, guided.images) and guided.timings["clip_guidance"] > 0


def test_reference_scale_zero_is_plain_cfg_bit_for_bit(components: SDComponents) -> None:
    ref = ReferencePipeline(components)
    latents = torch.from_numpy(_options().latents)  # type: ignore[arg-type]
    common = {"steps": STEPS, "guidance": 7.5, "seed": 3, "height": SIZE, "width": SIZE, "scheduler": "ddim"}
    plain = ref.generate(PROMPT, NEGATIVE, latents=latents, **common)
    sampling = Sampling(**common, latents=latents)  # type: ignore[arg-type]
    assert np.array_equal(clip_guided(ref, PROMPT, NEGATIVE, clip_guidance=0.0, sampling=sampling), plain)
    # the written-out loop of pass 2, with the correction off, is diffusers' own loop
    x0 = torch.zeros(1, 4, SIZE // 8, SIZE // 8)
    assert np.array_equal(second_pass(ref, PROMPT, NEGATIVE, x0, 0.0, 0, sampling), plain)


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler", "dpmpp_2m"])
def test_runtime_matches_the_reference_with_guidance(
    pipeline: Pipeline, components: SDComponents, scheduler: str
) -> None:
    """Guided images within 2/255 of PyTorch's, and guidance moves them well beyond that."""
    options = _options(scheduler=scheduler, clip_guidance=SCALE, clip_guidance_skip=SKIP)
    ours = pipeline.generate(options).images.astype(int)
    plain = pipeline.generate(_options(scheduler=scheduler)).images.astype(int)
    ref = ReferencePipeline(components)
    latents = torch.from_numpy(options.latents)  # type: ignore[arg-type]
    sampling = Sampling(steps=STEPS, seed=3, height=SIZE, width=SIZE, scheduler=scheduler, latents=latents)
    theirs = clip_guided(
        ref, PROMPT, NEGATIVE, clip_guidance=SCALE, clip_guidance_skip=SKIP, sampling=sampling
    )
    theirs_u8 = (theirs * 255).round().astype(int)
    assert np.abs(ours - theirs_u8).max() <= 2
    assert np.abs(ours - plain).max() > 10


def test_tensorrt_profiles_tie_the_resize_sides_to_the_latent(tiny_guidance_bundle: Path) -> None:
    """The gradient graph's engine: the resize matrices' image sides follow the latent's (x8)."""
    from engines.profiles import ProfileRequest, model_profiles
    from runtime.bundle import Bundle

    bundle = Bundle.open(tiny_guidance_bundle)
    static, ranged = model_profiles(
        bundle, "clip_guidance", ProfileRequest(shapes=((192, 128),), dynamic=(64, 256))
    )
    assert (static["height"].opt, static["width"].opt) == (16, 24)
    assert (static["image_height"].min, static["image_height"].max, static["image_width"].opt) == (
        128,
        128,
        192,
    )
    assert (ranged["image_height"].min, ranged["image_height"].max) == (64, 256)
    assert (ranged["height"].min, ranged["height"].max) == (8, 32)


def test_skip_must_leave_a_guided_step(tiny_guidance_bundle: Path) -> None:
    from runtime.bundle import Bundle
    from runtime.errors import RequestError
    from runtime.options import validate

    with pytest.raises(RequestError, match=r"clip_guidance_skip must be below steps \(4\) .*; got 4"):
        validate(
            _options(steps=4, clip_guidance=1.0, clip_guidance_skip=4), Bundle.open(tiny_guidance_bundle)
        )


def test_cost_tool_reports_guided_against_unguided(
    tiny_guidance_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.scripts import import_script

    cost_main = import_script("bench_clip_guidance").main
    args = [
        "--bundle",
        str(tiny_guidance_bundle),
        "--size",
        "64x64",
        "--steps",
        "4",
        "--clip-guidance-skip",
        "2",
    ]
    assert cost_main([*args, "--threads", "1"]) == 0
    cpu, line = capsys.readouterr().out.splitlines()
    assert cpu.startswith("CPU: ") and "flags: " in cpu
    match = re.fullmatch(
        r"unguided (\S+) s, guided (\S+) s \((\S+)x; second pass (\S+) s\): 4 ddim steps, scale 2000, "
        r"skip 2, onnxruntime, median of 1",
        line,
    )
    assert match and 0 < float(match[1]) < float(match[2]) and float(match[4]) > 0


def test_compare_tool_guides_on_both_sides(tiny_guidance_bundle: Path, tmp_path: Path) -> None:
    """The compare tool's --clip-guidance: each side's guided image, within 2/255 of each other, and
    CLIP scores side by side. (Here, not in test_compare.py: under pytest-xdist's loadfile, a second
    file on this bundle would keep a worker waiting for its minutes-long export.)"""
    out = tmp_path / "out"
    flags = ["--runs", "1", "--no-bf16", "--cache-intervals", "none", "--clip-guidance", "2000"]
    flags += ["--clip-guidance-skip", "1"]
    fast = ["--size", "64x64", "--steps", "3", "--seed", "5", "--prompt", PROMPT, "--negative", NEGATIVE]
    fast += ["--scheduler", "ddim", "--threads", "2"]
    code = compare_main(["--bundle", str(tiny_guidance_bundle), "--out", str(out), *flags, *fast])
    report = json.loads((out / "report.json").read_text())
    g = report["accuracy"]["clip_guidance"]
    assert code == 0 and g["scale"] == 2000 and g["skip"] == 1
    assert g["image"]["max_pixel_diff"] <= 2
    guided, plain = (np.asarray(Image.open(out / f"runtime{suffix}.png"), int) for suffix in ("-guided", ""))
    assert np.abs(guided - plain).max() > 10, "guidance did not move the image: proves nothing"
    for score in (g["clip_score"], g["clip_score_unguided"]):
        assert 0 <= score["pytorch"] <= 100 and abs(score["runtime"] - score["pytorch"]) < 1
    assert g["runtime"]["stages"]["clip_guidance"] > 0
    assert "## CLIP guidance" in (out / "report.md").read_text()
