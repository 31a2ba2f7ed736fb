"""The OpenVINO backend: fp32 per-model parity with ONNX Runtime and bf16 within its documented
tolerance (on the tiny bundle); the IR cache, read-only bundles, concurrent callers, releasing
mapped weight pages, and clear errors (on the fake bundle). Image parity with diffusers:
tests/test_runtime_e2e.py."""

from __future__ import annotations

import logging
import mmap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from export.compare.metrics import cosine_rows, image_metrics  # noqa: E402
from runtime.backends import BackendConfig, BackendError, open_backend  # noqa: E402
from runtime.backends.loading import drop_mapped_pages  # noqa: E402
from runtime.backends.onnxruntime import OrtBackend  # noqa: E402
from runtime.backends.openvino import OvBackend, cpu_has_bf16  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402
from runtime.errors import RequestError  # noqa: E402
from runtime.generate import main as generate_main  # noqa: E402
from runtime.integrity import IntegrityError  # noqa: E402
from runtime.manifest import Manifest  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 instructions")
# bf16 keeps 8 mantissa bits: per-call cosine vs fp32; image tolerances measured on tiny (max
# 4/255, 50 dB at 20 PNDM steps) and checked with margin here.
BF16_MIN_COSINE = 0.999
BF16_MAX_PIXEL_DIFF, BF16_MIN_PSNR_DB = 12, 38.0


FP32 = BackendConfig("openvino", cache_graphs=False)
BF16 = BackendConfig("openvino", precision="bf16", cache_graphs=False)


@pytest.fixture
def bundle_copy(fake_bundle_copy: Path) -> Path:
    """A private copy without derived-graph caches, so each test starts cold."""
    return fake_bundle_copy


def _feeds(bundle: Bundle) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    hidden = bundle.hidden_size
    channels = bundle.latent_channels
    f = bundle.vae_scale_factor
    return {
        "clip": {"input_ids": rng.integers(0, 48, (2, 77)).astype(np.int32)},
        "deprojector": {"pooled": rng.standard_normal((2, hidden), dtype=np.float32)},
        "unet": {
            "sample": rng.standard_normal((2, channels, 64 // f, 48 // f), dtype=np.float32),
            "timestep": np.array([981.0], dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32),
        },
        "vae_decoder": {"latent": rng.standard_normal((1, channels, 64 // f, 48 // f), dtype=np.float32)},
    }


def test_fp32_matches_onnxruntime_per_model(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    ov, ort = OvBackend(bundle, FP32), OrtBackend(bundle, BackendConfig(cache_graphs=False))
    for model, feeds in _feeds(bundle).items():
        want, got = ort.run(model, feeds), ov.run(model, feeds)
        assert set(got) == set(want), model
        for name in want:
            assert got[name].dtype == np.float32 and got[name].shape == want[name].shape, (model, name)
            scale = max(1.0, float(np.abs(want[name]).max()))
            assert np.abs(got[name] - want[name]).max() <= 1e-4 * scale, (model, name)
            assert cosine_rows(got[name], want[name]).min() >= 0.99999, (model, name)


@needs_bf16
def test_bf16_runs_unet_and_vae_in_bf16_within_tolerance(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    bf16, fp32 = OvBackend(bundle, BF16), OvBackend(bundle, FP32)
    for model, feeds in _feeds(bundle).items():
        name = bundle.models[model].spec.output_names[0]
        got, want = bf16.run(model, feeds)[name], fp32.run(model, feeds)[name]
        if model in ("clip", "deprojector"):  # kept fp32: identical to the fp32 backend
            np.testing.assert_array_equal(got, want, err_msg=model)
        else:
            assert not np.array_equal(got, want), f"{model} did not run in bf16"
            assert cosine_rows(got, want).min() >= BF16_MIN_COSINE, model


@needs_bf16
def test_bf16_image_within_documented_tolerance(tiny_bundle: Path) -> None:
    options = GenerateOptions(
        prompts=("a photo of a cat maid",), negative_prompts=("blurry",), steps=20, seed=0
    )
    reference = Pipeline(tiny_bundle).generate(options).images
    bf16 = Pipeline(tiny_bundle, BackendConfig("openvino", precision="bf16")).generate(options).images
    assert reference.std() > 5, "degenerate image: the comparison would prove nothing"
    metrics = image_metrics(bf16[0], reference[0])
    assert metrics["max_pixel_diff"] <= BF16_MAX_PIXEL_DIFF
    assert metrics["psnr_db"] >= BF16_MIN_PSNR_DB


def test_ir_cache_written_once_then_used(bundle_copy: Path) -> None:
    bundle = Bundle.open(bundle_copy)
    first = OvBackend(bundle, BackendConfig("openvino"))
    feeds = _feeds(bundle)["clip"]
    expected = first.run("clip", feeds)
    cache = bundle_copy / ".ov_cache"
    names = sorted(p.name for p in cache.iterdir())
    assert [n for n in names if n.startswith("clip.fp32.")] == [
        first._ir_path("clip").with_suffix(".bin").name,
        first._ir_path("clip").name,
        first._ir_path("clip").name + ".sha256",  # the seal: its hashes, checked on every load
    ]
    assert not any(".tmp" in n for n in names)  # renamed into place
    written = first._ir_path("clip").stat().st_mtime_ns

    second = OvBackend(bundle, BackendConfig("openvino"))
    assert second._load_path("clip") == second._ir_path("clip")
    got = second.run("clip", feeds)
    assert second._ir_path("clip").stat().st_mtime_ns == written  # read, not rewritten
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_read_only_bundle_compiles_from_onnx(bundle_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Bundle.open(bundle_copy)
    expected = OvBackend(bundle, FP32).run("clip", _feeds(bundle)["clip"])
    # as on a read-only mount (root may write anywhere, so the check itself is what is replaced)
    monkeypatch.setattr("runtime.backends.openvino.writable", lambda directory: False)
    backend = OvBackend(bundle, BackendConfig("openvino"))
    got = backend.run("clip", _feeds(bundle)["clip"])
    assert not any((bundle_copy / ".ov_cache").glob("clip.*"))
    assert backend._mapped["clip"][0] == bundle_copy / "clip.onnx"
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_concurrent_callers_get_their_own_results(fake_bundle: Path) -> None:
    bundle = Bundle.open(fake_bundle)
    backend = OvBackend(bundle, FP32)
    base = _feeds(bundle)["unet"]
    inputs = [{**base, "sample": base["sample"] * (1 + i)} for i in range(6)]
    sequential = [backend.run("unet", f)["noise_pred"] for f in inputs]
    with ThreadPoolExecutor(3) as pool:
        parallel = list(pool.map(lambda f: backend.run("unet", f)["noise_pred"], inputs))
    for a, b in zip(sequential, parallel, strict=True):
        np.testing.assert_array_equal(a, b)
    backend.close()


def _resident_kib(path: Path) -> int:
    """This process's resident KiB of mappings of `path` (from /proc/self/smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                current = len(fields) >= 6 and fields[5] == str(path.resolve())
            elif current and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_drop_mapped_pages_releases_resident_pages_and_keeps_data(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        view = np.frombuffer(mapped, dtype=np.uint8)
        assert int(view.sum()) == int(data.sum())  # touch every page
        assert _resident_kib(path) >= 8 << 10
        assert drop_mapped_pages([path]) >= len(data)
        assert _resident_kib(path) < 1 << 10
        np.testing.assert_array_equal(view, data)  # faulted back in, unchanged
        del view


def test_backend_runs_and_releases_weights(bundle_copy: Path) -> None:
    bundle = Bundle.open(bundle_copy)
    backend = OvBackend(bundle, BackendConfig("openvino"))
    backend.run("unet", _feeds(bundle)["unet"])
    weights = backend._mapped["unet"]
    assert weights == [backend._ir_path("unet").with_suffix(".bin")]
    assert _resident_kib(weights[0]) < 64  # dropped after the first call of this shape


def test_errors_name_the_parameter(fake_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = Bundle.open(fake_bundle)
    with pytest.raises(
        RequestError, match="must be fp32 or bf16 or int8 or int8-bf16 for backend openvino; got 'fp16'"
    ):
        OvBackend(bundle, BackendConfig("openvino", precision="fp16"))
    for precision in ("bf16", "int8", "int8-bf16"):
        with pytest.raises(RequestError, match=f"got '{precision}'; {precision} needs backend openvino"):
            open_backend(bundle, BackendConfig(precision=precision))
    with pytest.raises(RequestError, match="device must be cpu for backend openvino; got 'cuda'"):
        open_backend(bundle, BackendConfig("openvino", device="cuda"))
    with pytest.raises(BackendError, match="a onnxruntime config cannot open the openvino backend"):
        OvBackend(bundle, BackendConfig())
    with monkeypatch.context() as patch:  # as on a CPU without AVX512_BF16 / AMX
        patch.setattr("runtime.backends.openvino.cpu_has_bf16", lambda: False)
        with pytest.raises(BackendError, match="precision bf16 needs a CPU with bf16 instructions"):
            OvBackend(bundle, BF16)
        with pytest.raises(BackendError, match="int8-bf16 needs a CPU with bf16 .* use precision int8$"):
            OvBackend(bundle, BackendConfig("openvino", precision="int8-bf16"))
        patch.setattr("runtime.backends.openvino.cpu_has_bf16", lambda: True)  # a bundle without int8
        missing_int8 = r"^precision int8-bf16 runs the bundle's int8 files: .*--int8`\)$"
        with pytest.raises(RequestError, match=missing_int8):
            OvBackend(bundle, BackendConfig("openvino", precision="int8-bf16"))
    backend = OvBackend(bundle, FP32)
    with pytest.raises(BackendError, match="has no nonexistent model"):
        backend.prepare(["nonexistent"])
    with pytest.raises(BackendError, match=r"unet: inputs must be"):
        backend.run("unet", {"sample": np.zeros((1, 4, 8, 8), np.float32)})


def test_load_failure_names_the_model(bundle_copy: Path) -> None:
    clip = bundle_copy / "clip.onnx"
    clip.write_bytes(b"x" * clip.stat().st_size)  # same size: passes open, fails the conversion
    backend = OvBackend(Bundle.open(bundle_copy, verify="off"), BackendConfig("openvino"))
    root_level = logging.getLogger().level
    with pytest.raises(BackendError, match="could not convert clip to OpenVINO IR"):
        backend.run("clip", _feeds(Bundle.open(bundle_copy))["clip"])
    assert not any((bundle_copy / ".ov_cache").glob("clip.*"))  # nothing half-written left behind
    assert logging.getLogger().level == root_level  # OpenVINO's converter sets ERROR on failure


@needs_bf16
def test_cli_writes_png_with_backend_and_precision(tiny_bundle: Path, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "ov.png"
    argv = ["a cat", "--bundle", str(tiny_bundle), "--backend", "openvino", "--precision", "bf16",
            "--steps", "3", "--out", str(out)]  # fmt: skip
    assert generate_main(argv) == 0
    assert "Backend: openvino/bf16" in Image.open(out).info["parameters"]


INT8 = BackendConfig("openvino", precision="int8")


def test_int8_runs_the_bundles_ir_and_the_rest_in_fp32(fake_bundle_copy: Path) -> None:
    from tests.fake_bundle import add_ir_file_set

    add_ir_file_set(fake_bundle_copy)  # the fp32 UNet as IR: int8 must then equal fp32 exactly
    bundle = Bundle.open(fake_bundle_copy)
    feeds = _feeds(bundle)
    int8, fp32 = OvBackend(bundle, INT8), OvBackend(bundle, FP32)
    for model, inputs in feeds.items():
        for name, out in int8.run(model, inputs).items():
            np.testing.assert_allclose(out, fp32.run(model, inputs)[name], rtol=1e-5, atol=1e-5)
    # the UNet compiled straight from the bundle's IR: nothing converted or cached for it
    assert not list((fake_bundle_copy / ".ov_cache").glob("unet.int8.*"))
    assert int8._mapped["unet"] == [fake_bundle_copy / "unet.int8.bin"]


AVX2_ONLY = frozenset({"sse2", "avx2", "fma"})  # an AMD EPYC of this workplace: no VNNI, no AMX


@pytest.mark.parametrize(
    ("recorded", "flags", "warns"),
    [
        ({"scheme": "hybrid", "overflow_fix": "first_layer_only"}, AVX2_ONLY, True),
        ({"scheme": "hybrid"}, AVX2_ONLY, True),  # made before the choice was recorded: NNCF's default
        ({"scheme": "hybrid", "overflow_fix": "enable"}, AVX2_ONLY, False),
        ({"scheme": "hybrid", "overflow_fix": "first_layer_only"}, AVX2_ONLY | {"avx512_vnni"}, False),
        ({"scheme": "hybrid", "overflow_fix": "first_layer_only"}, AVX2_ONLY | {"amx_int8"}, False),
        ({"scheme": "hybrid", "overflow_fix": "first_layer_only"}, frozenset(), False),  # not Linux
    ],
)
def test_int8_made_for_vnni_warns_on_a_cpu_without_it(
    fake_bundle_copy: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    recorded: dict[str, str],
    flags: frozenset[str],
    warns: bool,
) -> None:
    from tests.fake_bundle import add_ir_file_set

    add_ir_file_set(fake_bundle_copy)
    path = fake_bundle_copy / "manifest.json"
    manifest = Manifest.loads(path.read_bytes())
    path.write_text(replace(manifest, export={**manifest.export, "int8": recorded}).dumps())
    monkeypatch.setattr("runtime.backends.openvino.cpu_flags", lambda: flags)
    with caplog.at_level(logging.WARNING, logger="runtime.backends.openvino"):
        OvBackend(Bundle.open(fake_bundle_copy), INT8)
    warned = [r.getMessage() for r in caplog.records if "overflow fix" in r.getMessage()]
    assert bool(warned) == warns
    if warns:
        assert f"--out {fake_bundle_copy}` again with --int8 --int8-overflow-fix enable" in warned[0]


def test_int8_refusals_name_the_cause(fake_bundle: Path) -> None:
    with pytest.raises(RequestError, match=r"bundle has for unet \(fp16, fp32\); got 'int8'.*--int8"):
        OvBackend(Bundle.open(fake_bundle), INT8)  # exported without --int8
    with pytest.raises(RequestError, match="must be fp32 or fp16 for backend onnxruntime; got 'int8'"):
        open_backend(Bundle.open(fake_bundle), BackendConfig(precision="int8"))


def test_int8_ir_is_verified_like_every_bundle_file(fake_bundle_copy: Path) -> None:
    from tests.fake_bundle import add_ir_file_set

    weights = add_ir_file_set(fake_bundle_copy).with_suffix(".bin")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    backend = OvBackend(Bundle.open(fake_bundle_copy, verify="full"), INT8)
    with pytest.raises(IntegrityError, match="unet.int8.bin"):
        backend.run("unet", _feeds(Bundle.open(fake_bundle_copy, verify="off"))["unet"])
