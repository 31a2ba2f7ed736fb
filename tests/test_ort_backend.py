"""The ONNX Runtime backend on CPU: background loading (`prepare`), the optimised-graph cache,
and load failures reported as BackendError on the model's first run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendError
from runtime.backends.onnxruntime import OrtBackend
from runtime.bundle import Bundle
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    """A private copy without any optimised-graph cache, so each test starts cold."""
    copy = tmp_path / "tiny"
    shutil.copytree(tiny_bundle, copy, ignore=shutil.ignore_patterns(".ort_cache"))
    return copy


def _clip_feeds() -> dict[str, np.ndarray]:
    return {"input_ids": np.full((2, 77), 49407, dtype=np.int32)}


def test_prepare_loads_in_background_and_runs_match(bundle_copy: Path) -> None:
    bundle = Bundle.open(bundle_copy)
    lazy = OrtBackend(bundle)
    expected = lazy.run("clip", _clip_feeds())

    prepared = OrtBackend(bundle)
    prepared.prepare(["clip", "unet"])
    loads = prepared._sessions.started
    assert set(loads) == {"clip", "unet"}  # submitted, not waited for
    got = prepared.run("clip", _clip_feeds())
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
    prepared.prepare(["clip"])  # again: the same load, not a second session
    assert prepared._sessions.started["clip"] is loads["clip"]
    assert loads["unet"].result() is prepared.session("unet")
    prepared.close()
    assert prepared._sessions.started == {}


def test_optimised_graph_cache_is_written_then_used(bundle_copy: Path) -> None:
    bundle = Bundle.open(bundle_copy)
    first = OrtBackend(bundle)
    expected = first.run("clip", _clip_feeds())
    cached = sorted(p.name for p in (bundle_copy / ".ort_cache").iterdir())
    assert any(name.startswith("clip.fp32.cpu.") and name.endswith(".onnx") for name in cached)
    assert not any(name.endswith(".tmp") for name in cached)  # renamed into place

    second = OrtBackend(bundle)
    assert second._uses_cache(second._cache_path("clip"))
    got = second.run("clip", _clip_feeds())
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6)


def test_load_failure_surfaces_on_first_run_with_model_name(bundle_copy: Path) -> None:
    for name in ("unet.onnx", "unet.ort.onnx"):
        (bundle_copy / name).write_bytes(b"not an onnx model")
    pipeline = Pipeline(bundle_copy, cache_optimized=False)
    pipeline.backend.prepare(["unet"])  # fails in the background: nothing raised here
    with pytest.raises(BackendError, match=r"could not load unet \(fp32\)"):
        pipeline.generate(GenerateOptions(prompts=("cat",), steps=1))
    with pytest.raises(BackendError, match="has no nonexistent model"):
        pipeline.backend.prepare(["nonexistent"])


def test_cpu_loads_the_fused_graph_where_the_bundle_has_one(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    fp32, fp16 = OrtBackend(bundle), OrtBackend(bundle, precision="fp16")
    assert fp32._source("unet")[0].name == "unet.ort.onnx"
    assert fp32._source("vae_decoder")[0].name == "vae_decoder.ort.onnx"
    assert fp32._source("clip")[0].name == "clip.onnx"  # nothing fused: the standard graph
    assert fp16._source("unet")[0].name == "unet.fp16.onnx"
    assert fp32._cache_path("unet") != OrtBackend(bundle, precision="fp16")._cache_path("unet")
