"""Parity of the numpy schedulers in runtime/schedulers with their diffusers twins (needs torch).

Each twin is built the way SD pipelines build it, `DiffusersClass.from_config(sd_config)`. Both
run a whole schedule on the same deterministic fake UNet outputs; timesteps must be equal and
every scale_model_input / prev_sample must agree to atol = 1e-5 * max(1, max|reference|), rtol 0
(Euler latents live in sigma space, ~15 in magnitude at the start).
"""

from __future__ import annotations

from typing import Any

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_module
import numpy as np
import pytest
import torch

from runtime.schedulers import SCHEDULERS, SD15_SCHEDULER, SchedulerConfig, make_scheduler
from runtime.schedulers.base import alphas_cumprod, sigma_table
from runtime.schedulers.dpmpp_2m import _sigma_to_t

pytestmark = pytest.mark.integration  # imports torch and diffusers

SHAPE = (1, 4, 8, 8)

SD15: dict[str, Any] = SD15_SCHEDULER  # the SD 1.5 scheduler_config.json
# The SD 1.5 hub config predates `timestep_spacing`: each diffusers class then uses its own default.
SD15_LEGACY = {k: v for k, v in SD15.items() if k not in ("timestep_spacing", "prediction_type")}
CONFIGS: dict[str, dict[str, Any]] = {
    "sd15": SD15,
    "trailing": {**SD15, "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True},
    "linspace": {**SD15, "timestep_spacing": "linspace", "steps_offset": 0},
    "legacy": SD15_LEGACY,
    # Class defaults (linear betas, DDIM clips x_0 to [-1, 1]) but PLMS, the only PNDM mode here.
    "linear_betas": {
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "skip_prk_steps": True,
    },
}
STEPS = (1, 2, 3, 4, 10, 25, 50)
# 704, 712, 854, ...: Karras timesteps that round the other way unless the beta table carries
# torch's exact float32 roundings.
TIMESTEP_COUNTS = (*range(1, 101), 150, 200, 500, 704, 712, 854, 929, 945, 996, 999, 1000)

TWINS: dict[str, tuple[Any, dict[str, Any]]] = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "pndm": (diffusers.PNDMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        diffusers.DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
}


def _twin(name: str, config: dict[str, Any]) -> Any:
    cls, extra = TWINS[name]
    return cls.from_config(config, **extra)


def _fake_unet(x_in: np.ndarray, t: float, fixed: np.ndarray) -> np.ndarray:
    """Deterministic epsilon depending on both the input and the timestep."""
    return (0.1 * x_in + np.cos(t) * fixed).astype(np.float32)


def _assert_close(actual: np.ndarray, desired: np.ndarray, what: str) -> None:
    atol = 1e-5 * max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=0, atol=atol, err_msg=what)


def test_registry_names() -> None:
    assert SCHEDULERS == ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras")
    assert set(TWINS) == set(SCHEDULERS)


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_matches_diffusers(name: str, config_name: str, n: int, monkeypatch: pytest.MonkeyPatch) -> None:
    config = CONFIGS[config_name]
    ours, theirs = make_scheduler(name, config), _twin(name, config)
    timesteps = ours.set_timesteps(n)
    theirs.set_timesteps(n)
    ref_timesteps = theirs.timesteps.numpy()
    np.testing.assert_array_equal(timesteps, ref_timesteps)
    assert timesteps.dtype == ref_timesteps.dtype
    np.testing.assert_allclose(ours.init_noise_sigma, float(theirs.init_noise_sigma), rtol=1e-6)

    rng = np.random.default_rng(0)
    latent = rng.standard_normal(SHAPE).astype(np.float32)
    fixed = rng.standard_normal(SHAPE).astype(np.float32)
    noises = rng.standard_normal((len(timesteps), *SHAPE)).astype(np.float32)

    # euler_a draws its noise with randn_tensor; hand it the array ours gets at that step.
    current_noise: list[np.ndarray] = []

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> Any:
        assert tuple(shape) == SHAPE
        return torch.from_numpy(current_noise[-1].copy()).to(dtype=dtype)

    monkeypatch.setattr(ea_module, "randn_tensor", fake_randn)

    x = latent * np.float32(ours.init_noise_sigma)
    x_ref = torch.from_numpy(latent) * theirs.init_noise_sigma
    _assert_close(x, x_ref.numpy(), "initial latent")
    for i, t in enumerate(timesteps):
        x_in = ours.scale_model_input(x, i)
        x_in_ref = theirs.scale_model_input(x_ref, theirs.timesteps[i])
        _assert_close(x_in, x_in_ref.numpy(), f"scale_model_input, step {i}")
        eps = _fake_unet(x_in, float(t), fixed)
        current_noise.append(noises[i])
        x = ours.step(eps, i, x, noise=noises[i])
        x_ref = theirs.step(torch.from_numpy(eps), theirs.timesteps[i], x_ref).prev_sample
        assert x.dtype == np.float32 and x.shape == SHAPE
        _assert_close(x, x_ref.numpy(), f"prev_sample, step {i} of {len(timesteps)}")
    if name == "euler_a":
        assert len(current_noise) == len(timesteps)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("name", SCHEDULERS)
def test_timesteps_match_diffusers_for_many_step_counts(name: str, config_name: str) -> None:
    config = CONFIGS[config_name]
    ours, theirs = make_scheduler(name, config), _twin(name, config)
    for n in TIMESTEP_COUNTS:
        if n > ours.max_steps:  # diffusers plans a timestep past its own table there
            with pytest.raises(ValueError, match=rf"must be an int in \[1, {ours.max_steps}\]"):
                ours.set_timesteps(n)
            continue
        theirs.set_timesteps(n)
        got, want = ours.set_timesteps(n), theirs.timesteps.numpy()
        differ = got != want
        if differ.any() and name == "dpmpp_2m_karras":
            # diffusers builds its sigma table with torch's float32 `** 0.5`, which on some CPUs
            # (AVX-512 kernels) is 1 ulp off the exact square root; that ulp decides the rounding of
            # a fractional timestep lying at k + 0.5. Tolerate a difference of 1 only at such a tie.
            frac = _sigma_to_t(ours.sigmas[:-1], np.log(sigma_table(ours.alphas_cumprod).astype(np.float32)))
            tie = np.abs(frac - np.floor(frac) - 0.5) < 1e-5
            assert np.all(np.abs(got - want)[differ] == 1) and np.all(tie[differ]), f"n={n}"
            continue
        np.testing.assert_array_equal(got, want, err_msg=f"n={n}")


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_alphas_cumprod_bit_identical_to_diffusers(config_name: str) -> None:
    config = CONFIGS[config_name]
    ours = alphas_cumprod(SchedulerConfig.from_dict(config))
    np.testing.assert_array_equal(ours, _twin("ddim", config).alphas_cumprod.numpy().astype(np.float64))
