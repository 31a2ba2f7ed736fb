"""LoRA on TensorRT by refit, on a GPU host: the tiny bundle's engines built `--refittable`, a
random kohya LoRA (tests/test_lora_parity.py's writer) applied through the pipeline, compared with
ONNX Runtime fp32 applying the same file; unloading gives the never-touched image bit for bit;
engines built without `--refittable` refuse a LoRA and still run without one. Skipped where
TensorRT, cuda-python or a CUDA device is missing (this repo's CI has none)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu
pytest.importorskip("tensorrt")
pytest.importorskip("cuda.bindings.runtime")

from engines.build import main as build_main  # noqa: E402
from export.models import build_preset  # noqa: E402
from runtime.backends import BackendConfig  # noqa: E402
from runtime.backends.onnxruntime import OrtBackend  # noqa: E402
from runtime.backends.tensorrt import TensorRTUnavailable, TrtBackend, probe_environment  # noqa: E402
from runtime.backends.trt_refit import NotRefittable  # noqa: E402
from runtime.bundle import Bundle  # noqa: E402
from runtime.lora import LoraRef  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402
from tests.test_lora_parity import write_kohya  # noqa: E402

try:
    probe_environment()
except TensorRTUnavailable as exc:
    pytest.skip(str(exc), allow_module_level=True)

SIZE = 128
MIN_COSINE = 0.99  # fp16 engines vs fp32 ONNX Runtime, whole images (as test_engines_gpu's pipeline test)


def engines(bundle: Bundle, out: Path, *flags: str) -> TrtBackend:
    args = [str(bundle.root), "--engine-dir", str(out), "--shapes", f"{SIZE}x{SIZE}", "--batch", "1-2"]
    assert build_main([*args, *flags]) == 0
    return TrtBackend(bundle, BackendConfig(backend="tensorrt", engine_dir=out))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64) - 127.5, b.astype(np.float64) - 127.5
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path) -> Bundle:
    return Bundle.open(tiny_bundle)


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    components = build_preset("tiny", cache_dir=tmp_path_factory.mktemp("cache"), with_vision=False)
    return write_kohya(tmp_path_factory.mktemp("lora") / "style.safetensors", components, seed=1)


def options(loras: tuple[LoraRef, ...] = ()) -> GenerateOptions:
    return GenerateOptions(prompts=("a cat maid",), steps=4, seed=0, height=SIZE, width=SIZE, loras=loras)


def test_refit_applies_a_lora_and_unloading_restores_the_exact_image(bundle, lora, tmp_path):
    pipeline = Pipeline(bundle, engines(bundle, tmp_path / "refit", "--refittable"))
    try:
        before = pipeline.generate(options()).images
        with_lora = pipeline.generate(options((LoraRef(lora, 0.8),))).images
        after = pipeline.generate(options()).images
    finally:
        pipeline.close()
    reference = Pipeline(bundle, OrtBackend(bundle)).generate(options((LoraRef(lora, 0.8),))).images
    assert np.array_equal(after, before)  # the original weights put back bit for bit
    assert not np.array_equal(with_lora, before)
    assert cosine(with_lora, reference) >= MIN_COSINE


def test_plain_engines_refuse_a_lora_and_still_run_without(bundle, lora, tmp_path):
    pipeline = Pipeline(bundle, engines(bundle, tmp_path / "plain"))
    try:
        with pytest.raises(NotRefittable, match="--refittable"):
            pipeline.generate(options((LoraRef(lora, 1.0),)))
        assert pipeline.generate(options()).images.shape == (1, SIZE, SIZE, 3)
    finally:
        pipeline.close()
