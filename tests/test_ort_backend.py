"""The ONNX Runtime backend on CPU: background loading (`prepare`), the optimised-graph cache
(sealed with its hashes, rebuilt when damaged), and load failures reported as errors naming the
model on its first run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendConfig, BackendError
from runtime.backends.onnxruntime import OrtBackend
from runtime.bundle import Bundle, IntegrityError
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline


@pytest.fixture
def bundle_copy(fake_bundle_copy: Path) -> Path:
    """A private copy without any optimised-graph cache, so each test starts cold."""
    return fake_bundle_copy


def _clip_feeds() -> dict[str, np.ndarray]:
    return {"input_ids": np.full((2, 77), 3, dtype=np.int32)}


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

    assert any(name.endswith(".onnx.sha256") for name in cached)  # sealed with its hashes

    second = OrtBackend(bundle)
    got = second.run("clip", _clip_feeds())
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6)


def test_a_damaged_cache_is_rebuilt_not_trusted(bundle_copy: Path) -> None:
    bundle = Bundle.open(bundle_copy)
    expected = OrtBackend(bundle).run("vae_decoder", {"latent": np.ones((1, 4, 4, 4), np.float32)})
    cached = OrtBackend(bundle)._cache_path("vae_decoder")
    data = bytearray(cached.read_bytes())
    data[-20] ^= 0xFF  # a weight byte of the cached graph
    cached.write_bytes(bytes(data))
    got = OrtBackend(bundle).run("vae_decoder", {"latent": np.ones((1, 4, 4, 4), np.float32)})
    np.testing.assert_array_equal(got["image"], expected["image"])
    assert OrtBackend(bundle)._cache_path("vae_decoder").read_bytes() != bytes(data)  # rewritten


def test_load_failure_surfaces_on_first_run_with_model_name(bundle_copy: Path) -> None:
    unet = bundle_copy / "unet.onnx"
    unet.write_bytes(b"x" * unet.stat().st_size)  # same size: only the hash can tell
    # Verified (the default), the damaged file is named before ONNX Runtime sees it...
    pipeline = Pipeline(bundle_copy, BackendConfig(cache_graphs=False))
    pipeline.backend.prepare(["unet"])  # fails in the background: nothing raised here
    with pytest.raises(IntegrityError, match=r"unet.onnx"):
        pipeline.generate(GenerateOptions(prompts=("cat",), steps=1))
    # ... and with verification off, ONNX Runtime's own failure is reported with the model's name.
    unverified = Pipeline(Bundle.open(bundle_copy, verify="off"), BackendConfig(cache_graphs=False))
    with pytest.raises(BackendError, match=r"could not load unet \(fp32\)"):
        unverified.generate(GenerateOptions(prompts=("cat",), steps=1))
    with pytest.raises(BackendError, match="has no nonexistent model"):
        pipeline.backend.prepare(["nonexistent"])


def test_cpu_loads_the_fused_graph_where_the_bundle_has_one(tiny_bundle: Path) -> None:
    bundle = Bundle.open(tiny_bundle)
    fp32 = OrtBackend(bundle)
    fp16 = OrtBackend(bundle, BackendConfig(precision="fp16"))
    assert fp32._source("unet").file == "unet.ort.onnx"
    assert fp32._source("vae_decoder").file == "vae_decoder.ort.onnx"
    assert fp32._source("clip").file == "clip.onnx"  # nothing fused: the standard graph
    assert fp16._source("unet").file == "unet.fp16.onnx"
    assert fp32._cache_path("unet") != fp16._cache_path("unet")
