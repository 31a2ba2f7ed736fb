"""Where the UNet loop starts: pure noise (txt2img), or the init image's latents noised to the
timestep the strength picks (img2img, inpainting), plus what inpainting adds to every step.

Follows diffusers' StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline step by step.
Each image draws from its own generator in diffusers' order, so a test can feed both pipelines
the same numbers: the init image's latent sample (when its latents are used), the start noise,
the masked image's latent sample (inpainting; drawn even when a standard UNet does not read it),
then the sampler's per-step noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.backends.base import Backend
from runtime.init_image import to_unit
from runtime.options import ResolvedOptions
from runtime.schedulers.base import Scheduler
from runtime.vae import encode


def begin_index(steps: int, strength: float) -> int:
    """diffusers' rule: of `steps` planned steps, the last int(steps x strength) run."""
    return steps - min(int(steps * strength), steps)


@dataclass(frozen=True)
class Blend:
    """Inpainting by latent blending: after each step, the area outside the mask is replaced by the
    init image's latents re-noised to the next step's level (clean after the last step)."""

    image_latents: np.ndarray  # (N, 4, h, w)
    noise: np.ndarray  # (N, 4, h, w): the start noise
    mask: np.ndarray  # (1, 1, h, w): 1 = repaint

    def rows(self, rows: slice) -> Blend:
        return Blend(self.image_latents[rows], self.noise[rows], self.mask)

    def __call__(self, scheduler: Scheduler, latents: np.ndarray, step_index: int) -> np.ndarray:
        kept = self.image_latents
        if step_index + 1 < len(scheduler.timesteps):
            kept = scheduler.add_noise(kept, self.noise, step_index + 1)
        return (1 - self.mask) * kept + self.mask * latents


@dataclass(frozen=True)
class Start:
    latents: np.ndarray  # (N, 4, h, w), the input of step `begin`
    begin: int = 0  # index into the scheduler's timesteps of the first step to run
    conditioning: np.ndarray | None = None  # (N, 5, h, w) mask + masked-image latents: inpainting UNets
    blend: Blend | None = None

    def rows(self, rows: slice) -> Start:
        return Start(
            self.latents[rows],
            self.begin,
            None if self.conditioning is None else self.conditioning[rows],
            None if self.blend is None else self.blend.rows(rows),
        )


def _samples(mean: np.ndarray, std: np.ndarray, rngs: list[np.random.Generator]) -> np.ndarray:
    """One latent per image, mean + std · noise with that image's generator (diffusers' `sample`)."""
    return np.stack(
        [mean[0] + std[0] * rng.standard_normal(mean.shape[1:], dtype=np.float32) for rng in rngs]
    )


def start(
    backend: Backend,
    scheduler: Scheduler,
    o: ResolvedOptions,
    rngs: list[np.random.Generator],
    latent_channels: int,
    vae_scale_factor: int,
    inpainting_unet: bool,
) -> Start:
    """The loop's start for every image of `o`; `scheduler` has its timesteps set, and gets its
    begin index set here."""
    if o.init_image is None:
        noise = o.initial_latents(latent_channels, vae_scale_factor, rngs)
        return Start(noise * np.float32(scheduler.init_noise_sigma))
    assert o.strength is not None, "validate sets strength with init_image"
    begin = begin_index(o.steps, o.strength)
    scheduler.set_begin_index(begin)
    image = to_unit(o.init_image)
    inpaint, full_strength = o.mask is not None, o.strength == 1.0
    uses_image_latents = not inpaint or o.mask_mode == "blend" or not full_strength
    image_latents = _samples(*encode(backend, image), rngs) if uses_image_latents else None
    noise = o.initial_latents(latent_channels, vae_scale_factor, rngs)
    if inpaint and full_strength:  # the inpainting pipeline starts from pure noise at strength 1
        latents = noise * np.float32(scheduler.init_noise_sigma)
    else:
        assert image_latents is not None
        latents = scheduler.add_noise(image_latents, noise, begin)
    if o.mask is None:
        return Start(latents, begin)
    mask = o.mask[::vae_scale_factor, ::vae_scale_factor][None, None]  # nearest, as F.interpolate
    conditioning = None
    if inpainting_unet:
        masked_image = np.where(o.mask < 0.5, image, np.float32(0.5))  # 0.5: zero in the VAE's [-1, 1]
        masked_latents = _samples(*encode(backend, masked_image), rngs)
        conditioning = np.concatenate([np.repeat(mask, len(rngs), axis=0), masked_latents], axis=1)
    else:
        for rng in rngs:  # diffusers samples the masked image's latents here even when unused
            rng.standard_normal(latents.shape[1:], dtype=np.float32)
    blend = None
    if o.mask_mode == "blend":
        assert image_latents is not None
        blend = Blend(image_latents, noise, mask)
    return Start(latents, begin, conditioning, blend)
