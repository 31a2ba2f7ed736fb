"""Static shapes (BackendConfig.static_shapes) on the fake bundle, for ONNX Runtime (CPU) and
OpenVINO: the same outputs as the dynamic models, one compile per shape (reported, then reused),
least recently used shapes evicted, the dynamic model as the fallback of a failed compile, and
settings that mean nothing refused."""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.backends import BackendConfig, open_backend
from runtime.backends.loading import STATIC_SHAPES_PER_MODEL, ShapeCache
from runtime.bundle import Bundle
from runtime.errors import RequestError
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
BACKENDS = [
    "onnxruntime",
    pytest.param("openvino", marks=pytest.mark.skipif(not HAS_OPENVINO, reason="openvino not installed")),
]
# Static and dynamic kernels may round differently (OpenVINO picks per-shape kernels).
TOLERANCE = 1e-6


def _unet_feeds(bundle: Bundle, batch: int = 2, height: int = 8, width: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + height * 10 + width)
    return {
        "sample": rng.standard_normal((batch, bundle.latent_channels, height, width), dtype=np.float32),
        "timestep": np.array([981.0], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, 77, bundle.hidden_size), dtype=np.float32),
    }


def _all_feeds(bundle: Bundle) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return {
        "clip": {"input_ids": rng.integers(0, 14, (2, 77)).astype(np.int32)},
        "deprojector": {"pooled": rng.standard_normal((2, bundle.hidden_size), dtype=np.float32)},
        "unet": _unet_feeds(bundle),
        "vae_decoder": {"latent": rng.standard_normal((1, bundle.latent_channels, 8, 6), dtype=np.float32)},
    }


def _config(backend: str, static: bool) -> BackendConfig:
    return BackendConfig(backend, static_shapes=static, cache_graphs=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_static_outputs_match_dynamic_for_every_model(fake_bundle: Path, backend: str) -> None:
    bundle = Bundle.open(fake_bundle)
    dynamic, static = (
        open_backend(bundle, _config(backend, False)),
        open_backend(bundle, _config(backend, True)),
    )
    for model, feeds in _all_feeds(bundle).items():
        want, got = dynamic.run(model, feeds), static.run(model, feeds)
        assert set(got) == set(want), model
        for name in want:
            assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype
            np.testing.assert_allclose(
                got[name], want[name], rtol=0, atol=TOLERANCE, err_msg=f"{model}.{name}"
            )
    compiled = {c.model for c in static.static.compiles}  # type: ignore[attr-defined]
    assert compiled == set(_all_feeds(bundle)), "every model ran on its static compile"


def test_static_sessions_and_compiled_models_have_fixed_inputs(fake_bundle: Path) -> None:
    bundle = Bundle.open(fake_bundle)
    ort_backend = open_backend(bundle, _config("onnxruntime", True))
    ort_backend.run("unet", _unet_feeds(bundle, 2, 8, 6))
    session = ort_backend.static.get("unet", ((2, 4, 8, 6), (1,), (2, 77, bundle.hidden_size)))  # type: ignore[attr-defined]
    assert [i.shape for i in session.get_inputs()] == [[2, 4, 8, 6], [1], [2, 77, bundle.hidden_size]]
    if HAS_OPENVINO:
        ov_backend = open_backend(bundle, _config("openvino", True))
        ov_backend.run("unet", _unet_feeds(bundle, 2, 8, 6))
        shapes = ((2, 4, 8, 6), (1,), (2, 77, bundle.hidden_size))
        compiled = ov_backend.static.get("unet", shapes).compiled  # type: ignore[attr-defined]
        assert [tuple(i.get_shape()) for i in compiled.inputs] == list(shapes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_call_at_a_shape_compiles_and_is_reported_then_reused(
    fake_bundle: Path, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = Bundle.open(fake_bundle)
    static = open_backend(bundle, _config(backend, True))
    cache = static.static  # type: ignore[attr-defined]
    with caplog.at_level(logging.INFO, logger="runtime.backends.loading"):
        first = static.run("unet", _unet_feeds(bundle))
        again = static.run("unet", _unet_feeds(bundle))
    np.testing.assert_array_equal(first["noise_pred"], again["noise_pred"])
    assert len(cache.compiles) == 1 and cache.hits == 1
    compile_ = cache.compiles[0]
    assert compile_.model == "unet" and compile_.shapes[0] == (2, 4, 8, 6) and compile_.seconds > 0
    assert not compile_.failed
    reports = [r.getMessage() for r in caplog.records if "static shapes: compiled unet" in r.getMessage()]
    assert len(reports) == 1 and "(2, 4, 8, 6)" in reports[0]

    static.run("unet", _unet_feeds(bundle, 1, 8, 6))  # a new batch size is a new shape
    assert len(cache.compiles) == 2 and cache.compiles[1].shapes[0] == (1, 4, 8, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_least_recently_used_shape_is_evicted(fake_bundle: Path, backend: str) -> None:
    assert STATIC_SHAPES_PER_MODEL == 2
    bundle = Bundle.open(fake_bundle)
    static = open_backend(bundle, _config(backend, True))
    dynamic = open_backend(bundle, _config(backend, False))
    cache = static.static  # type: ignore[attr-defined]
    a, b, c = (_unet_feeds(bundle, 1, 8, w) for w in (4, 6, 8))
    for feeds in (a, b, a, c):  # a is used again before c arrives: b is the least recent
        got = static.run("unet", feeds)["noise_pred"]
        np.testing.assert_allclose(got, dynamic.run("unet", feeds)["noise_pred"], rtol=0, atol=TOLERANCE)
    assert [shapes[0][3] for _, shapes in cache.cached()] == [4, 8]
    assert cache.evictions == 1 and len(cache.compiles) == 3
    static.run("vae_decoder", {"latent": a["sample"]})  # other models do not count against unet's
    assert cache.evictions == 1
    static.run("unet", b)  # compiled again
    assert len([c for c in cache.compiles if c.model == "unet"]) == 4 and cache.evictions == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_failed_shape_compile_falls_back_to_the_dynamic_model(
    fake_bundle: Path, backend: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bundle = Bundle.open(fake_bundle)
    static = open_backend(bundle, _config(backend, True))
    expected = open_backend(bundle, _config(backend, False)).run("unet", _unet_feeds(bundle))
    calls = []

    def broken(model: str, shapes: Any) -> Any:
        calls.append(shapes)
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setattr(static.static, "_build", broken)  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="runtime.backends.loading"):
        for _ in range(2):
            got = static.run("unet", _unet_feeds(bundle))
            np.testing.assert_array_equal(got["noise_pred"], expected["noise_pred"])
    assert len(calls) == 1, "a failed shape is remembered, not compiled again per call"
    assert static.static.compiles[0].failed  # type: ignore[attr-defined]
    assert any(
        "could not compile for" in r.getMessage() and "no kernel" in r.getMessage() for r in caplog.records
    )


def test_prepare_does_not_load_dynamic_sessions_when_static(fake_bundle: Path) -> None:
    backend = open_backend(Bundle.open(fake_bundle), _config("onnxruntime", True))
    backend.prepare(["unet", "vae_decoder"])
    assert backend._sessions.started == {}  # type: ignore[attr-defined]
    assert set(backend._ready.started) == {"unet", "vae_decoder"}  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", BACKENDS)
def test_pipeline_image_is_the_same_with_static_shapes(fake_bundle: Path, backend: str) -> None:
    options = GenerateOptions(prompts=("a cat", "a dog"), steps=3, seed=1, height=64, width=48)
    dynamic = Pipeline(fake_bundle, _config(backend, False)).generate(options).images
    static = Pipeline(fake_bundle, _config(backend, True)).generate(options).images
    assert dynamic.std() > 0
    np.testing.assert_array_equal(static, dynamic)


def test_one_compile_for_concurrent_callers_of_a_new_shape() -> None:
    built: list[tuple[str, Any]] = []

    def build(model: str, shapes: Any) -> str:
        built.append((model, shapes))
        time.sleep(0.05)
        return f"{model}@{shapes}"

    cache: ShapeCache[str] = ShapeCache(build, capacity=1)
    results: list[str | None] = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.get("unet", ((1, 2),)))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert built == [("unet", ((1, 2),))] and results == ["unet@((1, 2),)"] * 4
    with pytest.raises(ValueError, match="capacity must be >= 1; got 0"):
        ShapeCache(build, capacity=0)


def test_static_shapes_refused_where_it_means_nothing() -> None:
    with pytest.raises(RequestError, match="static_shapes applies to openvino and onnxruntime on cpu only"):
        BackendConfig("tensorrt", static_shapes=True).validate()
    with pytest.raises(RequestError, match="not onnxruntime/cuda"):
        BackendConfig(device="cuda", static_shapes=True).validate()
    assert BackendConfig("openvino", static_shapes=True).validate().static_shapes
    assert not BackendConfig().static_shapes  # dynamic stays the default
