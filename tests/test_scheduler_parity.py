"""Parity of the numpy schedulers in runtime/schedulers with their diffusers twins (needs torch).

Each twin is built the way SD pipelines build it, `DiffusersClass.from_config(sd_config)`. Both
run a whole schedule on the same deterministic fake UNet outputs; timesteps must be equal and
every scale_model_input / prev_sample must agree to atol = 1e-5 * max(1, max|reference|), rtol 0
(Euler latents live in sigma space, ~15 in magnitude at the start). The img2img/inpaint runs start
part-way, the way diffusers' pipelines drive the twin (begin index, add_noise, re-noising).
"""

from __future__ import annotations

from typing import Any

import diffusers
import diffusers.schedulers.scheduling_euler_ancestral_discrete as ea_module
import diffusers.schedulers.scheduling_lcm as lcm_module
import diffusers.schedulers.scheduling_tcd as tcd_module
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
STEPS = (1, 2, 3, 4, 8, 10, 25, 50)  # LCM/TCD's 50 is their max (original_inference_steps)
# (num_inference_steps, strength) of img2img/inpaint runs: t_start 0, 1, 3, 4, 7, 9 (one step left),
# 10 of 25, a one-step schedule, and 2 of 4 (a typical LCM run).
IMG2IMG_RUNS = (
    (10, 1.0), (10, 0.9), (10, 0.75), (7, 0.5), (10, 0.3), (10, 0.1), (25, 0.6), (1, 1.0), (4, 0.5),
)  # fmt: skip
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
    "lcm": (diffusers.LCMScheduler, {}),
    "tcd": (diffusers.TCDScheduler, {}),  # stepped with step()'s default eta (gamma) = 0.3
}
STOCHASTIC = {"euler_a": ea_module, "lcm": lcm_module, "tcd": tcd_module}  # module of each randn_tensor


def _twin(name: str, config: dict[str, Any]) -> Any:
    cls, extra = TWINS[name]
    return cls.from_config(config, **extra)


def _fake_unet(x_in: np.ndarray, t: float, fixed: np.ndarray) -> np.ndarray:
    """Deterministic epsilon depending on both the input and the timestep."""
    return (0.1 * x_in + np.cos(t) * fixed).astype(np.float32)


def _assert_close(actual: np.ndarray, desired: np.ndarray, what: str) -> None:
    atol = 1e-5 * max(1.0, float(np.abs(desired).max()))
    np.testing.assert_allclose(actual, desired, rtol=0, atol=atol, err_msg=what)


def _feed_noise(monkeypatch: pytest.MonkeyPatch) -> list[np.ndarray]:
    """euler_a, LCM and TCD draw their noise with randn_tensor; append the array ours gets at a step
    to the returned list before stepping the twin, and the twin draws that array."""
    current_noise: list[np.ndarray] = []

    def fake_randn(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> Any:
        assert tuple(shape) == SHAPE
        return torch.from_numpy(current_noise[-1].copy()).to(dtype=dtype)

    for module in STOCHASTIC.values():
        monkeypatch.setattr(module, "randn_tensor", fake_randn)
    return current_noise


def test_registry_names() -> None:
    assert SCHEDULERS == ("ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm", "tcd")
    assert set(TWINS) == set(SCHEDULERS)
    assert {name for name in SCHEDULERS if make_scheduler(name, SD15).stochastic} == set(STOCHASTIC)


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

    current_noise = _feed_noise(monkeypatch)

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


@pytest.mark.parametrize(("n", "strength"), IMG2IMG_RUNS)
@pytest.mark.parametrize("config_name", ["sd15", "trailing"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_img2img_and_inpaint_match_diffusers(
    name: str, config_name: str, n: int, strength: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 4-channel inpaint loop of diffusers' pipelines, step by step (img2img is the same loop
    without the re-noising and the mask): start part-way at t_start * order, add_noise the image
    latents to the first timestep, and after each step but the last re-noise them to the next."""
    config = CONFIGS[config_name]
    ours, theirs = make_scheduler(name, config), _twin(name, config)
    ours.set_timesteps(n)
    theirs.set_timesteps(n)
    # StableDiffusionImg2ImgPipeline.get_timesteps (the inpaint pipeline's is the same).
    t_start = max(n - min(int(n * strength), n), 0)
    begin = t_start * theirs.order
    timesteps = theirs.timesteps[begin:]
    if hasattr(theirs, "set_begin_index"):  # DDIM keeps no step index; PNDM's counter starts at 0
        theirs.set_begin_index(begin)
    ours.set_begin_index(begin)
    np.testing.assert_array_equal(ours.timesteps[begin:], timesteps.numpy())

    rng = np.random.default_rng(0)
    image = rng.standard_normal(SHAPE).astype(np.float32)  # clean image latents
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    fixed = rng.standard_normal(SHAPE).astype(np.float32)
    mask = (rng.random(SHAPE[-2:]) < 0.5).astype(np.float32)  # 1 = repaint
    step_noises = rng.standard_normal((len(timesteps), *SHAPE)).astype(np.float32)
    image_ref, noise_ref, mask_ref = torch.from_numpy(image), torch.from_numpy(noise), torch.from_numpy(mask)
    current_noise = _feed_noise(monkeypatch)

    x = ours.add_noise(image, noise, begin)
    x_ref = theirs.add_noise(image_ref, noise_ref, timesteps[:1])
    assert x.dtype == np.float32 and x.shape == SHAPE
    _assert_close(x, x_ref.numpy(), f"start latents at begin index {begin}")
    for i, t in enumerate(timesteps):
        step_index = begin + i
        x_in = ours.scale_model_input(x, step_index)
        x_in_ref = theirs.scale_model_input(x_ref, t)
        _assert_close(x_in, x_in_ref.numpy(), f"scale_model_input, step {step_index}")
        eps = _fake_unet(x_in, float(t), fixed)
        current_noise.append(step_noises[i])
        x = ours.step(eps, step_index, x, noise=step_noises[i])
        x_ref = theirs.step(torch.from_numpy(eps), t, x_ref).prev_sample
        _assert_close(
            x, x_ref.numpy(), f"prev_sample, step {step_index} (begin {begin} of {len(ours.timesteps)})"
        )
        if i < len(timesteps) - 1:
            known = ours.add_noise(image, noise, step_index + 1)
            known_ref = theirs.add_noise(image_ref, noise_ref, torch.tensor([timesteps[i + 1]]))
            assert known.dtype == np.float32
            _assert_close(known, known_ref.numpy(), f"re-noised image after step {step_index}")
            x = (1 - mask) * known + mask * x
            x_ref = (1 - mask_ref) * known_ref + mask_ref * x_ref


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


# LCM/TCD config keys of their own, their class defaults (no keys at all: LDM betas, not DDPM's),
# and clipping (LCM only; TCD ignores it, as diffusers does).
CONSISTENCY_CONFIGS: dict[str, dict[str, Any]] = {
    "original_4": {**SD15, "original_inference_steps": 4},
    "original_8": {**SD15, "original_inference_steps": 8},
    "original_25": {**SD15, "original_inference_steps": 25},
    "original_100": {**SD15, "original_inference_steps": 100},
    "original_1000": {**SD15, "original_inference_steps": 1000},
    "scaling_5": {**SD15, "timestep_scaling": 5.0},
    "clip": {**SD15, "clip_sample": True, "clip_sample_range": 0.5},
    "class_defaults": {},
}


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("config_name", list(CONSISTENCY_CONFIGS))
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_consistency_samplers_config_keys_match_diffusers(
    name: str, config_name: str, n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A whole schedule under each config; the twin draws noise on every step but the last."""
    config = CONSISTENCY_CONFIGS[config_name]
    ours, theirs = make_scheduler(name, config), _twin(name, config)
    n = min(n, ours.max_steps)
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy().astype(np.float64))
    timesteps = ours.set_timesteps(n)
    theirs.set_timesteps(n)
    np.testing.assert_array_equal(timesteps, theirs.timesteps.numpy())
    rng = np.random.default_rng(3)
    x = rng.standard_normal(SHAPE).astype(np.float32)
    fixed = 3 * rng.standard_normal(SHAPE).astype(np.float32)  # x_0 beyond the clip range
    x_ref = torch.from_numpy(x)
    current_noise = _feed_noise(monkeypatch)
    module = STOCHASTIC[name]
    fed = module.randn_tensor
    draws: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        draws.append(len(current_noise) - 1)  # the step it is drawn at
        return fed(*args, **kwargs)

    monkeypatch.setattr(module, "randn_tensor", counted)
    for i, t in enumerate(timesteps):
        eps = _fake_unet(x, float(t), fixed)
        noise = rng.standard_normal(SHAPE).astype(np.float32)
        current_noise.append(noise)
        x = ours.step(eps, i, x, noise=noise if i < n - 1 else None)  # no noise needed last
        x_ref = theirs.step(torch.from_numpy(eps), theirs.timesteps[i], x_ref).prev_sample
        _assert_close(x, x_ref.numpy(), f"prev_sample, step {i} of {n}")
    assert draws == list(range(n - 1))


@pytest.mark.parametrize("original_steps", [1, 4, 50, 999, 1000])
@pytest.mark.parametrize("name", ["lcm", "tcd"])
def test_consistency_step_limit_is_diffusers_rule(name: str, original_steps: int) -> None:
    """max_steps = original_inference_steps: diffusers plans every count up to it (ours: the same
    timesteps) and refuses the next one."""
    config = {**SD15, "original_inference_steps": original_steps}
    ours, theirs = make_scheduler(name, config), _twin(name, config)
    assert ours.max_steps == original_steps
    counts = {1, 2, 3, 4, 8, original_steps // 2, original_steps - 1, original_steps}
    for n in sorted(c for c in counts if 1 <= c <= original_steps):
        theirs.set_timesteps(n)
        np.testing.assert_array_equal(ours.set_timesteps(n), theirs.timesteps.numpy(), err_msg=f"n={n}")
    with pytest.raises(ValueError, match="num_inference_steps"):
        theirs.set_timesteps(original_steps + 1)
    limit = rf"\[1, {original_steps}\].*original_inference_steps={original_steps}"
    with pytest.raises(ValueError, match=limit):
        ours.set_timesteps(original_steps + 1)
