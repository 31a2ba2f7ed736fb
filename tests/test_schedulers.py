"""The numpy schedulers on their own: state reset between runs, and every bad argument refused
with a message naming it. No torch: parity with diffusers is in test_scheduler_parity.py."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from runtime.schedulers import SCHEDULERS, SD15_SCHEDULER, Scheduler, SchedulerConfig, make_scheduler

SHAPE = (1, 4, 8, 8)
SD15: dict[str, Any] = SD15_SCHEDULER


def _fake_unet(x_in: np.ndarray, t: float, fixed: np.ndarray) -> np.ndarray:
    """Deterministic epsilon depending on both the input and the timestep."""
    return (0.1 * x_in + np.cos(t) * fixed).astype(np.float32)


def _run(scheduler: Scheduler, timesteps: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(SHAPE).astype(np.float32) * np.float32(scheduler.init_noise_sigma)
    fixed = rng.standard_normal(SHAPE).astype(np.float32)
    for i, t in enumerate(timesteps):
        eps = _fake_unet(scheduler.scale_model_input(x, i), float(t), fixed)
        x = scheduler.step(eps, i, x, noise=rng.standard_normal(SHAPE).astype(np.float32))
    return x


@pytest.mark.parametrize("name", SCHEDULERS)
def test_history_is_reset_between_runs(name: str) -> None:
    """A second run, with or without a new set_timesteps, must not see the first run's history."""
    scheduler = make_scheduler(name, SD15)
    first = _run(scheduler, scheduler.set_timesteps(10))
    again = _run(scheduler, scheduler.timesteps)
    scheduler.set_timesteps(7)
    _run(scheduler, scheduler.timesteps)
    after_reset = _run(scheduler, scheduler.set_timesteps(10))
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(after_reset, first)


@pytest.mark.parametrize("name", ["pndm", "dpmpp_2m", "dpmpp_2m_karras"])
def test_multistep_rejects_out_of_order_steps(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    scheduler.set_timesteps(10)
    x = np.zeros(SHAPE, np.float32)
    scheduler.step(x, 0, x)
    with pytest.raises(ValueError, match="step_index"):
        scheduler.step(x, 2, x)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_step_index_out_of_range(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(IndexError, match="set_timesteps"):
        scheduler.step(x, 0, x, noise=x)
    n = len(scheduler.set_timesteps(4))
    with pytest.raises(IndexError, match="step_index"):
        scheduler.scale_model_input(x, n)


def test_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match="name") as info:
        make_scheduler("lms", SD15)
    for allowed in SCHEDULERS:
        assert allowed in str(info.value)


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.0, True])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_bad_num_inference_steps(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler(name, SD15).set_timesteps(bad)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_unsupported_prediction_type(name: str, prediction_type: str) -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler(name, {**SD15, "prediction_type": prediction_type})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("beta_schedule", "squaredcos_cap_v2"),
        ("timestep_spacing", "uniform"),
        ("trained_betas", [0.1] * 1000),
        ("rescale_betas_zero_snr", True),
        ("skip_prk_steps", False),
        ("interpolation_type", "log_linear"),
    ],
)
def test_unsupported_config_values(key: str, value: Any) -> None:
    with pytest.raises(ValueError, match=key):
        SchedulerConfig.from_dict({**SD15, key: value})


def test_euler_a_requires_noise() -> None:
    scheduler = make_scheduler("euler_a", SD15)
    scheduler.set_timesteps(4)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="noise"):
        scheduler.step(x, 0, x)
    with pytest.raises(ValueError, match="noise"):
        scheduler.step(x, 0, x, noise=np.zeros((1, 4, 8, 9), np.float32))


def test_config_from_dict_ignores_unknown_keys_and_is_frozen() -> None:
    config = SchedulerConfig.from_dict({**SD15, "some_future_key": 3})
    assert config == SchedulerConfig(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type="epsilon",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps_offset = 0  # type: ignore[misc]
