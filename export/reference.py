"""The PyTorch reference pipeline: the parity oracle for every engine and for the runtime.

Built on diffusers' StableDiffusionPipeline fed with `prompt_embeds`, so the denoising loop,
CFG and VAE decoding are diffusers' own; we only decide which 77xD states condition the UNet:
real CLIP states (standard), or states deprojected from one pooled embedding (deproject) or
from a composition of comma-separated pieces (compose). Negative prompts always use real CLIP
states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from export.deepcache import cached_unet
from export.models import SDComponents
from runtime.compose import compose, parse_prompt
from runtime.guidance import one_based

MODES = ("standard", "deproject", "compose")

_SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": (LCMScheduler, {}),
    # No "tcd": its gamma is a step() argument that the pipelines fill with their own `eta`
    # (0.0 unless given), so this reference would run TCD deterministically, not with gamma 0.3.
}


def diffusers_scheduler(name: str, config: dict[str, Any]) -> SchedulerMixin:
    """diffusers' twin of a runtime scheduler name, built from the model's scheduler config."""
    if name not in _SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(_SCHEDULERS)}; got {name!r}")
    cls, overrides = _SCHEDULERS[name]
    return cls.from_config({**config, **overrides})


@dataclass(frozen=True)
class TextEncoding:
    last_hidden_state: torch.Tensor  # (B, 77, D)
    pooled: torch.Tensor  # (B, D)
    text_embeds: torch.Tensor | None  # (B, P)


class ReferencePipeline:
    """diffusers' StableDiffusionPipeline plus the deprojector paths, deterministic with a seed."""

    def __init__(self, components: SDComponents, deprojector: torch.nn.Module | None = None):
        self.components = components
        self.tokenizer = components.tokenizer()
        self.deprojector = deprojector.eval() if deprojector is not None else None

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextEncoding:
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        out = self.components.text_encoder(ids)
        projection = self.components.text_projection
        text_embeds = out.pooler_output @ projection.T if projection is not None else None
        return TextEncoding(out.last_hidden_state, out.pooler_output, text_embeds)

    @torch.no_grad()
    def prompt_states(
        self, prompt: str, mode: str = "standard", compose_mode: str = "sum", normalize: bool = False
    ) -> torch.Tensor:
        """The (1, 77, D) states that condition the UNet for one positive prompt."""
        if mode == "standard":
            return self.encode([prompt]).last_hidden_state
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if self.deprojector is None:
            raise ValueError(f"mode {mode!r} needs a deprojector; none was given")
        if mode == "deproject":
            pooled = self.encode([prompt]).pooled
        else:
            pieces = parse_prompt(prompt)
            encoded = self.encode([text for text, _ in pieces] + [""]).pooled.double().numpy()
            weights = np.array([w for _, w in pieces])
            pooled = torch.from_numpy(
                compose(encoded[:-1], weights, encoded[-1], mode=compose_mode, normalize=normalize)
            ).float()[None]
        return self.deprojector(pooled)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        *,
        steps: int = 20,
        guidance: float = 7.5,
        seed: int = 0,
        height: int = 512,
        width: int = 512,
        scheduler: str = "pndm",
        mode: str = "standard",
        compose_mode: str = "sum",
        normalize: bool = False,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        cache_interval: int = 1,
        init_image: Image.Image | None = None,
        mask: Image.Image | None = None,
        strength: float = 0.75,
        mask_blur: int = 0,
        cfg_convention: str = "1-based",
    ) -> Any:
        """Images as float (N, H, W, 3) in [0, 1] (output_type="np") or PIL images ("pil").

        `cache_interval` N > 1: step caching (export/deepcache.py), the whole UNet on calls
        0, N, 2N, ... and only its shallow part in between; 1 is diffusers' plain loop.
        `init_image`: img2img (StableDiffusionImg2ImgPipeline) at `strength`, or with `mask`
        (white = repaint) inpainting (StableDiffusionInpaintPipeline: an inpainting UNet reads the
        mask, a standard one blends latents), the mask blurred first by `mask_blur` px if > 0."""
        if not isinstance(cache_interval, int) or cache_interval < 1:
            raise ValueError(f"cache_interval must be an integer >= 1; got {cache_interval!r}")
        c = self.components
        parts = {
            "vae": c.vae, "text_encoder": c.text_encoder, "tokenizer": self.tokenizer, "unet": c.unet,
            "scheduler": diffusers_scheduler(scheduler, c.scheduler_config), "safety_checker": None,
            "feature_extractor": None, "requires_safety_checker": False,
        }  # fmt: skip
        size: dict[str, Any] = {"height": height, "width": width, "latents": latents}
        if init_image is None:
            pipe: Any = StableDiffusionPipeline(**parts)
        elif mask is None:
            pipe = StableDiffusionImg2ImgPipeline(**parts)
            size = {"image": init_image, "strength": strength}
        else:
            pipe = StableDiffusionInpaintPipeline(**parts)
            if mask_blur:
                mask = VaeImageProcessor.blur(mask, mask_blur)
            size = {**size, "image": init_image, "mask_image": mask, "strength": strength}
        pipe.set_progress_bar_config(disable=True)
        with cached_unet(c.unet, cache_interval):
            result = pipe(
                prompt_embeds=self.prompt_states(prompt, mode, compose_mode, normalize),
                negative_prompt_embeds=self.encode([negative_prompt]).last_hidden_state,
                num_inference_steps=steps,
                guidance_scale=one_based(guidance, cfg_convention),
                generator=torch.Generator().manual_seed(seed),
                output_type=output_type,
                **size,
            )
        return result.images


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """Float [0, 1] (N, H, W, 3) -> PIL, rounding as diffusers' numpy_to_pil does."""
    return [Image.fromarray((img * 255).round().astype(np.uint8)) for img in images]
