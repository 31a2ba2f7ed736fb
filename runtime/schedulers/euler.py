"""Euler method on the probability-flow ODE in sigma space (Karras et al., 2022, Algorithm 2
with churn 0); latents live at scale sigma, so the UNet input is scaled back to unit variance."""

from __future__ import annotations

import numpy as np

from .base import FloatArray, Scheduler, discrete_timesteps, sigma_table, to_f64


class EulerDiscreteScheduler(Scheduler):
    """Matches diffusers `EulerDiscreteScheduler` (linear interpolation, final sigma 0)."""

    name = "euler"
    default_spacing = "linspace"

    sigmas: FloatArray

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = self._check_steps(num_inference_steps)
        if self.spacing == "linspace":  # fractional timesteps, not rounded (unlike DDIM)
            timesteps = np.linspace(0, self.config.num_train_timesteps - 1, n, dtype=np.float32)[::-1]
        else:
            timesteps = discrete_timesteps(n, self.config, self.spacing).astype(np.float32)
        self.timesteps = np.ascontiguousarray(timesteps)
        table = sigma_table(self.alphas_cumprod)
        sigmas = np.interp(self.timesteps, np.arange(len(table)), table)
        self.sigmas = np.concatenate([sigmas, [0.0]])
        # Start noise std: diffusers' rule, sigma_max, or sqrt(sigma_max^2 + 1) for "leading".
        sigma_max = float(self.sigmas.max())
        trailing_like = self.spacing in ("linspace", "trailing")
        self.init_noise_sigma = sigma_max if trailing_like else float(np.sqrt(sigma_max**2 + 1.0))
        self.set_begin_index(0)
        return self.timesteps.copy()

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """x / sqrt(sigma^2 + 1): the UNet was trained on alpha-space inputs of unit variance."""
        self._check_index(step_index)
        sigma = self.sigmas[step_index]
        return (to_f64(sample) / np.sqrt(sigma**2 + 1.0)).astype(sample.dtype, copy=False)

    def _noise_scales(self, step_index: int) -> tuple[float, float]:
        """x_0 + sigma * noise: sigma-space latents carry unscaled signal. The sigma is the step's
        own (diffusers picks it by begin/step index, not by looking the timestep up)."""
        return 1.0, float(self.sigmas[step_index])

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """`noise` is unused (deterministic; churn = 0)."""
        self._check_index(step_index)
        x, eps = to_f64(sample), to_f64(model_output)
        # 1. sigma (current) and sigma_next.
        sigma, sigma_next = self.sigmas[step_index], self.sigmas[step_index + 1]
        # 2. denoised x_0 = x - sigma * eps.
        pred_original_sample = x - sigma * eps
        # 3. derivative d = (x - x_0) / sigma of the ODE dx/dsigma.
        derivative = (x - pred_original_sample) / sigma
        # 4. Euler step over dt = sigma_next - sigma.
        dt = sigma_next - sigma
        prev_sample = x + derivative * dt
        return prev_sample.astype(sample.dtype, copy=False)
