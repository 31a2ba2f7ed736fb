"""Runs that start part-way (img2img / inpaint): the begin index and `add_noise` refuse bad
arguments, and multistep samplers insist on begin, begin + 1, ... No torch: parity of these runs
with diffusers' pipelines is in test_scheduler_parity.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from runtime.schedulers import SCHEDULERS, SD15_SCHEDULER, Scheduler, make_scheduler

SHAPE = (1, 4, 8, 8)
SD15: dict[str, Any] = SD15_SCHEDULER
MULTISTEP = ["pndm", "dpmpp_2m", "dpmpp_2m_karras"]


def _fake_unet(x_in: np.ndarray, t: float, fixed: np.ndarray) -> np.ndarray:
    """Deterministic epsilon depending on both the input and the timestep."""
    return (0.1 * x_in + np.cos(t) * fixed).astype(np.float32)


def _run_from(scheduler: Scheduler, begin: int) -> np.ndarray:
    """An img2img run: noise fixed clean latents to step `begin`, then step to the end."""
    rng = np.random.default_rng(2)
    image, noise, fixed = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    x = scheduler.add_noise(image, noise, begin)
    for i in range(begin, len(scheduler.timesteps)):
        eps = _fake_unet(scheduler.scale_model_input(x, i), float(scheduler.timesteps[i]), fixed)
        x = scheduler.step(eps, i, x, noise=rng.standard_normal(SHAPE).astype(np.float32))
    return x


@pytest.mark.parametrize("name", SCHEDULERS)
def test_set_begin_index_out_of_range(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.set_begin_index(0)
    n = len(scheduler.set_timesteps(10))
    for bad in (-1, n, True, 2.0):
        with pytest.raises(ValueError, match=rf"begin index must be an int in \[0, {n}\)"):
            scheduler.set_begin_index(bad)  # type: ignore[arg-type]
    assert scheduler.begin_index == 0


@pytest.mark.parametrize("name", SCHEDULERS)
def test_begin_index_zero_and_set_timesteps_reset(name: str) -> None:
    """An explicit begin index 0 is the text-to-image run; set_timesteps drops an earlier begin."""
    scheduler = make_scheduler(name, SD15)
    scheduler.set_timesteps(10)
    default = _run_from(scheduler, 0)
    scheduler.set_begin_index(0)
    np.testing.assert_array_equal(_run_from(scheduler, 0), default)
    scheduler.set_begin_index(4)
    partial = _run_from(scheduler, 4)
    scheduler.set_timesteps(10)
    assert scheduler.begin_index == 0
    np.testing.assert_array_equal(_run_from(scheduler, 0), default)
    scheduler.set_begin_index(4)
    np.testing.assert_array_equal(_run_from(scheduler, 4), partial)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_steps_before_begin_index_are_refused(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    scheduler.set_timesteps(10)
    scheduler.set_begin_index(3)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(IndexError, match=r"step_index 2 is outside \[3, "):
        scheduler.scale_model_input(x, 2)
    with pytest.raises(IndexError, match=r"step_index 2 is outside \[3, "):
        scheduler.step(x, 2, x, noise=x)


@pytest.mark.parametrize("name", MULTISTEP)
def test_multistep_after_begin_index_rejects_out_of_order_steps(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    scheduler.set_timesteps(10)
    x = np.zeros(SHAPE, np.float32)
    for i in range(6):  # a text-to-image run abandoned after step 5
        scheduler.step(x, i, x)
    scheduler.set_begin_index(3)
    with pytest.raises(ValueError, match=r"step_index 6 out of order .* stepped 3, 4, \.\.\."):
        scheduler.step(x, 6, x)  # the abandoned run's next step is not this run's
    with pytest.raises(ValueError, match="step_index 4 out of order"):
        scheduler.step(x, 4, x)
    scheduler.step(x, 3, x)
    with pytest.raises(ValueError, match="step_index 5 out of order"):
        scheduler.step(x, 5, x)
    scheduler.step(x, 4, x)
    scheduler.step(x, 3, x)  # the begin index starts a new run at any time


@pytest.mark.parametrize("name", MULTISTEP)
def test_set_begin_index_clears_history(name: str) -> None:
    """A run from begin 4 is the same on a fresh scheduler and on one that ran before."""
    fresh = make_scheduler(name, SD15)
    fresh.set_timesteps(10)
    fresh.set_begin_index(4)
    used = make_scheduler(name, SD15)
    used.set_timesteps(10)
    _run_from(used, 0)
    used.set_begin_index(2)
    _run_from(used, 2)
    used.set_begin_index(4)
    np.testing.assert_array_equal(_run_from(used, 4), _run_from(fresh, 4))


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_arguments(name: str) -> None:
    scheduler = make_scheduler(name, SD15)
    x = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.add_noise(x, x, 0)
    n = len(scheduler.set_timesteps(10))
    with pytest.raises(ValueError, match="shape"):
        scheduler.add_noise(x, np.zeros((1, 4, 8, 9), np.float32), 0)
    for bad in (-1, n):
        with pytest.raises(ValueError, match=rf"step_index {bad} is outside \[0, {n}\)"):
            scheduler.add_noise(x, x, bad)
    noisy = scheduler.add_noise(np.ones(SHAPE, np.float32), np.ones(SHAPE, np.float32), n - 1)
    assert noisy.dtype == np.float32 and noisy.shape == SHAPE
