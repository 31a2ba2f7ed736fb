"""DDIM (Song et al., 2020) with eta = 0: deterministic, one UNet call per step."""

from __future__ import annotations

import numpy as np

from .base import Scheduler, SchedulerConfig, discrete_timesteps, to_f64


class DDIMScheduler(Scheduler):
    """Matches diffusers `DDIMScheduler` (eta = 0, epsilon prediction)."""

    name = "ddim"
    default_spacing = "leading"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        # Past the last step there is no alpha_bar; SD configs reuse alpha_bar_0 instead of 1.
        to_one = True if config.set_alpha_to_one is None else config.set_alpha_to_one
        self.final_alpha_cumprod = 1.0 if to_one else float(self.alphas_cumprod[0])
        # SD configs say clip_sample=false; a config without the key gets diffusers' default (clip).
        self.clip_range = None if config.clip_sample is False else config.clip_sample_range
        self._step_ratio = 0

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = self._check_steps(num_inference_steps)
        self.timesteps = discrete_timesteps(n, self.config, self.spacing)
        self._step_ratio = self.config.num_train_timesteps // n
        self.set_begin_index(0)
        return self.timesteps.copy()

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """`noise` is unused (eta = 0)."""
        self._check_index(step_index)
        x_t, eps = to_f64(sample), to_f64(model_output)
        # 1. t and t_prev; diffusers always steps back by T // n, whatever the spacing.
        t = int(self.timesteps[step_index])
        t_prev = t - self._step_ratio
        # 2. alpha_prod_t, alpha_prod_t_prev (cumulative alphas) and beta_prod_t.
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        beta_prod_t = 1.0 - alpha_prod_t
        # 3. predicted x_0 (eq. 12, "predicted x_0").
        pred_original_sample = (x_t - np.sqrt(beta_prod_t) * eps) / np.sqrt(alpha_prod_t)
        if self.clip_range is not None:
            pred_original_sample = np.clip(pred_original_sample, -self.clip_range, self.clip_range)
        # 4. direction pointing to x_t (eq. 12, sigma_t = 0).
        pred_sample_direction = np.sqrt(1.0 - alpha_prod_t_prev) * eps
        # 5. x_{t-1} = sqrt(alpha_prod_t_prev) * x_0 + direction.
        prev_sample = np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction
        return prev_sample.astype(sample.dtype, copy=False)
