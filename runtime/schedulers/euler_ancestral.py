"""Ancestral Euler (k-diffusion `sample_euler_ancestral`, eta = 1): an Euler step down to
sigma_down, then fresh noise of std sigma_up, so sigma_down^2 + sigma_up^2 = sigma_next^2."""

from __future__ import annotations

import numpy as np

from .base import to_f64
from .euler import EulerDiscreteScheduler


class EulerAncestralDiscreteScheduler(EulerDiscreteScheduler):
    """Matches diffusers `EulerAncestralDiscreteScheduler`; the caller supplies the noise."""

    name = "euler_a"
    stochastic = True

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """`noise`: standard normal, same shape as `sample` (randomness is the caller's)."""
        if noise is None:
            raise ValueError("euler_a needs `noise` (standard normal, shape of sample) at every step")
        if noise.shape != sample.shape:
            raise ValueError(f"noise shape {noise.shape} != sample shape {sample.shape}")
        self._check_index(step_index)
        x, eps = to_f64(sample), to_f64(model_output)
        # 1. sigma_from (current) and sigma_to (next).
        sigma_from, sigma_to = self.sigmas[step_index], self.sigmas[step_index + 1]
        # 2. denoised x_0 = x - sigma * eps.
        pred_original_sample = x - sigma_from * eps
        # 3. split sigma_to into the deterministic part sigma_down and the noise part sigma_up.
        sigma_up = np.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
        sigma_down = np.sqrt(max(sigma_to**2 - sigma_up**2, 0.0))
        # 4. Euler step to sigma_down with d = (x - x_0) / sigma.
        derivative = (x - pred_original_sample) / sigma_from
        prev_sample = x + derivative * (sigma_down - sigma_from)
        # 5. add noise of std sigma_up.
        prev_sample = prev_sample + to_f64(noise) * sigma_up
        return prev_sample.astype(sample.dtype, copy=False)
