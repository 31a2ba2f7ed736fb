"""The PyTorch reference of UPainting-style CLIP guidance: the parity oracle of runtime/clip_guidance.py.

Pass 1 is `ReferencePipeline.generate` (diffusers' StableDiffusionPipeline, plain CFG) stopped at its
final latent x̂₀. Pass 2 is diffusers' text-to-image loop written out, from the same latents and
generator, with the correction between CFG and `scheduler.step`, the gradient by torch autograd
(export/clip_guidance.py's ClipGuidanceGradient):

    c = sqrt(1 - ᾱ_t),  x_in = c · x̂₀ - (1 - c) · x_t,  ε' = ε_cfg - scale · c · ∇ cos(f(x_in), g)

with ᾱ_t the scheduler's alphas_cumprod at t (interpolated for fractional t) and x_t the UNet's
input (`scale_model_input` of the latents), from step `skip` on. Scale 0 is `generate` itself.
Text-to-image only; the schedulers are the reference's (every runtime one but TCD).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from export.clip_guidance import ClipGuidanceGradient
from export.reference import ReferencePipeline, diffusers_scheduler
from runtime.clip_guidance import resize_matrices
from runtime.guidance import one_based


def _alpha_bar(scheduler: Any, t: torch.Tensor) -> float:
    table = scheduler.alphas_cumprod.double().numpy()
    return float(np.interp(float(t), np.arange(len(table)), table))


@dataclass(frozen=True)
class Sampling:
    """What both passes sample with: `ReferencePipeline.generate`'s settings besides the prompts."""

    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    height: int = 512
    width: int = 512
    scheduler: str = "pndm"
    latents: torch.Tensor | None = None
    cfg_convention: str = "1-based"

    def generate(self, ref: ReferencePipeline, prompt: str, negative_prompt: str, output_type: str) -> Any:
        return ref.generate(
            prompt, negative_prompt, steps=self.steps, guidance=self.guidance, seed=self.seed,
            height=self.height, width=self.width, scheduler=self.scheduler, latents=self.latents,
            cfg_convention=self.cfg_convention, output_type=output_type,
        )  # fmt: skip


@torch.no_grad()
def clip_guided(
    ref: ReferencePipeline,
    prompt: str,
    negative_prompt: str = "",
    *,
    clip_guidance: float,
    clip_guidance_skip: int = 10,
    sampling: Sampling,
) -> np.ndarray:
    """Images as float (1, H, W, 3) in [0, 1]; `clip_guidance` 0 is plain CFG (`generate`)."""
    if clip_guidance == 0:
        images: np.ndarray = sampling.generate(ref, prompt, negative_prompt, "np")
        return images
    x0 = sampling.generate(ref, prompt, negative_prompt, "latent")  # pass 1: x̂₀
    return second_pass(ref, prompt, negative_prompt, x0, clip_guidance, clip_guidance_skip, sampling)


@torch.no_grad()
def second_pass(
    ref: ReferencePipeline,
    prompt: str,
    negative_prompt: str,
    x0: torch.Tensor,
    scale: float,
    skip: int,
    sampling: Sampling,
) -> np.ndarray:
    """diffusers' StableDiffusionPipeline loop, step for step, with the correction (scale 0: none)."""
    c = ref.components
    if c.vision is None or c.text_projection is None:
        raise ValueError("CLIP guidance needs CLIP's image tower and text projection")
    sched = diffusers_scheduler(sampling.scheduler, c.scheduler_config)
    sched.set_timesteps(sampling.steps)
    cfg = one_based(sampling.guidance, sampling.cfg_convention)
    encoded = ref.encode([prompt])
    assert encoded.text_embeds is not None
    states = encoded.last_hidden_state
    if cfg > 1.0:
        states = torch.cat([ref.encode([negative_prompt]).last_hidden_state, states])
    generator = torch.Generator().manual_seed(sampling.seed)
    height, width = sampling.height, sampling.width
    shape = (1, c.unet.config.in_channels, height // 8, width // 8)  # type: ignore[attr-defined]
    x = randn_tensor(shape, generator=generator) if sampling.latents is None else sampling.latents
    x = x * sched.init_noise_sigma
    gradient = ClipGuidanceGradient(c.vae, c.vision).eval()
    rows, cols = (torch.from_numpy(m) for m in resize_matrices(height, width, c.vision.image_size))
    # as the pipeline's prepare_extra_step_kwargs: the generator to samplers that draw noise
    extra = {"generator": generator} if "generator" in inspect.signature(sched.step).parameters else {}
    for i, t in enumerate(sched.timesteps):
        model_input = sched.scale_model_input(torch.cat([x] * 2) if cfg > 1.0 else x, t)
        eps = c.unet(model_input, t, encoder_hidden_states=states, return_dict=False)[0]
        if cfg > 1.0:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + cfg * (eps_c - eps_u)
        if scale > 0 and i >= skip:
            root = float(np.float32(np.sqrt(1.0 - _alpha_bar(sched, t))))
            x_in = root * x0 - (1.0 - root) * model_input[: len(x)]
            eps = eps - scale * root * gradient(x_in, encoded.text_embeds, rows, cols)
        x = sched.step(eps, t, x, **extra, return_dict=False)[0]
    image = c.vae.decode(x / c.vae.config.scaling_factor, return_dict=False)[0]  # type: ignore[attr-defined]
    out: np.ndarray = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
    return out
