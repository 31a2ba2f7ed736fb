"""`python -m export --int8` on the tiny preset (with the step-caching UNets): NNCF quantizes the
three UNet graphs on inputs recorded from the bundle's own pipeline; the manifest records the
calibration (count, hash) and the held-out quality; reuse and re-quantization; the runtime's int8
path, with and without step caching, within the issue #16 gates (UNet-call cosine >= 0.99, image
PSNR >= 30 dB vs the exact fp32 path of the same backend); the compare tool's int8 gates. Refusals
that need no quantized model: tests/test_openvino_backend.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("nncf")
pytestmark = pytest.mark.integration

from export.__main__ import main as export_main  # noqa: E402
from export.compare.metrics import cosine_rows, image_metrics  # noqa: E402
from export.int8 import Int8Options, add_int8, overflow_fix_for, record_calibration  # noqa: E402
from runtime.backends import Backend, BackendConfig, open_backend  # noqa: E402
from runtime.backends.config import bundle_files  # noqa: E402
from runtime.backends.openvino import OvBackend, cpu_has_bf16  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402
from runtime.cpu import cpu_flags, int8_dot_instructions  # noqa: E402
from runtime.errors import RequestError  # noqa: E402
from runtime.generate import main as generate_main  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from tests.bundles import copy_bundle  # noqa: E402

# Small enough for CI (about 15 s), large enough to calibrate: with 8 samples the held-out cosine
# was 0.992, with 16 0.997.
OPTIONS = Int8Options(samples=16, size=64, steps=4)
MIN_UNET_COSINE, MIN_PSNR_DB = 0.99, 30.0


UNETS = ["unet", "unet_deepcache_full", "unet_deepcache_shallow"]


@pytest.fixture(scope="module")
def int8_bundle(tiny_deepcache_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = copy_bundle(tiny_deepcache_bundle, tmp_path_factory.mktemp("int8") / "bundle")
    add_int8(root, OPTIONS)
    return root


def test_manifest_records_files_calibration_and_quality(int8_bundle: Path) -> None:
    manifest = Manifest.loads((int8_bundle / "manifest.json").read_bytes())
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert sorted(m for m, entry in manifest.models.items() if "int8" in entry.files) == UNETS
    for model in UNETS:
        entry = manifest.models[model].files["int8"]
        assert (entry.file, entry.external_data) == (f"{model}.int8.xml", f"{model}.int8.bin")
    Bundle.open(int8_bundle, verify="full")  # every hash, the IRs' included
    record = manifest.export["int8"]
    assert record["scheme"] == "hybrid" and sorted(record["models"]) == UNETS
    calibration = record["calibration"]
    assert len(calibration["sha256"]) == 64 and calibration["cache_interval"] == OPTIONS.cache_interval
    assert (calibration["captions"], calibration["size"], calibration["steps"]) == (4, 64, 4)
    assert calibration["scheduler"] == "pndm"  # the runtime's default sampler
    # "auto": 7-bit weights unless int8 dot products cannot saturate here; the CPU is recorded
    assert record["overflow_fix"] == overflow_fix_for(cpu_flags())
    assert record["measured_on"]["int8_dot"] == int8_dot_instructions()
    for model in UNETS:
        facts = record["models"][model]
        assert [name.split("/")[-3] for name in facts["kept_fp32"]] == ["conv_in"], model
        # `holdout` calls of the held-out caption: PNDM makes 5 UNet calls in 4 steps, 3 of them
        # shallow in the cached run
        assert facts["quality"]["holdout_calls"] == 3
        assert facts["quality"]["cosine_min"] >= MIN_UNET_COSINE, model
    assert record["models"]["unet"]["samples"] == record["models"]["unet_deepcache_full"]["samples"] == 16
    # the shallow graph runs on 2 of every 3 UNet calls of the cached run; PNDM makes 5 calls in 4
    # steps (full ones at calls 0 and 3): 4 captions x 3 calls
    assert record["models"]["unet_deepcache_shallow"]["samples"] == 12


def test_overflow_fix_follows_the_int8_dot_product() -> None:
    assert overflow_fix_for(frozenset({"sse2", "avx2", "fma"})) == "enable"  # vpmaddubsw saturates
    for dot in ("avx512_vnni", "avx_vnni", "amx_int8"):
        assert overflow_fix_for(frozenset({"avx2", dot})) == "first_layer_only"
    with pytest.raises(ValueError, match="overflow_fix must be one of auto, enable, first_layer_only"):
        Int8Options(overflow_fix="disable").validate()


def test_calibration_is_deterministic(int8_bundle: Path) -> None:
    again = record_calibration(Bundle.open(int8_bundle), OPTIONS)
    recorded = Manifest.loads((int8_bundle / "manifest.json").read_bytes()).export["int8"]["calibration"]
    assert again.sha256() == recorded["sha256"]


def _unet_feeds(fp32: Backend, seed: int) -> dict[str, np.ndarray]:
    """One UNet call's inputs from random tokens and latents (not a calibration input)."""
    rng = np.random.default_rng(seed)
    states = fp32.run("clip", {"input_ids": rng.integers(0, 1000, (2, 77)).astype(np.int32)})
    return {
        "sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
        "timestep": np.array([500.0], np.float32),
        "encoder_hidden_states": next(iter(states.values())),
    }


def test_unet_and_image_within_the_gates(int8_bundle: Path) -> None:
    bundle = Bundle.open(int8_bundle)
    fp32 = open_backend(bundle, BackendConfig("openvino"))
    int8 = open_backend(bundle, BackendConfig("openvino", precision="int8"))
    feeds = _unet_feeds(fp32, seed=7)  # not a calibration input
    ours, exact = int8.run("unet", feeds)["noise_pred"], fp32.run("unet", feeds)["noise_pred"]
    assert cosine_rows(ours, exact).min() >= MIN_UNET_COSINE  # each CFG row
    for scheduler, interval in (("ddim", 1), ("dpmpp_2m", 1), ("dpmpp_2m", 3)):
        options = GenerateOptions(
            ("a red fox in the snow",), steps=10, scheduler=scheduler, seed=3, cache_interval=interval
        )
        exact = Pipeline(bundle, fp32).generate(options).images
        quantized = Pipeline(bundle, int8).generate(options).images
        assert image_metrics(quantized[0], exact[0])["psnr_db"] >= MIN_PSNR_DB, (scheduler, interval)


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")
def test_int8_composes_with_bf16_within_the_gates(int8_bundle: Path) -> None:
    """int8-bf16: the int8 UNets with their unquantized ops in bf16, the VAE in bf16, CLIP in fp32;
    still within the int8 gates against the exact fp32 path, with and without step caching."""
    bundle = Bundle.open(int8_bundle)
    fp32 = open_backend(bundle, BackendConfig("openvino"))
    int8 = open_backend(bundle, BackendConfig("openvino", precision="int8"))
    both = open_backend(bundle, BackendConfig("openvino", precision="int8-bf16"))
    assert isinstance(both, OvBackend)
    compiled = {m: (both._model_precision(m), both._compile_config(m)["INFERENCE_PRECISION_HINT"]) for m in
                ("unet", "unet_deepcache_shallow", "vae_decoder", "clip")}  # fmt: skip
    assert compiled == {"unet": ("int8", "bf16"), "unet_deepcache_shallow": ("int8", "bf16"),
                        "vae_decoder": ("bf16", "bf16"), "clip": ("fp32", "f32")}  # fmt: skip
    feeds = _unet_feeds(fp32, seed=8)
    ours, exact = both.run("unet", feeds)["noise_pred"], fp32.run("unet", feeds)["noise_pred"]
    assert not np.array_equal(ours, int8.run("unet", feeds)["noise_pred"])  # bf16 did compute
    assert cosine_rows(ours, exact).min() >= MIN_UNET_COSINE
    for scheduler, interval in (("ddim", 1), ("dpmpp_2m", 3)):
        options = GenerateOptions(
            ("a red fox in the snow",), steps=10, scheduler=scheduler, seed=3, cache_interval=interval
        )
        exact_image = Pipeline(bundle, fp32).generate(options).images[0]
        composed = Pipeline(bundle, both).generate(options).images[0]
        assert image_metrics(composed, exact_image)["psnr_db"] >= MIN_PSNR_DB, (scheduler, interval)


def test_reused_when_unchanged(int8_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(int8_bundle, tmp_path / "bundle")
    ir = bundle / "unet.int8.bin"
    before = ir.stat().st_mtime_ns
    again = add_int8(bundle, OPTIONS)
    assert again.reused and ir.stat().st_mtime_ns == before
    assert again.quality["unet"].cosine_min >= MIN_UNET_COSINE  # read back from the manifest


def test_redone_when_options_change(tiny_bundle: Path, tmp_path: Path) -> None:
    """On the plain tiny bundle (one UNet): quantizing three times is the cost here."""
    bundle = copy_bundle(tiny_bundle, tmp_path / "bundle")
    add_int8(bundle, Int8Options(samples=8, size=64, steps=4))
    ir = bundle / "unet.int8.bin"
    before = ir.stat().st_mtime_ns
    result = add_int8(bundle, Int8Options(scheme="full", samples=8, size=64, steps=4, vae=True))
    manifest = result.manifest
    assert not result.reused and result.quality["vae_decoder"].image_psnr_db_min is not None
    assert manifest.export["int8"]["scheme"] == "full" and ir.stat().st_mtime_ns != before
    vae = manifest.export["int8"]["models"]["vae_decoder"]  # one call per generation
    assert vae["samples"] == 2 and vae["quality"]["holdout_calls"] == 1
    assert 0 < vae["quality"]["image_psnr_db_min"] < 100
    assert bundle_files("int8", "vae_decoder", Bundle.open(bundle, verify="full")) == "int8"
    add_int8(bundle, Int8Options(scheme="full", samples=8, size=64, steps=4))  # without the VAE
    opened = Bundle.open(bundle, verify="full")
    assert "int8" not in opened.models["vae_decoder"].files  # the earlier int8 VAE is dropped
    assert not (bundle / "vae_decoder.int8.bin").exists()
    assert (
        bundle_files("int8", "vae_decoder", opened) == "fp32"
        and bundle_files("int8", "unet", opened) == "int8"
    )


def test_bad_calibration_settings_are_refused_before_any_work(int8_bundle: Path, tmp_path: Path) -> None:
    bundle = copy_bundle(int8_bundle, tmp_path / "bundle")
    manifest = (bundle / "manifest.json").read_bytes()
    with pytest.raises(RequestError, match=r"int8 calibration \(--int8-size/--int8-steps\): height"):
        add_int8(bundle, Int8Options(samples=8, size=60, steps=4))  # not a multiple of the latent grid
    assert (bundle / "manifest.json").read_bytes() == manifest and not (bundle / ".ov_cache").exists()


def test_cli_generates_int8_and_refuses_what_it_cannot(
    int8_bundle: Path,
    tiny_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from PIL import Image

    out = tmp_path / "int8.png"
    argv = ["a cat", "--bundle", str(int8_bundle), "--backend", "openvino", "--precision", "int8",
            "--steps", "3", "--out", str(out)]  # fmt: skip
    assert generate_main(argv) == 0
    assert "Backend: openvino/int8" in Image.open(out).info["parameters"]
    argv[2] = str(tiny_bundle)  # exported without --int8
    assert generate_main(argv) == 2
    assert "got 'int8' (add it with `python -m export --model MODEL --out BUNDLE --int8`)" in caplog.text
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--model", "tiny", "--out", str(tmp_path / "b"), "--precision", "fp16", "--int8"])
    assert exit_info.value.code == 2
    assert "--int8 quantizes the fp32 UNet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # an int8 setting without --int8 would do nothing
        export_main(["--model", "tiny", "--out", str(tmp_path / "b"), "--int8-scheme", "full", "--int8-vae",
                     "--int8-overflow-fix", "enable"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "--int8-scheme, --int8-vae, --int8-overflow-fix only apply with --int8" in capsys.readouterr().err


def test_compare_tool_gates_int8(int8_bundle: Path, tmp_path: Path) -> None:
    from export.compare.cli import main as compare_main

    out = tmp_path / "compare"
    argv = ["--bundle", str(int8_bundle), "--backend", "openvino", "--precision", "int8", "--steps", "6",
            "--runs", "1", "--scheduler", "ddim", "--no-bf16", "--out", str(out)]  # fmt: skip
    assert compare_main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["unet.noise_pred cosine"]["limit"] == 0.99 and checks["unet.noise_pred cosine"]["passed"]
    assert any(c["name"].startswith("image PSNR") and c["limit"] == 30.0 for c in report["checks"])


def test_an_inpainting_unet_is_refused_before_any_calibration(tiny_inpaint_bundle: Path) -> None:
    """Calibration runs text-to-image generations, which an inpainting UNet does not make."""
    before = (tiny_inpaint_bundle / "manifest.json").read_bytes()
    with pytest.raises(RequestError, match="--int8: an inpainting UNet .* cannot be quantized yet"):
        add_int8(tiny_inpaint_bundle, OPTIONS)
    assert (tiny_inpaint_bundle / "manifest.json").read_bytes() == before
