"""PNDM's PLMS sampler (Liu et al., 2022), as SD runs it (diffusers `skip_prk_steps=True`).

A 4th-order linear multistep on epsilon; the Runge-Kutta warm-up is replaced by a repeated
second timestep, so `set_timesteps(n)` returns n + 1 timesteps (1 for n = 1).
"""

from __future__ import annotations

import numpy as np

from .base import FloatArray, MultistepState, Scheduler, SchedulerConfig, discrete_timesteps, to_f64


class PNDMScheduler(Scheduler):
    """Matches diffusers `PNDMScheduler(skip_prk_steps=True)`.

    History (instance state, cleared by `set_timesteps`, `set_begin_index` and at the begin
    index): `ets`, the last four epsilons, and `cur_sample`, the x_t of a run's first step that
    its second step restarts from. Like diffusers' PLMS counter, "first" and "second" count from
    the begin index: an img2img run is a PLMS run of its own on the tail of the timesteps.
    """

    name = "pndm"
    default_spacing = "leading"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        to_one = False if config.set_alpha_to_one is None else config.set_alpha_to_one
        self.final_alpha_cumprod = 1.0 if to_one else float(self.alphas_cumprod[0])
        self._step_ratio = 0
        self._reset_history()

    def _reset_history(self) -> None:
        self.ets: list[FloatArray] = []
        self.cur_sample: FloatArray | None = None
        self._order = MultistepState(self.begin_index)

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = self._check_steps(num_inference_steps)
        ascending = discrete_timesteps(n, self.config, self.spacing)[::-1]
        # PLMS schedule: ..., t_1, t_1, t_0 reversed, i.e. the second timestep is visited twice.
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        self.timesteps = np.ascontiguousarray(plms).astype(np.int64)
        self._step_ratio = self.config.num_train_timesteps // n
        self.set_begin_index(0)
        return self.timesteps.copy()

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """`noise` is unused (deterministic)."""
        self._check_index(step_index)
        if self._order.advance(step_index):
            self.ets, self.cur_sample = [], None
        x_t, eps = to_f64(sample), to_f64(model_output)
        counter = step_index - self.begin_index  # diffusers' PLMS counter: 0 on the run's first step
        # 1. t and t_prev = t - T // n.
        t = int(self.timesteps[step_index])
        t_prev = t - self._step_ratio
        # 2. The second step redoes the first one's interval (t + T//n -> t) from the first step's
        # x_t; the others record eps.
        if counter == 1:
            t_prev, t = t, t + self._step_ratio
        else:
            self.ets = [*self.ets[-3:], eps]
        # 3. eps' = Adams-Bashforth combination of the recorded epsilons (order grows to 4).
        if counter == 0:
            eps_prime = eps
            self.cur_sample = x_t
        elif counter == 1:
            assert self.cur_sample is not None
            eps_prime = (eps + self.ets[-1]) / 2
            x_t, self.cur_sample = self.cur_sample, None
        elif len(self.ets) == 2:
            eps_prime = (3 * self.ets[-1] - self.ets[-2]) / 2
        elif len(self.ets) == 3:
            eps_prime = (23 * self.ets[-1] - 16 * self.ets[-2] + 5 * self.ets[-3]) / 12
        else:
            eps_prime = (55 * self.ets[-1] - 59 * self.ets[-2] + 37 * self.ets[-3] - 9 * self.ets[-4]) / 24
        # 4. x_{t_prev} by the transfer phi (PNDM eq. 11).
        prev_sample = self._transfer(x_t, t, t_prev, eps_prime)
        return prev_sample.astype(sample.dtype, copy=False)

    def _transfer(self, x_t: FloatArray, t: int, t_prev: int, eps: FloatArray) -> FloatArray:
        """phi(x_t, eps, t, t_prev): the DDIM step written as PNDM's eq. 11."""
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        beta_prod_t, beta_prod_t_prev = 1.0 - alpha_prod_t, 1.0 - alpha_prod_t_prev
        sample_coeff = np.sqrt(alpha_prod_t_prev / alpha_prod_t)
        eps_denom = alpha_prod_t * np.sqrt(beta_prod_t_prev) + np.sqrt(
            alpha_prod_t * beta_prod_t * alpha_prod_t_prev
        )
        return sample_coeff * x_t - (alpha_prod_t_prev - alpha_prod_t) * eps / eps_denom
