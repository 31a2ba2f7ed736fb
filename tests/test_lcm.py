"""The LCM and TCD samplers without torch: their schedule, step limit, config keys and noise
contract, where the CLI and the server offer them, and whole generations on the fake bundle.
Parity with diffusers' LCMScheduler / TCDScheduler is in test_scheduler_parity.py."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.backends import BackendConfig
from runtime.bundle import Bundle
from runtime.errors import RequestError
from runtime.options import GenerateOptions, validate
from runtime.pipeline import Pipeline
from runtime.schedulers import SCHEDULERS, SD15_SCHEDULER, make_scheduler
from runtime.schedulers.lcm import LCMScheduler

SHAPE = (1, 4, 8, 8)
SD15: dict[str, Any] = SD15_SCHEDULER
CONSISTENCY = ["lcm", "tcd"]
SIZE = 64


def _fake_unet(x_in: np.ndarray, t: float, fixed: np.ndarray) -> np.ndarray:
    return (0.1 * x_in + np.cos(t) * fixed).astype(np.float32)


@pytest.mark.parametrize("name", CONSISTENCY)
def test_registered_stochastic_and_offered_by_cli_and_server(name: str) -> None:
    from runtime.generate import parse_args

    assert name in SCHEDULERS and make_scheduler(name, SD15).stochastic
    assert parse_args(["a cat", "--scheduler", name]).scheduler == name
    schemas = pytest.importorskip("runtime.serving.schemas")
    enum = schemas.GenerateRequest.model_json_schema()["properties"]["scheduler"]["enum"]
    assert name in enum


@pytest.mark.parametrize("name", CONSISTENCY)
@pytest.mark.parametrize(
    "config",
    [
        SD15,
        {**SD15, "timestep_spacing": "trailing", "steps_offset": 0},
        {**SD15, "timestep_spacing": "linspace", "set_alpha_to_one": True},
    ],
)
def test_schedule_ignores_spacing_and_offset(name: str, config: dict[str, Any]) -> None:
    """Picked from 999, 979, ..., 19 (the 50-step distillation schedule), as diffusers does."""
    scheduler = make_scheduler(name, config)
    np.testing.assert_array_equal(scheduler.set_timesteps(1), [999])
    np.testing.assert_array_equal(scheduler.set_timesteps(4), [999, 759, 499, 259])
    np.testing.assert_array_equal(scheduler.set_timesteps(8), [999, 879, 759, 639, 499, 379, 259, 139])
    np.testing.assert_array_equal(scheduler.set_timesteps(50), np.arange(999, 0, -20))
    assert scheduler.init_noise_sigma == 1.0


@pytest.mark.parametrize("name", CONSISTENCY)
@pytest.mark.parametrize(("original", "limit"), [(None, 50), (8, 8), (1000, 1000)])
def test_max_steps_is_original_inference_steps(name: str, original: int | None, limit: int) -> None:
    config = SD15 if original is None else {**SD15, "original_inference_steps": original}
    scheduler = make_scheduler(name, config)
    assert scheduler.max_steps == limit
    assert len(scheduler.set_timesteps(limit)) == limit
    with pytest.raises(
        ValueError, match=rf"num_inference_steps must be an int in \[1, {limit}\], got {limit + 1}: .*"
        rf"original_inference_steps={limit}"
    ):  # fmt: skip
        scheduler.set_timesteps(limit + 1)


def test_validate_bounds_steps_by_the_sampler(fake_bundle: Path) -> None:
    bundle = Bundle.open(fake_bundle)
    assert validate(GenerateOptions(prompts=("a cat",), steps=50, scheduler="lcm"), bundle).steps == 50
    with pytest.raises(RequestError, match="steps must be an integer from 1 to 50; got 51"):
        validate(GenerateOptions(prompts=("a cat",), steps=51, scheduler="lcm"), bundle)
    assert validate(GenerateOptions(prompts=("a cat",), steps=51, scheduler="ddim"), bundle).steps == 51


@pytest.mark.parametrize("name", CONSISTENCY)
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("original_inference_steps", 0),
        ("original_inference_steps", -5),
        ("original_inference_steps", 1001),  # more than num_train_timesteps
        ("original_inference_steps", 50.0),
        ("original_inference_steps", True),
        ("original_inference_steps", "50"),
        ("timestep_scaling", 0),
        ("timestep_scaling", -10.0),
        ("timestep_scaling", math.inf),
        ("timestep_scaling", math.nan),
        ("timestep_scaling", True),
        ("timestep_scaling", "10"),
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("prediction_type", "v_prediction"),
        ("beta_schedule", "squaredcos_cap_v2"),
    ],
)
def test_bad_config_values_name_the_key(name: str, key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        make_scheduler(name, {**SD15, key: value})


def test_other_samplers_ignore_the_consistency_keys() -> None:
    """As diffusers' other classes do: the keys are LCM's/TCD's alone."""
    config = {**SD15, "original_inference_steps": 4, "timestep_scaling": 1.0}
    for name in SCHEDULERS:
        if name not in CONSISTENCY:
            assert len(make_scheduler(name, config).set_timesteps(20)) >= 20


@pytest.mark.parametrize("name", CONSISTENCY)
def test_class_defaults_are_lcms(name: str) -> None:
    """A config without beta keys gets LCMScheduler's LDM betas, not the DDPM ones of SchedulerConfig."""
    sd15 = make_scheduler(name, SD15).alphas_cumprod
    np.testing.assert_array_equal(make_scheduler(name, {}).alphas_cumprod, sd15)
    assert make_scheduler("ddim", {}).alphas_cumprod[-1] != sd15[-1]


@pytest.mark.parametrize("name", CONSISTENCY)
def test_noise_needed_on_every_step_but_the_last(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    scheduler.set_timesteps(4)
    x = np.ones(SHAPE, np.float32)
    for i in range(3):
        with pytest.raises(ValueError, match="needs `noise`"):
            scheduler.step(x, i, x)
        with pytest.raises(ValueError, match="noise shape"):
            scheduler.step(x, i, x, noise=np.zeros((1, 4, 8, 9), np.float32))
    assert scheduler.step(x, 3, x).shape == SHAPE  # the last step injects none
    one = make_scheduler(name, SD15)
    one.set_timesteps(1)
    np.testing.assert_array_equal(one.step(x, 0, x), one.step(x, 0, x, noise=np.zeros(SHAPE, np.float32)))


@pytest.mark.parametrize("name", CONSISTENCY)
def test_noise_enters_every_step_but_the_last(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    scheduler.set_timesteps(4)
    x, eps = np.ones(SHAPE, np.float32), np.full(SHAPE, 0.5, np.float32)
    zeros, ones = np.zeros(SHAPE, np.float32), np.ones(SHAPE, np.float32)
    for i in range(4):
        quiet, noisy = scheduler.step(eps, i, x, noise=zeros), scheduler.step(eps, i, x, noise=ones)
        assert np.array_equal(quiet, noisy) == (i == 3)


def test_lcm_last_step_is_the_consistency_function() -> None:
    """denoised = c_out * x_0 + c_skip * x_t, with f(x, 0) = x at the boundary."""
    scheduler = make_scheduler("lcm", SD15)
    assert isinstance(scheduler, LCMScheduler)
    assert scheduler.boundary_scalings(0) == (1.0, 0.0)
    c_skip, c_out = scheduler.boundary_scalings(259)
    assert c_skip == pytest.approx(0.25 / (2590**2 + 0.25)) and c_out == pytest.approx(1.0, abs=1e-7)
    scheduler.set_timesteps(4)
    rng = np.random.default_rng(0)
    x, eps = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
    alpha = scheduler.alphas_cumprod[259]
    x0 = (x.astype(np.float64) - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
    np.testing.assert_allclose(scheduler.step(eps, 3, x), c_out * x0 + c_skip * x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CONSISTENCY)
def test_add_noise_is_ddpms_at_the_steps_timestep(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    scheduler.set_timesteps(4)
    image, noise = np.ones(SHAPE, np.float32), np.full(SHAPE, 2.0, np.float32)
    alpha = scheduler.alphas_cumprod[499]
    expected = math.sqrt(alpha) + 2.0 * math.sqrt(1 - alpha)
    np.testing.assert_allclose(scheduler.add_noise(image, noise, 2), expected, rtol=1e-6)


# End to end on the fake bundle.


@pytest.fixture(scope="module")
def pipeline(fake_bundle: Path):
    pipeline = Pipeline(fake_bundle, BackendConfig("onnxruntime", cache_graphs=False))
    yield pipeline
    pipeline.close()


def _unet_batches(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    batches: list[int] = []
    run = pipeline.backend.run

    def recording(model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if model == "unet":
            batches.append(len(feeds["sample"]))
        return run(model, feeds)

    monkeypatch.setattr(pipeline.backend, "run", recording)
    return batches


@pytest.mark.parametrize("name", CONSISTENCY)
def test_generate_without_uncond_batch_is_deterministic_per_seed(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    batches = _unet_batches(pipeline, monkeypatch)
    base = dict(prompts=("a cat",), steps=4, scheduler=name, guidance=1.0, height=SIZE, width=SIZE)
    first = pipeline.generate(GenerateOptions(seed=5, **base)).images  # type: ignore[arg-type]
    assert batches == [1, 1, 1, 1]  # guidance <= 1: no uncond half
    again = pipeline.generate(GenerateOptions(seed=5, **base)).images  # type: ignore[arg-type]
    other = pipeline.generate(GenerateOptions(seed=6, **base)).images  # type: ignore[arg-type]
    assert first.shape == (1, SIZE, SIZE, 3) and first.std() > 0
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other).max() > 0


def test_generate_img2img_starts_part_way(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    """strength 0.5 of 4 steps runs the last 2 (diffusers' img2img rule), deterministic per seed."""
    batches = _unet_batches(pipeline, monkeypatch)
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    options = GenerateOptions(
        prompts=("a cat",), steps=4, scheduler="lcm", guidance=1.0, init_image=image, strength=0.5, seed=3
    )
    assert pipeline.denoising_steps(options) == 2
    first = pipeline.generate(options).images
    assert batches == [1, 1]
    np.testing.assert_array_equal(first, pipeline.generate(options).images)
