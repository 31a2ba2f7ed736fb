"""Step caching (`cache_interval`) in the runtime, torch-free: option checks, the loop's
full/shallow schedule and what it feeds the shallow graph, and the request surfaces.
Parity with the PyTorch reference is tests/test_deepcache.py's job (integration)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.bundle import Bundle
from runtime.denoise import denoise, unet_models
from runtime.errors import RequestError
from runtime.image import infotext
from runtime.options import GenerateOptions, validate
from runtime.pipeline import Pipeline, Result
from runtime.schedulers import SD15_SCHEDULER, make_scheduler
from runtime.serving.batching import batch_key
from runtime.serving.kserve import options_from_inputs
from runtime.serving.kserve_codec import InferTensor
from runtime.serving.schemas import GenerateRequest, GenerationParameters
from runtime.specs import DEEP_FEATURE, DEEPCACHE_FULL, DEEPCACHE_SHALLOW
from runtime.start_latents import Start


class RecordingBackend:
    """Answers every UNet graph with a prediction derived from its inputs, and records the calls."""

    device, precision = "cpu", "fp32"

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, np.ndarray]]] = []

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls.append((model, feeds))
        sample = feeds["sample"]
        out = {"noise_pred": 0.1 * sample + feeds["timestep"][0] / 1000}
        if model == DEEPCACHE_FULL:
            out[DEEP_FEATURE] = np.full((sample.shape[0], 3, *sample.shape[2:]), len(self.calls), np.float32)
        return out

    def prepare(self, models: Iterable[str]) -> None:
        pass

    def close(self) -> None:
        pass


def _run(cache_interval: int, steps: int = 7) -> RecordingBackend:
    backend = RecordingBackend()
    scheduler = make_scheduler("ddim", SD15_SCHEDULER)
    timesteps = scheduler.set_timesteps(steps)
    latents = np.ones((1, 4, 4, 4), np.float32)
    states = np.zeros((2, 77, 8), np.float32)
    for _ in denoise(backend, scheduler, timesteps, Start(latents), states, 7.5, None, cache_interval):
        pass
    return backend


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_full_every_nth_call_and_shallow_gets_the_last_full_feature(interval: int) -> None:
    calls = _run(interval).calls
    want = [DEEPCACHE_FULL if i % interval == 0 else DEEPCACHE_SHALLOW for i in range(7)]
    assert [model for model, _ in calls] == want
    for i, (model, feeds) in enumerate(calls):
        if model == DEEPCACHE_SHALLOW:
            last_full = i - i % interval  # its feature was filled with that call's number (1-based)
            assert np.all(feeds[DEEP_FEATURE] == last_full + 1)
            assert feeds[DEEP_FEATURE].shape[0] == feeds["sample"].shape[0] == 2  # CFG batch
        else:
            assert DEEP_FEATURE not in feeds


def test_interval_one_runs_the_plain_unet_only() -> None:
    assert [model for model, _ in _run(1).calls] == ["unet"] * 7
    assert unet_models(1) == ["unet"]
    assert unet_models(4) == [DEEPCACHE_FULL, DEEPCACHE_SHALLOW]


def test_pipeline_loads_the_caching_graphs_only_when_asked() -> None:
    plain = GenerateOptions(prompts=("a",))
    cached = GenerateOptions(prompts=("a",), cache_interval=3)
    assert Pipeline.models_for(plain) == ["clip", "unet", "vae_decoder"]
    assert Pipeline.models_for(cached) == ["clip", DEEPCACHE_FULL, DEEPCACHE_SHALLOW, "vae_decoder"]


def test_bundle_without_the_graphs_refuses_caching_naming_the_export_flag(fake_bundle: Path) -> None:
    bundle = Bundle.open(fake_bundle)
    assert validate(GenerateOptions(prompts=("a",)), bundle).cache_interval == 1
    with pytest.raises(RequestError, match=r"cache_interval 2 needs .*--deepcache"):
        validate(GenerateOptions(prompts=("a",), cache_interval=2), bundle)


@pytest.mark.parametrize("bad", [0, -1, 1001, True, "2", 2.0, None])
def test_bad_cache_interval_is_refused_with_its_range(fake_bundle: Path, bad: Any) -> None:
    with pytest.raises(RequestError, match=r"cache_interval must be an integer from 1 \(off\) to 1000"):
        validate(GenerateOptions(prompts=("a",), cache_interval=bad), Bundle.open(fake_bundle))


def test_infotext_names_the_interval_only_when_caching(fake_bundle: Path) -> None:
    bundle = Bundle.open(fake_bundle)
    plain = validate(GenerateOptions(prompts=("a",)), bundle)
    image = np.zeros((1, 8, 8, 3), np.uint8)
    assert "Cache interval" not in infotext(Result(image, [0], plain), 0, "onnxruntime", "fp32", "m")
    cached = plain.__class__(**{**plain.__dict__, "cache_interval": 3})
    assert "Cache interval: 3" in infotext(Result(image, [0], cached), 0, "onnxruntime", "fp32", "m")
    assert GenerationParameters.from_options(cached).cache_interval == 3


def test_requests_carry_the_interval_and_never_batch_across_it(fake_bundle: Path) -> None:
    bundle = Bundle.open(fake_bundle)
    request = GenerateRequest.model_validate({"prompt": "a cat", "cache_interval": 3, "scheduler": "ddim"})
    assert request.to_options().cache_interval == 3
    with pytest.raises(ValueError, match="cache_interval"):
        GenerateRequest.model_validate({"prompt": "a cat", "cache_interval": "3"})  # strict
    spec = InferTensor(name="cache_interval", shape=[1], datatype="INT32")
    prompt = InferTensor(name="prompt", shape=[1], datatype="BYTES")
    options = options_from_inputs(
        {"cache_interval": spec, "prompt": prompt}, {"cache_interval": [2], "prompt": [b"a cat"]}
    )
    assert options.cache_interval == 2
    resolved = validate(GenerateOptions(prompts=("a cat",), scheduler="ddim"), bundle)
    other = resolved.__class__(**{**resolved.__dict__, "cache_interval": 2})
    assert batch_key(resolved, bundle) != batch_key(other, bundle)
