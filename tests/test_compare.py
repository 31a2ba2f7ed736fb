"""scripts/compare.py on the tiny bundle: the report's numbers are the ones an independent
computation gets, an impossible gate flips the exit code to 1, and bad arguments exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from export.compare.cli import main
from export.models import build_preset
from export.onnx_export import ClipWrapper
from export.reference import ReferencePipeline
from runtime.backends import PRECISIONS, BackendConfig, open_backend
from runtime.bundle import Bundle
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline
from tests.bundles import copy_bundle

pytestmark = pytest.mark.integration  # runs the PyTorch side of the compare tool

SIZE, STEPS, SEED = 64, 3, 5
PROMPT, NEGATIVE = "a photo of a cat", "blurry"
FAST = [
    "--size",
    f"{SIZE}x{SIZE}",
    "--steps",
    str(STEPS),
    "--seed",
    str(SEED),
    "--prompt",
    PROMPT,
    "--negative",
    NEGATIVE,
    "--scheduler",
    "ddim",
    "--threads",
    "2",
]


@pytest.fixture(scope="module")
def compared(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, Path]:
    out = tmp_path_factory.mktemp("compare")
    code = main(["--bundle", str(tiny_bundle), "--out", str(out), "--runs", "2", "--bf16", *FAST])
    return code, json.loads((out / "report.json").read_text()), out


def test_report_is_written_and_passes(compared):
    code, report, out = compared
    assert code == 0 and report["passed"]
    for name in (
        "report.md",
        "report.json",
        "image_grid.png",
        "latent_drift.png",
        "stage_times.png",
        "deprojector_positions.png",
        "pytorch.png",
        "runtime.png",
    ):
        assert (out / name).is_file(), name
    markdown = (out / "report.md").read_text()
    assert "Result: **PASS**" in markdown and "random weights" in markdown
    clip = report["accuracy"]["end_to_end"][
        "clip_score"
    ]  # the preset's random towers: a number, not a verdict
    assert clip["source"] == "preset" and 0 <= clip["pytorch"] <= 100 and abs(clip["difference"]) < 0.5
    assert f"PyTorch {clip['pytorch']:.2f}, runtime {clip['runtime']:.2f} (preset)" in markdown
    assert report["memory"]["runtime_imported_torch"] is False
    dep = report["accuracy"]["components"]["deprojector"]["hidden_states"]
    assert len(dep["per_position_cosine"]) == len(dep["per_position_max_abs"]) == 77
    drift = report["accuracy"]["end_to_end"]["latent_drift"]
    assert len(drift["max_abs"]) == len(drift["timesteps"]) == STEPS
    speed = report["speed"]
    for impl in ("pytorch_fp32", "pytorch_bf16", "runtime"):
        assert speed["end_to_end"][impl]["total"]["runs"] == 2
    e2e = speed["end_to_end"]
    assert e2e["speedup_vs_fp32"] == pytest.approx(
        e2e["pytorch_fp32"]["total"]["median_s"] / e2e["runtime"]["total"]["median_s"]
    )


def test_component_numbers_match_an_independent_computation(compared, tiny_bundle):
    """CLIP through the transformers tokenizer + PyTorch wrapper vs ONNX Runtime, recomputed here."""
    _, report, _ = compared
    components = build_preset("tiny")
    ids = components.tokenizer()(
        [NEGATIVE, PROMPT], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        want = ClipWrapper(components.text_encoder, components.text_projection)(ids)[0].numpy()
    backend = open_backend(Bundle.open(tiny_bundle), BackendConfig(threads=2))
    got = backend.run("clip", {"input_ids": ids.numpy().astype(np.int32)})["last_hidden_state"]
    a, b = got.astype(np.float64).reshape(2, -1), want.astype(np.float64).reshape(2, -1)
    cosine = min((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    reported = report["accuracy"]["components"]["clip"]["last_hidden_state"]
    assert reported["max_abs"] == pytest.approx(np.abs(a - b).max(), rel=1e-6)
    assert reported["mean_abs"] == pytest.approx(np.abs(a - b).mean(), rel=1e-6)
    assert reported["cosine"] == pytest.approx(cosine, abs=1e-12)


def test_image_numbers_match_an_independent_run(compared, tiny_bundle):
    """diffusers (ReferencePipeline) and the runtime from the same latents, metrics by skimage here."""
    _, report, out = compared
    latents = np.random.default_rng(SEED).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)
    theirs = ReferencePipeline(build_preset("tiny")).generate(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        height=SIZE,
        width=SIZE,
        scheduler="ddim",
        latents=torch.from_numpy(latents),
    )
    theirs = (theirs[0] * 255).round().astype(np.uint8)
    ours = (
        Pipeline(tiny_bundle, BackendConfig(threads=2))
        .generate(
            GenerateOptions(
                prompts=(PROMPT,),
                negative_prompts=(NEGATIVE,),
                steps=STEPS,
                height=SIZE,
                width=SIZE,
                scheduler="ddim",
                latents=latents,
            )
        )
        .images[0]
    )
    np.testing.assert_array_equal(np.asarray(Image.open(out / "runtime.png")), ours)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "pytorch.png")), theirs)
    image = report["accuracy"]["end_to_end"]["image"]
    assert image["max_pixel_diff"] == np.abs(ours.astype(int) - theirs).max()
    if (ours == theirs).all():
        assert image["psnr_db"] == "inf"  # report.json writes infinite PSNR as a string
    else:
        assert image["psnr_db"] == pytest.approx(peak_signal_noise_ratio(theirs, ours, data_range=255))
    assert image["ssim"] == pytest.approx(
        structural_similarity(theirs, ours, channel_axis=-1, data_range=255)
    )


def test_bf16_timing_follows_the_cpu_flags(tmp_path):
    from runtime.cpu import bf16_instructions, cpu_flags, is_x86

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f\n")
    assert cpu_flags(cpuinfo) >= {"avx2", "avx512f"} and bf16_instructions(cpu_flags(cpuinfo)) == []
    assert is_x86(cpu_flags(cpuinfo)) and not is_x86(frozenset({"fp", "asimd", "sve"}))  # arm64's
    cpuinfo.write_text("processor\t: 0\nflags\t\t: avx2 avx512_bf16 amx_bf16 amx_tile\n")
    assert bf16_instructions(cpu_flags(cpuinfo)) == ["avx512_bf16", "amx_bf16"]
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_default_skips_bf16_without_native_instructions(compared, tiny_bundle, tmp_path, monkeypatch, capsys):
    """No bf16 flag: the bf16 timing is skipped with a printed reason; the fixture's --bf16 forced it."""
    from export.compare import cli

    monkeypatch.setattr(cli, "bf16_instructions", lambda: [])
    code = main(["--bundle", str(tiny_bundle), "--out", str(tmp_path), "--runs", "1", *FAST])
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0 and report["speed"]["end_to_end"]["pytorch_bf16"] is None
    reason = "skipping the PyTorch bf16 timings: this CPU has none of avx512_bf16, amx_bf16"
    assert reason in capsys.readouterr().err
    assert compared[1]["speed"]["end_to_end"]["pytorch_bf16"] is not None


def test_impossible_gate_exits_1(tiny_bundle, tmp_path):
    code = main(
        [
            "--bundle",
            str(tiny_bundle),
            "--out",
            str(tmp_path),
            "--runs",
            "1",
            "--no-bf16",
            "--max-abs-unet",
            "0",
            *FAST,
        ]
    )
    report = json.loads((tmp_path / "report.json").read_text())
    failed = [c["name"] for c in report["checks"] if not c["passed"]]
    assert code == 1 and not report["passed"] and failed == ["unet.noise_pred max abs"]
    assert "**FAIL**" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--img2img", "0"], "argument --img2img: must be a strength with 0 < STRENGTH <= 1; got '0'"),
        (["--img2img", "1.5"], "argument --img2img: must be a strength with 0 < STRENGTH <= 1"),
        (["--img2img", "nan"], "argument --img2img: must be a strength with 0 < STRENGTH <= 1"),
        (["--mask"], "--mask needs --img2img STRENGTH"),
        (["--img2img", "0.2", "--steps", "3"], "--img2img/--steps: strength x steps must give at least one"),
        (["--bundle", "{missing}"], "is not a directory: create one with `python -m export`"),
        (["--size", "100x100"], "--size: height must be a multiple of"),
        (["--size", "big"], "WIDTHxHEIGHT"),
        (["--runs", "0"], "must be an integer >= 1"),
        (["--min-cosine", "2"], "from -1 to 1"),
        (["--scheduler", "euler_a"], "invalid choice"),
        (["--max-abs-unet", "-1"], "from 0 to inf"),
        (["--precision", "bf16"], "--precision/--threads: precision must be fp32 or fp16 for backend"),
    ],
)
def test_bad_arguments_exit_2(tiny_bundle, tmp_path, capsys, args, message):
    args = [a.replace("{missing}", str(tmp_path / "nope")) for a in args]
    base = [] if "--bundle" in args else ["--bundle", str(tiny_bundle)]
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main([*base, *args, "--out", str(tmp_path / "out")]))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


I2I_STEPS, I2I_STRENGTH = 4, 0.5  # 2 of 4 steps run


def _image_run(bundle: Path, out: Path, *flags: str) -> tuple[int, dict]:
    args = ["--bundle", str(bundle), "--out", str(out), "--runs", "1", "--no-bf16", *FAST]
    args += ["--steps", str(I2I_STEPS), "--cache-intervals", "none", *flags]
    code = main(args)
    return code, json.loads((out / "report.json").read_text())


def _assert_image_workload(code: int, report: dict, out: Path, kind: str) -> None:
    """Passes its gates, matches diffusers to 2/255, runs and times the encoder on both sides."""
    assert code == 0 and report["passed"], [c for c in report["checks"] if not c["passed"]]
    w = report["workload"]
    assert w["kind"] == kind and w["strength"] == I2I_STRENGTH and w["mask"] == (kind == "inpainting")
    assert w["steps_run"] == int(I2I_STEPS * I2I_STRENGTH)
    assert report["settings"]["strength"] == I2I_STRENGTH
    e2e = report["accuracy"]["end_to_end"]
    assert e2e["image"]["max_pixel_diff"] <= 2 and e2e["schedule_match"]
    assert len(e2e["latent_drift"]["max_abs"]) == len(e2e["runtime_timesteps"]) == w["steps_run"]
    assert np.asarray(Image.open(out / "runtime.png")).std() > 5, "degenerate image: proves nothing"
    encoder = report["accuracy"]["components"]["vae_encoder"]
    assert set(encoder) == {"latent_mean", "latent_std"}
    assert all(m["shape"] == [1, 4, SIZE // 8, SIZE // 8] for m in encoder.values())
    gated = {c["name"] for c in report["checks"]}
    assert {"vae_encoder.latent_mean cosine", "vae_encoder.latent_std max abs"} <= gated
    speed = report["speed"]
    assert speed["components"]["vae_encoder"]["runtime"]["runs"] == 1
    for impl in ("pytorch_fp32", "runtime"):
        assert list(speed["end_to_end"][impl]["stages"]) == ["text", "encode", "denoise", "decode"]
        assert speed["end_to_end"][impl]["stages"]["encode"]["median_s"] > 0
    markdown = (out / "report.md").read_text()
    assert f"{kind} at strength 0.5: 2 steps run" in markdown and "| encode (median) |" in markdown
    assert "`vae_encoder.latent_mean`" in markdown


def test_img2img_workload(tiny_bundle, tmp_path):
    code, report = _image_run(tiny_bundle, tmp_path, "--img2img", str(I2I_STRENGTH))
    _assert_image_workload(code, report, tmp_path, "img2img")
    assert report["workload"]["pytorch_pipeline"] == "StableDiffusionImg2ImgPipeline"
    assert report["workload"]["init_image"] == f"export/init_images.py init_image({SIZE}, {SIZE})"


@pytest.mark.parametrize(
    ("bundle_fixture", "mask_mode", "unet_channels"),
    [("tiny_bundle", "blend", 4), ("tiny_inpaint_bundle", "unet", 9)],
    ids=["standard-unet", "inpainting-unet"],
)
def test_inpainting_workload(request, tmp_path, bundle_fixture, mask_mode, unet_channels):
    bundle = request.getfixturevalue(bundle_fixture)
    code, report = _image_run(bundle, tmp_path, "--img2img", str(I2I_STRENGTH), "--mask")
    _assert_image_workload(code, report, tmp_path, "inpainting")
    assert report["workload"]["mask_mode"] == mask_mode
    assert report["workload"]["pytorch_pipeline"] == "StableDiffusionInpaintPipeline"
    # the UNet row ran on the loop's first call (9 channels into an inpainting UNet)
    assert report["accuracy"]["components"]["unet"]["noise_pred"]["shape"] == [2, 4, SIZE // 8, SIZE // 8]
    assert Bundle.open(bundle).unet_in_channels == unet_channels


def _without_encoder(bundle: Path, copy: Path) -> Path:
    """A copy of `bundle` as exported before img2img support: no vae_encoder."""
    copy_bundle(bundle, copy, "vae_encoder*")
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["models"]["vae_encoder"]
    (copy / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return copy


def test_bundle_without_encoder_is_refused_for_img2img(tiny_bundle, tmp_path, capsys):
    old = _without_encoder(tiny_bundle, tmp_path / "old")
    code = main(["--bundle", str(old), "--out", str(tmp_path / "out"), "--img2img", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--img2img: " in err and "has no VAE encoder" in err
    assert f"re-export it with `python -m export --model tiny --out {old}`" in err


def test_bundle_without_encoder_still_compares(tiny_bundle, tmp_path):
    """Text to image on an old bundle: every other row, the encoder skipped with the reason."""
    old = _without_encoder(tiny_bundle, tmp_path / "old")
    out = tmp_path / "out"
    code = main(["--bundle", str(old), "--out", str(out), "--runs", "1", "--no-bf16", *FAST])
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["passed"] and "vae_encoder" not in report["accuracy"]["components"]
    assert "vae_encoder" not in report["speed"]["components"]
    assert "no VAE encoder" in report["setup"]["skipped_components"]["vae_encoder"]
    assert "Not compared: `vae_encoder`: the bundle has no VAE encoder" in (out / "report.md").read_text()
    assert report["workload"]["kind"] == "text-to-image"


@pytest.mark.parametrize("flags", [[], ["--img2img", "0.5"]], ids=["text-to-image", "img2img"])
def test_inpainting_unet_needs_mask(tiny_inpaint_bundle, tmp_path, capsys, flags):
    code = main(["--bundle", str(tiny_inpaint_bundle), "--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert "--mask: " in err and "has an inpainting UNet (9 input channels)" in err
    assert "pass --img2img STRENGTH --mask" in err


def test_settings_json_round_trip(tmp_path):
    from export.compare.settings import Settings

    s = Settings(
        bundle=tmp_path, model="tiny", seed_weights=0, projection=None, backend="onnxruntime",
        precision="fp32", width=64, height=64, steps=4, runs=1, prompt="p", negative="n", seed=1,
        scheduler="ddim", guidance=7.5, mode="standard", threads=1, bf16=False, out=tmp_path,
        strength=0.5, mask=True,
    )  # fmt: skip
    s.write(tmp_path / "s.json")
    back = Settings.read(tmp_path / "s.json")
    assert back == s and back.workload == "inpainting" and back.stages[1] == "encode"
    legacy = {k: v for k, v in s.to_json().items() if k not in ("strength", "mask")}
    assert Settings.from_json(legacy).workload == "text-to-image"


def test_clip_score_uses_the_models_vision_tower(tmp_path):
    """The compare tool's PyTorch CLIP score: the preset's own (random) tower on the runtime's
    preprocessing, 100 x max(cos, 0) of image and text embeddings, computed here independently."""
    from export.compare.torch_ref import clip_scores
    from export.models import build_preset

    vision = build_preset("tiny", cache_dir=tmp_path).vision
    assert vision is not None
    images = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(2)]
    text = torch.randn(1, vision.projection_dim, generator=torch.Generator().manual_seed(0))
    got = clip_scores(vision, images, text)
    resized = [Image.fromarray(x).resize((42, 32), Image.Resampling.BICUBIC) for x in images]  # short side 32
    crops = np.stack([np.asarray(r)[:, 5:37] for r in resized]) / 255.0
    pixels = (crops - np.array(vision.mean)) / np.array(vision.std)
    with torch.no_grad():
        embeds = vision.visual_projection(
            vision.vision_model(
                pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)).float()
            ).pooler_output
        )
    cosine = torch.nn.functional.cosine_similarity(embeds.double(), text.double(), dim=-1)
    assert got == pytest.approx((100 * cosine.clamp(min=0)).tolist(), abs=1e-4)


def test_clip_guidance_needs_the_gradient_graph(tiny_bundle, tmp_path, caplog, capsys):
    code = main(["--bundle", str(tiny_bundle), "--out", str(tmp_path), "--clip-guidance", "5", *FAST])
    assert code == 2
    printed = capsys.readouterr().err + caplog.text
    assert "--clip-guidance: clip_guidance needs the clip_guidance graph" in printed


def test_every_precision_has_its_gates() -> None:
    """--precision accepts PRECISIONS; each needs default gates, or the tool fails after its runs."""
    from export.compare.thresholds import DEFAULTS

    assert set(DEFAULTS) == set(PRECISIONS)
    assert DEFAULTS["int8-bf16"] == DEFAULTS["int8"]
