"""Noise-schedule tables, the scheduler config and the `Scheduler` interface.

Every sampler here reproduces what `DiffusersClass.from_config(sd_scheduler_config)` does, so the
UNet sees the same timesteps as under diffusers and the latents agree to float32 round-off.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

BETA_SCHEDULES = ("linear", "scaled_linear")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
PREDICTION_TYPES = ("epsilon",)

# diffusers keys that change the math when set to anything but the value SD 1.x uses. Rejecting
# them beats silently diverging from diffusers; other unknown keys (`_class_name`,
# `use_karras_sigmas`, `solver_order`, ...) are ignored: the registry name picks the sampler.
_REQUIRED_IF_PRESENT: dict[str, Any] = {
    "trained_betas": None,
    "skip_prk_steps": True,  # PNDM is PLMS only; without the key it is PLMS too (unlike diffusers)
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "interpolation_type": "linear",
    "final_sigmas_type": "zero",
    "timestep_type": "discrete",
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "sigma_min": None,
    "sigma_max": None,
    "lambda_min_clipped": -math.inf,
    "euler_at_final": False,
}


# SD 1.5's scheduler_config.json (the PNDM/PLMS defaults): what a preset bundle carries and what the
# schedulers are parity-tested with.
SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "trained_betas": None,
}


@dataclass(frozen=True)
class SchedulerConfig:
    """The subset of a diffusers `scheduler_config.json` these samplers use.

    `None` means "the diffusers default of the sampler's class" (it differs: DDIM/PNDM default
    to "leading" spacing, Euler/DPM to "linspace"; DDIM sets alpha to one and clips x_0, PNDM
    does neither), which matters for old SD configs that lack `timestep_spacing`.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    steps_offset: int = 0
    timestep_spacing: str | None = None
    set_alpha_to_one: bool | None = None
    clip_sample: bool | None = None  # DDIM only; diffusers' DDIM clips x_0 unless told not to
    clip_sample_range: float = 1.0
    prediction_type: str = "epsilon"
    # LCM/TCD only (the others ignore them, as diffusers does); checked by those samplers.
    original_inference_steps: int = 50  # the distillation schedule their timesteps are picked from
    timestep_scaling: float = 10.0  # LCM's boundary-condition scale (c_skip, c_out)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not supported; allowed: {PREDICTION_TYPES}"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(
                f"beta_schedule {self.beta_schedule!r} is not supported; allowed: {BETA_SCHEDULES}"
            )
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"timestep_spacing {self.timestep_spacing!r} is not supported; allowed: {TIMESTEP_SPACINGS}"
            )
        if int(self.num_train_timesteps) < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SchedulerConfig:
        """Build from a diffusers config dict; unknown keys are ignored, harmful ones rejected."""
        for key, required in _REQUIRED_IF_PRESENT.items():
            if key in d and d[key] != required:
                raise ValueError(f"{key}={d[key]!r} is not supported (only {required!r})")
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _linspace_f32(start: float, end: float, n: int) -> npt.NDArray[np.float32]:
    """float32 linspace as torch's CPU kernel computes it (fused start + i * step, the second
    half from the end), so the tables below are bit-identical to diffusers' torch tables."""
    s, e = np.float32(start), np.float32(end)
    step = np.float64((e - s) / np.float32(n - 1))
    i = np.arange(n)
    fused = np.where(i < n // 2, np.float64(s) + step * i, np.float64(e) - step * (n - 1 - i))
    return fused.astype(np.float32)


def betas(config: SchedulerConfig) -> FloatArray:
    """beta_1..beta_T with diffusers' float32 roundings."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        b = _linspace_f32(config.beta_start, config.beta_end, n)
    else:  # scaled_linear: linear in sqrt(beta), the LDM schedule
        root = _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        b = root * root
    return b.astype(np.float64)


def alphas_cumprod(config: SchedulerConfig) -> FloatArray:
    """alpha_bar_t = prod(1 - beta_s), float64 accumulated then float32-rounded like torch.cumprod.

    Kept at float32 values on purpose: Karras timesteps are read off this table and rounded to
    integers, and a float64 table flips some of those roundings against diffusers.
    """
    alphas = (np.float32(1.0) - betas(config).astype(np.float32)).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32).astype(np.float64)


def sigma_table(alphas_cumprod_: FloatArray) -> FloatArray:
    """Karras/VE sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for t = 0..T-1, float32-rounded."""
    ac = alphas_cumprod_.astype(np.float32)
    return np.sqrt((np.float32(1.0) - ac) / ac).astype(np.float64)


def discrete_timesteps(num_inference_steps: int, config: SchedulerConfig, spacing: str) -> IntArray:
    """Descending integer timesteps of DDIM/PNDM ("Common Diffusion Noise Schedules", Table 2)."""
    n, total = num_inference_steps, config.num_train_timesteps
    if spacing == "linspace":
        t: np.ndarray = np.linspace(0, total - 1, n).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(0, n) * (total // n)).round()[::-1] + config.steps_offset
    else:  # trailing
        t = np.round(np.arange(total, 0, -total / n)) - 1
    return np.ascontiguousarray(t).astype(np.int64)


class Scheduler(ABC):
    """A sampler: `set_timesteps` once, then per step `scale_model_input` -> UNet -> `step`.

    The caller passes `step_index` (begin_index..len(timesteps)-1); there is no hidden step
    counter. A run starts at `begin_index`: 0 for text-to-image, part-way for img2img/inpaint
    (`set_begin_index`, then `add_noise` for the start latents). Multistep samplers keep their
    model-output history on the instance, cleared by `set_timesteps`, `set_begin_index` and at
    `step_index == begin_index`, so they must be stepped in order.
    """

    name: ClassVar[str]
    default_spacing: ClassVar[str] = "leading"
    # diffusers class defaults that differ from SchedulerConfig's (DDPM's): used for missing keys.
    config_defaults: ClassVar[Mapping[str, Any]] = {}
    stochastic: ClassVar[bool] = False  # True: `step` needs fresh standard-normal `noise`

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.spacing: str = config.timestep_spacing or self.default_spacing
        self.alphas_cumprod: FloatArray = alphas_cumprod(config)
        self.init_noise_sigma: float = 1.0
        self.timesteps: np.ndarray = np.zeros(0, dtype=np.int64)
        self.begin_index: int = 0

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """Plan the schedule and start runs at step 0; returns the timesteps the UNet sees, in order."""

    def set_begin_index(self, index: int) -> None:
        """Start the next run at step `index` (img2img/inpaint skip the noisiest steps), as diffusers'
        `set_begin_index`: that first step sees no multistep history, whatever ran before."""
        n = len(self.timesteps)
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < n:
            hint = "; call set_timesteps first" if n == 0 else ""
            raise ValueError(f"begin index must be an int in [0, {n}), got {index!r}{hint}")
        self.begin_index = int(index)
        self._reset_history()

    def _reset_history(self) -> None:  # noqa: B027 (a hook: only multistep samplers override it)
        """Forget the multistep history of a run; one-step samplers have none."""

    def add_noise(self, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        """Forward-diffuse clean latents to the noise level of step `step_index`: the img2img start
        latents (at `begin_index`) and an inpaint's re-noised image after each step (at the next
        index). diffusers' `add_noise(original, noise, timesteps[step_index])` in a pipeline."""
        if noise.shape != original.shape:
            raise ValueError(f"noise shape {noise.shape} != original shape {original.shape}")
        n = len(self.timesteps)
        if not 0 <= step_index < n:
            hint = "; call set_timesteps first" if n == 0 else ""
            raise ValueError(f"step_index {step_index} is outside [0, {n}){hint}")
        signal, noise_std = self._noise_scales(step_index)
        noisy = signal * to_f64(original) + noise_std * to_f64(noise)
        return noisy.astype(original.dtype, copy=False)

    def _noise_scales(self, step_index: int) -> tuple[float, float]:
        """(signal, noise) coefficients of `add_noise`; alpha-space samplers (DDIM, PNDM) use
        sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) at the step's integer timestep t."""
        alpha_prod_t = float(self.alphas_cumprod[int(self.timesteps[step_index])])
        return math.sqrt(alpha_prod_t), math.sqrt(1.0 - alpha_prod_t)

    def scale_model_input(self, sample: np.ndarray, step_index: int) -> np.ndarray:
        """Identity for alpha-space samplers (DDIM, PNDM, DPM-Solver)."""
        self._check_index(step_index)
        return sample

    @abstractmethod
    def step(
        self, model_output: np.ndarray, step_index: int, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """One denoising step: x_t -> x_{t-1} given the UNet's epsilon; returns prev_sample."""

    @property
    def max_steps(self) -> int:
        """The most inference steps this config allows. "leading" spacing shifts every timestep by
        `steps_offset`, so at one step per training timestep the first would be past the table
        (SD 1.5: 1000 steps would ask for timestep 1000 of 0..999; diffusers fails there too)."""
        total = self.config.num_train_timesteps
        return total - self.config.steps_offset if self.spacing == "leading" else total

    def _check_steps(self, num_inference_steps: int) -> int:
        n, most = num_inference_steps, self.max_steps
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= most:
            raise ValueError(f"num_inference_steps must be an int in [1, {most}], got {n!r}")
        return int(n)

    def _check_index(self, step_index: int) -> None:
        """Steps before `begin_index` are not part of the run (their noise level was skipped)."""
        begin, n = self.begin_index, len(self.timesteps)
        if not begin <= step_index < n:
            hint = "; call set_timesteps first" if n == 0 else ""
            raise IndexError(
                f"step_index {step_index} is outside [{begin}, {n}) (begin index to end of schedule){hint}"
            )


class MultistepState:
    """Guard for samplers with a history: a run's steps come in order begin, begin + 1, ..."""

    def __init__(self, begin: int = 0) -> None:
        self.begin = begin
        self.last_index: int | None = None

    def advance(self, step_index: int) -> bool:
        """Record `step_index`; returns True when the history must be cleared (a new run)."""
        in_order = self.last_index is not None and step_index == self.last_index + 1
        if step_index != self.begin and not in_order:
            raise ValueError(
                f"step_index {step_index} out of order (last was {self.last_index}); multistep "
                f"samplers must be stepped {self.begin}, {self.begin + 1}, ... from the begin index"
            )
        self.last_index = step_index
        return step_index == self.begin


def to_f64(x: np.ndarray) -> FloatArray:
    return np.asarray(x, dtype=np.float64)
