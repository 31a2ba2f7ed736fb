"""TensorRT engines on a GPU host: build the tiny bundle's engines, then check each against ONNX
Runtime fp32, CUDA graphs on against off, shape routing, refusal of stale and corrupt plans, and
the whole pipeline. Skipped where TensorRT, cuda-python or a CUDA device is missing (this repo's
CI has none: run `bash scripts/gpu_check.sh` on a GPU host)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("tensorrt")
pytest.importorskip("cuda.bindings.runtime")

from engines.build import main as build_main  # noqa: E402
from runtime.backends import BackendConfig, BackendError  # noqa: E402
from runtime.backends.onnxruntime import OrtBackend  # noqa: E402
from runtime.backends.tensorrt import TensorRTUnavailable, TrtBackend, probe_environment  # noqa: E402
from runtime.backends.trt_shapes import NoProfile  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402

try:
    ENV = probe_environment()
except TensorRTUnavailable as exc:  # stubs only, or no CUDA device
    pytest.skip(str(exc), allow_module_level=True)

MIN_COSINE = 0.999
SIZE = 128  # the tiny bundle's default image size


def trt(bundle: Bundle, engine_dir: Path, cuda_graphs: bool = True) -> TrtBackend:
    config = BackendConfig(backend="tensorrt", engine_dir=engine_dir, cuda_graphs=cuda_graphs)
    return TrtBackend(bundle, config)


def cosine(a: np.ndarray, b: np.ndarray, axis: int | None = None) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=axis) / (np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis))


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.open(tiny_bundle)


@pytest.fixture(scope="module")
def engine_dir(bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny engines: a static 128x128 profile plus a ranged 64-256 px one, batches 1-4."""
    out = tmp_path_factory.mktemp("engines")
    args = [str(bundle.root), "--engine-dir", str(out), "--shapes", f"{SIZE}x{SIZE}", "--dynamic", "64-256"]
    assert build_main([*args, "--batch", "1-4"]) == 0
    assert build_main([*args, "--batch", "1-4"]) == 0  # second run: everything up to date
    return out


@pytest.fixture(scope="module")
def trt_backend(bundle: Bundle, engine_dir: Path):
    backend = trt(bundle, engine_dir)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def ort_fp32(bundle: Bundle):
    return OrtBackend(bundle, BackendConfig(precision="fp32"))


def feeds(
    bundle: Bundle, model: str, batch: int = 2, height: int = SIZE // 8, width: int = SIZE // 8, seed: int = 0
):
    rng = np.random.default_rng(seed)
    hidden = bundle.hidden_size
    if model == "clip":
        return {"input_ids": rng.integers(0, 49408, (batch, 77)).astype(np.int32)}
    if model == "deprojector":
        return {"pooled": rng.standard_normal((batch, hidden), dtype=np.float32)}
    if model == "unet":
        return {
            "sample": rng.standard_normal((batch, 4, height, width), dtype=np.float32),
            "timestep": np.array([500.0], np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, 77, hidden), dtype=np.float32),
        }
    return {"latent": rng.standard_normal((batch, 4, height, width), dtype=np.float32)}


def test_engine_manifest_records_this_gpu(engine_dir: Path):
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    assert sorted(e["model"] for e in manifest["engines"].values()) == [
        "clip",
        "deprojector",
        "unet",
        "vae_decoder",
    ]
    for entry in manifest["engines"].values():
        assert entry["environment"]["tensorrt"] == ENV.tensorrt
        assert entry["environment"]["tensorrt_cuda"] == ENV.tensorrt_cuda != "unknown"
        assert entry["environment"]["compute_capability"] == ENV.compute_capability
        assert entry["flags"] == {"precision": "fp16", "strongly_typed": True}


@pytest.mark.parametrize("model", ["clip", "deprojector", "unet", "vae_decoder"])
def test_engine_matches_onnxruntime_fp32(bundle, trt_backend, ort_fp32, model):
    inputs = feeds(bundle, model)
    ours, reference = trt_backend.run(model, inputs), ort_fp32.run(model, inputs)
    for name, expected in reference.items():
        assert ours[name].shape == expected.shape and ours[name].dtype == np.float32
        if model == "deprojector":  # every one of the 77 positions, per prompt
            assert cosine(ours[name], expected, axis=-1).min() >= MIN_COSINE, name
        else:
            assert cosine(ours[name], expected) >= MIN_COSINE, name


def test_requests_route_to_static_and_ranged_profiles_and_split_batches(bundle, trt_backend, ort_fp32):
    for batch, height, width in [(2, 16, 16), (2, 24, 16), (1, 8, 32), (6, 16, 16)]:  # 6 > max batch 4
        inputs = feeds(bundle, "unet", batch, height, width, seed=batch + height)
        ours = trt_backend.run("unet", inputs)["noise_pred"]
        assert ours.shape == (batch, 4, height, width)
        assert cosine(ours, ort_fp32.run("unet", inputs)["noise_pred"]) >= MIN_COSINE
    with pytest.raises(NoProfile, match="--shapes 512x128"):
        trt_backend.run("unet", feeds(bundle, "unet", 1, 16, 64))
    long_ids = {"input_ids": np.tile(feeds(bundle, "clip")["input_ids"], (1, 2))}  # a 154-token prompt
    ours, expected = trt_backend.run("clip", long_ids), ort_fp32.run("clip", long_ids)
    assert cosine(ours["last_hidden_state"], expected["last_hidden_state"]) >= MIN_COSINE


def test_cuda_graphs_on_and_off_agree_exactly(bundle, engine_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="runtime.backends.tensorrt")
    with_graphs, without = trt(bundle, engine_dir), trt(bundle, engine_dir, cuda_graphs=False)
    try:
        # capture on the first call of each shape, replay with new inputs afterwards; 6 rows are
        # split 4 + 2 and alternate with a ranged-profile size, so three graphs stay cached
        for seed in (1, 2, 3):
            for batch, side in ((6, SIZE // 8), (2, 24)):
                inputs = feeds(bundle, "unet", batch, side, side, seed=seed)
                graphed = with_graphs.run("unet", inputs)["noise_pred"]
                np.testing.assert_array_equal(graphed, without.run("unet", inputs)["noise_pred"])
        (plan,) = with_graphs._plans.values()
        assert len(plan.graphs) == 3
    finally:
        with_graphs.close()
        without.close()
    assert "captured a CUDA graph" in caplog.text and "capture for" not in caplog.text
    assert "replaying the CUDA graph" not in caplog.text


def _copy(engine_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "engines"
    shutil.copytree(engine_dir, copy)
    return copy


def _edit(engine_dir: Path, model: str, edit) -> str:
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    (name,) = [n for n, e in manifest["engines"].items() if e["model"] == model]
    edit(manifest["engines"][name])
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    return name


def test_corrupt_plans_are_refused_without_crashing(bundle, engine_dir, tmp_path):
    copy = _copy(engine_dir, tmp_path)
    garbage = np.random.default_rng(0).bytes(4096)

    def corrupt(entry):
        (copy / entry["plan"]).write_bytes(garbage)
        entry["plan_sha256"] = hashlib.sha256(garbage).hexdigest()  # passes the hash check

    _edit(copy, "unet", corrupt)
    backend = trt(bundle, copy)
    with pytest.raises(BackendError, match="(?s)could not deserialize .*--rebuild-stale"):
        backend.run("unet", feeds(bundle, "unet"))
    _edit(copy, "vae_decoder", lambda entry: (copy / entry["plan"]).write_bytes(b"truncated"))
    with pytest.raises(BackendError, match="is corrupt"):
        backend.run("vae_decoder", feeds(bundle, "vae_decoder", batch=1))
    assert backend.run("clip", feeds(bundle, "clip"))["last_hidden_state"].shape[1] == 77  # others still run
    backend.close()

    assert build_main([str(bundle.root), "--engine-dir", str(copy), "--rebuild-stale"]) == 0
    repaired = trt(bundle, copy)
    assert repaired.run("unet", feeds(bundle, "unet"))["noise_pred"].shape == (2, 4, 16, 16)
    repaired.close()


def test_foreign_engines_are_refused_then_rebuilt(bundle, engine_dir, tmp_path):
    copy = _copy(engine_dir, tmp_path)
    name = _edit(
        copy, "unet", lambda entry: entry["environment"].update(compute_capability="1.0", gpu="Elsewhere")
    )
    with pytest.raises(
        BackendError, match=rf"(?s){re.escape(name)}: built for compute capability 1.0 .*--rebuild-stale"
    ):
        trt(bundle, copy)
    assert build_main([str(bundle.root), "--engine-dir", str(copy), "--rebuild-stale"]) == 0
    trt(bundle, copy).close()


@pytest.mark.parametrize("mode", ["standard", "compose"])
def test_pipeline_end_to_end(bundle, engine_dir, mode):
    options = GenerateOptions(
        prompts=("cat, (maid:1.3)",),
        negative_prompts=("blurry",),
        steps=4,
        seed=0,
        height=SIZE,
        width=SIZE,
        mode=mode,
    )
    with_trt = Pipeline(bundle, backend=trt(bundle, engine_dir))
    try:
        ours = with_trt.generate(options).images
    finally:
        with_trt.close()
    reference = Pipeline(bundle, backend=OrtBackend(bundle)).generate(options).images
    assert ours.shape == reference.shape == (1, SIZE, SIZE, 3) and ours.dtype == np.uint8
    assert cosine(ours - 127.5, reference - 127.5) >= 0.99
