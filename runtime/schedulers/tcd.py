"""Trajectory Consistency Distillation sampling (Zheng et al., 2024, "strategic stochastic
sampling"): from x_t, predict the point at s = (1 - gamma) * t_prev on the same trajectory (DDIM
with eta = 0), then forward-diffuse it to t_prev with fresh noise. gamma = 0 is deterministic,
gamma = 1 the LCM-like fully stochastic case. Meant for TCD-distilled UNets (or TCD-LoRA)."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from .base import to_f64
from .lcm import LCMScheduler, _check_noise


class TCDScheduler(LCMScheduler):
    """Matches diffusers `TCDScheduler` stepped with its default eta (the paper's gamma) = 0.3;
    same schedule (and `original_inference_steps` limit) as LCM. `timestep_scaling` and
    `clip_sample` are accepted but unused, as in diffusers."""

    name = "tcd"
    # diffusers takes gamma as `step(eta=...)`, not a config key: 0.3 is its default there. Note
    # that diffusers' SD pipelines pass their own `eta` (0.0 unless given) to schedulers that take one.
    gamma: ClassVar[float] = 0.3

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """`noise`: standard normal, shape of `sample`; unused (may be None) on the last step."""
        self._check_index(step_index)
        last = step_index == len(self.timesteps) - 1
        z = None if last or self.gamma == 0 else _check_noise(self.name, noise, sample)
        x, eps = to_f64(sample), to_f64(model_output)
        # 1. t, the next timestep t_prev (0 after the last step) and the intermediate
        # s = floor((1 - gamma) * t_prev), in float32 as torch computes it (a tie at an integer
        # must floor the same way).
        t = int(self.timesteps[step_index])
        t_prev = 0 if last else int(self.timesteps[step_index + 1])
        s = int(np.floor(np.float32(1.0 - self.gamma) * np.float32(t_prev)))
        # 2. alpha_bar at t, t_prev and s.
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev, alpha_prod_s = self.alphas_cumprod[t_prev], self.alphas_cumprod[s]
        # 3. predicted x_0 and the DDIM jump to s along the predicted trajectory.
        pred_original_sample = (x - np.sqrt(1.0 - alpha_prod_t) * eps) / np.sqrt(alpha_prod_t)
        pred_noised_sample = np.sqrt(alpha_prod_s) * pred_original_sample + np.sqrt(1.0 - alpha_prod_s) * eps
        # 4. forward-diffuse s -> t_prev with fresh noise (not after the last step: the result then
        # stays at s = 0, alpha_bar_0, like diffusers).
        if z is None:
            prev_sample = pred_noised_sample
        else:
            ratio = alpha_prod_t_prev / alpha_prod_s
            prev_sample = np.sqrt(ratio) * pred_noised_sample + np.sqrt(1.0 - ratio) * z
        return prev_sample.astype(sample.dtype, copy=False)
