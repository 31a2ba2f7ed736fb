"""DPM-Solver++(2M) (Lu et al., 2022, Algorithm 2): second-order multistep on the data
prediction x_0 in log-SNR time lambda; first order on the first and the last step."""

from __future__ import annotations

import math

import numpy as np

from .base import FloatArray, MultistepState, Scheduler, SchedulerConfig, sigma_table, to_f64


def _alpha_sigma(sigma: float) -> tuple[float, float]:
    """VE sigma -> VP (alpha_t, sigma_t) with alpha_t^2 + sigma_t^2 = 1."""
    alpha_t = 1.0 / math.sqrt(sigma**2 + 1.0)
    return alpha_t, sigma * alpha_t


def _lambda(sigma: float) -> float:
    """lambda_t = log(alpha_t / sigma_t) = -log(sigma); +inf at sigma = 0 (the clean end)."""
    return math.inf if sigma == 0.0 else -math.log(sigma)


def _sigma_to_t(sigmas: FloatArray, log_table: FloatArray) -> FloatArray:
    """Fractional timestep of each sigma by linear interpolation in log-sigma (diffusers' rule)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    low = np.clip(np.searchsorted(log_table, log_sigma, side="right") - 1, 0, len(log_table) - 2)
    w = np.clip((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1]), 0.0, 1.0)
    return (1.0 - w) * low + w * (low + 1)


class DPMSolverPP2MScheduler(Scheduler):
    """Matches diffusers `DPMSolverMultistepScheduler` (dpmsolver++, order 2, midpoint,
    lower_order_final, final sigma 0).

    History (instance state, cleared by `set_timesteps`, `set_begin_index` and at the begin
    index): `model_outputs`, the x_0 predictions of the previous and the current step.
    """

    name = "dpmpp_2m"
    default_spacing = "linspace"
    use_karras_sigmas = False

    sigmas: FloatArray

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self._reset_history()

    def _reset_history(self) -> None:
        self.model_outputs: list[FloatArray] = []
        self._order = MultistepState(self.begin_index)

    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        n = self._check_steps(num_inference_steps)
        table = sigma_table(self.alphas_cumprod)
        if self.use_karras_sigmas:
            # Karras et al. eq. 5, rho = 7, sigma_max -> sigma_min; t read back off the table.
            rho = 7.0
            ramp = np.linspace(0.0, 1.0, n)
            max_inv_rho, min_inv_rho = table[-1] ** (1 / rho), table[0] ** (1 / rho)
            sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
            timesteps = _sigma_to_t(sigmas, np.log(table.astype(np.float32))).round().astype(np.int64)
        else:
            timesteps = self._spaced_timesteps(n)
            sigmas = np.interp(timesteps, np.arange(len(table)), table)
        self.timesteps = timesteps
        self.sigmas = np.concatenate([sigmas, [0.0]])
        self.set_begin_index(0)
        return self.timesteps.copy()

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """diffusers' DPM spacing: n + 1 points with the t = 0 end dropped (not DDIM's)."""
        total = self.config.num_train_timesteps
        if self.spacing == "linspace":
            t: np.ndarray = np.linspace(0, total - 1, n + 1).round()[::-1][:-1]
        elif self.spacing == "leading":
            t = (np.arange(0, n + 1) * (total // (n + 1))).round()[::-1][:-1] + self.config.steps_offset
        else:  # trailing
            t = np.arange(total, 0, -total / n).round() - 1
        return np.ascontiguousarray(t).astype(np.int64)

    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """`noise` is unused (deterministic ODE solver)."""
        self._check_index(step_index)
        if self._order.advance(step_index):
            self.model_outputs = []
        x, eps = to_f64(sample), to_f64(model_output)
        # 1. sigma_s0 (current), sigma_t (next) as VP alpha/sigma pairs and log-SNRs lambda.
        alpha_s0, sigma_s0 = _alpha_sigma(self.sigmas[step_index])
        alpha_t, sigma_t = _alpha_sigma(self.sigmas[step_index + 1])
        lambda_s0, lambda_t = _lambda(self.sigmas[step_index]), _lambda(self.sigmas[step_index + 1])
        h = lambda_t - lambda_s0
        # 2. data prediction x_0 = (x - sigma_s0 * eps) / alpha_s0 (the "++"), kept as history.
        m0 = (x - sigma_s0 * eps) / alpha_s0
        self.model_outputs = [*self.model_outputs[-1:], m0]
        # 3. first order on the run's first step (no history, also from a begin index > 0) and on
        # the last (lower_order_final, sigma -> 0).
        phi = math.expm1(-h)  # e^{-h} - 1; -1 at the last step where h = +inf
        last = step_index == len(self.timesteps) - 1
        if step_index == self.begin_index or last:
            prev_sample = (sigma_t / sigma_s0) * x - alpha_t * phi * m0
        # 4. otherwise second order: D1 = (m0 - m1) / r0 with r0 = h_0 / h (midpoint form).
        else:
            m1 = self.model_outputs[-2]
            lambda_s1 = _lambda(self.sigmas[step_index - 1])
            r0 = (lambda_s0 - lambda_s1) / h
            d0, d1 = m0, (m0 - m1) / r0
            prev_sample = (sigma_t / sigma_s0) * x - alpha_t * phi * d0 - 0.5 * alpha_t * phi * d1
        return prev_sample.astype(sample.dtype, copy=False)

    def _noise_scales(self, step_index: int) -> tuple[float, float]:
        """(alpha_t, sigma_t) of the step's sigma: DPM-Solver latents live in VP (alpha) space."""
        return _alpha_sigma(float(self.sigmas[step_index]))


class DPMSolverPP2MKarrasScheduler(DPMSolverPP2MScheduler):
    """DPM-Solver++(2M) on Karras sigmas (diffusers `use_karras_sigmas=True`); spacing is unused."""

    name = "dpmpp_2m_karras"
    use_karras_sigmas = True
