"""Latent Consistency Model sampling (Luo et al., 2023, Algorithm 3): each step maps x_t straight
to a clean estimate (the consistency function), then re-noises it to the next timestep with fresh
noise; the last step returns the clean estimate. Meant for LCM-distilled UNets (or LCM-LoRA), 2-8 steps."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from .base import IntArray, Scheduler, SchedulerConfig, to_f64

SIGMA_DATA = 0.5  # consistency models' sigma_data (diffusers hard-codes it too)


def lcm_timesteps(num_inference_steps: int, original_steps: int, total: int) -> IntArray:
    """diffusers' LCM/TCD schedule: the distillation schedule k, 2k, ..., original_steps * k (minus
    one, k = total // original_steps), descending, and of it n entries evenly spaced in index.
    `timestep_spacing` and `steps_offset` play no part (diffusers ignores them here too)."""
    k = total // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    spread = np.linspace(0, original_steps, num=num_inference_steps, endpoint=False)
    picked = np.floor(spread).astype(np.int64)
    return np.ascontiguousarray(origin[picked]).astype(np.int64)


def _check_noise(name: str, noise: np.ndarray | None, sample: np.ndarray) -> np.ndarray:
    if noise is None:
        raise ValueError(
            f"{name} needs `noise` (standard normal, shape of sample) at every step but the last"
        )
    if noise.shape != sample.shape:
        raise ValueError(f"noise shape {noise.shape} != sample shape {sample.shape}")
    return to_f64(noise)


class LCMScheduler(Scheduler):
    """Matches diffusers `LCMScheduler` (epsilon prediction); the caller supplies the noise.

    Config keys of its own: `original_inference_steps` (50; the timesteps are a subset of that
    schedule, so it bounds the step count) and `timestep_scaling` (10). One-step: no history.
    """

    name = "lcm"
    default_spacing = "leading"  # unused: the schedule ignores timestep_spacing
    # LCMScheduler's __init__ defaults (the LDM betas), for configs that lack these keys.
    config_defaults: ClassVar[dict[str, Any]] = {
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
    }
    stochastic = True

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        total, steps = config.num_train_timesteps, config.original_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= total:
            raise ValueError(
                f"original_inference_steps must be an int in [1, {total}] (num_train_timesteps), "
                f"got {steps!r}"
            )
        scaling = config.timestep_scaling
        if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not 0 < scaling < math.inf:
            raise ValueError(f"timestep_scaling must be a finite number > 0, got {scaling!r}")
        self.original_steps = int(steps)
        self.timestep_scaling = float(scaling)
        # diffusers' LCM default is clip_sample=False (SD configs say so too).
        self.clip_range = config.clip_sample_range if config.clip_sample else None

    @property
    def max_steps(self) -> int:
        """The timesteps are picked from the `original_inference_steps` schedule without repeats,
        so there can be no more steps than that (diffusers' rule; 50 by default)."""
        return self.original_steps

    def _check_steps(self, num_inference_steps: int) -> int:
        n, most = num_inference_steps, self.max_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= most:
            raise ValueError(
                f"num_inference_steps must be an int in [1, {most}], got {n!r}: {self.name} picks its "
                f"steps from the original_inference_steps={most} schedule"
            )
        return int(n)

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = self._check_steps(num_inference_steps)
        self.timesteps = lcm_timesteps(n, self.original_steps, self.config.num_train_timesteps)
        self.set_begin_index(0)
        return self.timesteps.copy()

    def boundary_scalings(self, timestep: int) -> tuple[float, float]:
        """(c_skip, c_out) of the consistency parametrization f(x, t) = c_skip x + c_out x_0, with
        c_skip -> 1, c_out -> 0 at t -> 0 (the boundary condition f(x, 0) = x); the timestep is
        scaled by `timestep_scaling` so that already at t = 1 the model's x_0 dominates."""
        scaled = timestep * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / math.sqrt(scaled**2 + SIGMA_DATA**2)
        return c_skip, c_out

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """`noise`: standard normal, shape of `sample`; unused (may be None) on the last step."""
        self._check_index(step_index)
        last = step_index == len(self.timesteps) - 1
        z = None if last else _check_noise(self.name, noise, sample)
        x, eps = to_f64(sample), to_f64(model_output)
        # 1. t and the next timestep (the last step has none: diffusers reuses t; unused there).
        t = int(self.timesteps[step_index])
        t_prev = t if last else int(self.timesteps[step_index + 1])
        # 2. alpha_bar at both.
        alpha_prod_t, alpha_prod_t_prev = self.alphas_cumprod[t], self.alphas_cumprod[t_prev]
        # 3. predicted x_0 from epsilon, clipped if the config asks.
        pred_original_sample = (x - np.sqrt(1.0 - alpha_prod_t) * eps) / np.sqrt(alpha_prod_t)
        if self.clip_range is not None:
            pred_original_sample = np.clip(pred_original_sample, -self.clip_range, self.clip_range)
        # 4. the consistency function's output: denoised = c_out * x_0 + c_skip * x_t.
        c_skip, c_out = self.boundary_scalings(t)
        denoised = c_out * pred_original_sample + c_skip * x
        # 5. multistep sampling: forward-diffuse the estimate to t_prev with fresh noise (not after
        # the last step, so one-step sampling is deterministic).
        if z is None:
            prev_sample = denoised
        else:
            prev_sample = np.sqrt(alpha_prod_t_prev) * denoised + np.sqrt(1.0 - alpha_prod_t_prev) * z
        return prev_sample.astype(sample.dtype, copy=False)
