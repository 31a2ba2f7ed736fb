"""JSON shapes of `/v1/generate`: what the OpenAPI schema shows and what pydantic type-checks.

Types are checked here (strict: "25" is not a number of steps); ranges and allowed names are
checked by `runtime.options.validate` against the bundle, and by the server's limits, so the
allowed values are written once. The enums below only document them in the schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtime.clip_guidance import DEFAULT_SKIP
from runtime.errors import RequestError
from runtime.guidance import CFG_CONVENTIONS
from runtime.init_image import RESIZE_MODES
from runtime.lora import MAX_SCALE
from runtime.options import (
    COMPOSE_MODES,
    DEFAULT_STRENGTH,
    MASK_MODES,
    MAX_MASK_BLUR,
    MODES,
    GenerateOptions,
    ResolvedOptions,
    options_from,
    parse_size,
)
from runtime.schedulers import SCHEDULERS
from runtime.serving.images import image_from_base64
from runtime.serving.loras import MAX_LORAS, request_loras
from runtime.tokenizer import LONG_PROMPT_MODES

_EXAMPLES: list[Any] = [
    {"prompt": "a cat maid, watercolor", "negative_prompt": "blurry", "steps": 25, "guidance": 7.5,
     "seed": 1, "size": "512x512", "scheduler": "dpmpp_2m_karras"},
    {"prompt": "cat, (maid:1.3)", "mode": "compose", "steps": 20, "seed": 7, "width": 512, "height": 512},
]  # fmt: skip


class LoraEntry(BaseModel):
    """One LoRA the server offers (a NAME.safetensors file in its --lora-dir) and its strength."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the file's name without .safetensors; a name, never a path")
    scale: float = Field(1.0, strict=True, description=f"strength, finite, |scale| <= {MAX_SCALE:g}")


class GenerateRequest(BaseModel):
    """One prompt, its image settings, and an optional deadline."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": _EXAMPLES})

    prompt: str = Field(description="what to draw; with mode compose: 'cat, (maid:1.3)' pieces")
    negative_prompt: str = Field("", description="what to steer away from")
    steps: int = Field(25, strict=True, description="denoising steps (capped by the server's --max-steps)")
    guidance: float = Field(7.5, strict=True, description="classifier-free guidance scale, finite, >= 0")
    cfg_convention: str = Field(
        "1-based",
        description="how guidance is written: 1-based eps_u + s(eps_c - eps_u), or 0-based "
        "eps_c + s(eps_c - eps_u) (the same guidance as 1-based s + 1)",
        json_schema_extra={"enum": list(CFG_CONVENTIONS)},
    )
    seed: int = Field(0, strict=True, description="image i of the request uses seed + i")
    size: str | None = Field(
        None, description="WIDTHxHEIGHT in pixels (default: the bundle's); or give width and height"
    )
    width: int | None = Field(None, strict=True, description="pixels, a multiple of the bundle's")
    height: int | None = Field(None, strict=True, description="pixels, a multiple of the bundle's")
    scheduler: str = Field("pndm", json_schema_extra={"enum": list(SCHEDULERS)})
    mode: str = Field("standard", json_schema_extra={"enum": list(MODES)})
    compose_mode: str = Field("sum", json_schema_extra={"enum": list(COMPOSE_MODES)})
    normalize: bool = Field(False, strict=True, description="compose: rescale to the pieces' mean norm")
    num_images: int = Field(1, strict=True, description="images for this prompt (capped by --max-images)")
    long_prompt: str = Field("truncate", json_schema_extra={"enum": list(LONG_PROMPT_MODES)})
    cache_interval: int = Field(
        1,
        strict=True,
        description="step caching: the whole UNet every N-th step, its shallow part in between "
        "(faster, approximate; needs a bundle exported with --deepcache); 1 = off",
    )
    init_image: str | None = Field(
        None,
        strict=True,
        description="img2img / inpainting: the starting image, a PNG, JPEG or WebP file base64-encoded "
        "(a data:image/...;base64, URL prefix is accepted); RGB or grayscale, 8 bits. Without a size "
        "the output takes its size (scaled down to fit the bundle, rounded to its multiple)",
    )
    mask: str | None = Field(
        None,
        strict=True,
        description="inpainting: a base64-encoded image file the init_image's size; white marks what to "
        "repaint, black what to keep (grayscale, 1-bit or RGB read as grayscale; binarized at 50%)",
    )
    strength: float | None = Field(
        None,
        strict=True,
        description=f"with an init_image: how much to change it, 0 < strength <= 1 (1: ignore its "
        f"content; default {DEFAULT_STRENGTH}); denoises for the last int(steps x strength) steps",
    )
    mask_blur: int = Field(
        0, strict=True, description=f"with a mask: Gaussian blur radius in pixels, 0-{MAX_MASK_BLUR}"
    )
    mask_mode: str = Field(
        "auto",
        description="with a mask: unet (an inpainting UNet's 9-channel input), blend (keep the unmasked "
        "area from the init image after every step; any UNet), auto (unet if the bundle's UNet is one)",
        json_schema_extra={"enum": list(MASK_MODES)},
    )
    resize_mode: str = Field(
        "just_resize",
        description="an init_image (and mask) of another size than the output is: stretched "
        "(just_resize), scaled to cover and centre-cropped (crop_and_resize), or scaled to fit with "
        "the borders filled from its edges (resize_and_fill)",
        json_schema_extra={"enum": list(RESIZE_MODES)},
    )
    clip_score: bool = Field(
        False,
        strict=True,
        description="score each image against the prompt: 100 x max(cosine of CLIP's image and text "
        "embeddings, 0), in `clip_scores` and the infotext; needs a bundle with CLIP's image tower",
    )
    clip_guidance: float = Field(
        0.0,
        strict=True,
        description="UPainting-style CLIP guidance scale, 0 (off) to 1e6: a second pass from the same "
        "noise whose prediction is corrected toward the prompt's CLIP embedding; needs a bundle "
        "exported with --clip-guidance",
    )
    clip_guidance_skip: int = Field(
        DEFAULT_SKIP, strict=True, description="steps run without the CLIP guidance correction first"
    )
    loras: list[LoraEntry] = Field(
        default_factory=list,
        description=f"LoRAs from the server's --lora-dir, applied in order (at most {MAX_LORAS}, "
        "<lora:NAME:WEIGHT> tags in the prompt included; A1111's tags are read from the prompt only)",
    )
    timeout: float | None = Field(
        None, gt=0, description="seconds until the server gives up (capped by its --timeout)"
    )

    def size_pair(self) -> tuple[int | None, int | None]:
        """(width, height) from `size` or from `width`/`height`; RequestError when ambiguous."""
        if self.size is None:
            return self.width, self.height
        if self.width is not None or self.height is not None:
            raise RequestError("give size or width/height, not both")
        return parse_size(self.size, "size")

    @property
    def has_images(self) -> bool:
        return self.init_image is not None or self.mask is not None

    def to_options(self, lora_dir: Path | None = None) -> GenerateOptions:
        """The request as GenerateOptions, its images decoded and its LoRAs (`loras`, prompt tags)
        found in `lora_dir` (RequestError naming a bad one)."""
        prompt, loras = request_loras(self.prompt, [(e.name, e.scale) for e in self.loras], lora_dir)
        init_image = None if self.init_image is None else image_from_base64(self.init_image, "init_image")
        mask = None if self.mask is None else image_from_base64(self.mask, "mask", mask=True)
        return options_from(
            {**dict(self), "size": self.size_pair()},
            prompts=(prompt,),
            negative_prompts=(self.negative_prompt,) if self.negative_prompt else (),
            guidance=float(self.guidance),
            strength=None if self.strength is None else float(self.strength),
            init_image=init_image,
            mask=mask,
            loras=loras,
        )


class GenerationParameters(BaseModel):
    """The settings the images were made with, defaults and sizes filled in."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
    cfg_convention: str
    seed: int
    width: int
    height: int
    scheduler: str
    mode: str
    compose_mode: str
    normalize: bool
    num_images: int
    long_prompt: str
    cache_interval: int
    init_image: bool = Field(False, description="whether an init image was given (it is not sent back)")
    mask: bool = Field(False, description="whether a mask was given (it is not sent back)")
    strength: float | None = Field(None, description="with an init_image; else null")
    resize_mode: str | None = Field(None, description="with an init_image; else null")
    mask_blur: int | None = Field(None, description="with a mask; else null")
    mask_mode: str | None = Field(None, description="with a mask: unet or blend (auto resolved); else null")
    clip_score: bool = Field(False, description="whether CLIP scores were asked for")
    clip_guidance: float = Field(0.0, description="the CLIP guidance scale (0: off)")
    clip_guidance_skip: int = Field(DEFAULT_SKIP, description="steps run without CLIP guidance first")
    loras: list[LoraEntry] = Field(default_factory=list, description="the LoRAs applied, tags included")

    @classmethod
    def from_options(cls, o: ResolvedOptions) -> GenerationParameters:
        return cls(
            prompt=o.prompts[0],
            negative_prompt=o.negative_prompts[0],
            steps=o.steps,
            guidance=o.guidance,
            cfg_convention=o.cfg_convention,
            seed=o.seed,
            width=o.width,
            height=o.height,
            scheduler=o.scheduler,
            mode=o.mode,
            compose_mode=o.compose_mode,
            normalize=o.normalize,
            num_images=o.num_images,
            long_prompt=o.long_prompt,
            cache_interval=o.cache_interval,
            init_image=o.init_image is not None,
            mask=o.mask is not None,
            strength=o.strength,
            resize_mode=None if o.init_image is None else o.resize_mode,
            mask_blur=None if o.mask is None else o.mask_blur,
            mask_mode=o.mask_mode if o.mask is not None else None,
            clip_score=o.clip_score,
            clip_guidance=o.clip_guidance,
            clip_guidance_skip=o.clip_guidance_skip,
            loras=[LoraEntry(name=ref.path.stem, scale=ref.scale) for ref in o.loras],
        )


class GenerateResponse(BaseModel):
    """Sent unless the request's Accept header asks for image/png."""

    images: list[str] = Field(description="base64 PNGs, each with an A1111 'parameters' text chunk")
    seeds: list[int] = Field(description="per image: the seed that reproduces it alone")
    infotexts: list[str] = Field(description="per image: the PNG's 'parameters' text")
    parameters: GenerationParameters
    timings: dict[str, float] = Field(
        description="seconds per stage: text, (encode,) denoise, (clip_guidance,) decode (, clip_score)"
    )
    clip_scores: list[float] | None = Field(
        None, description="per image, with clip_score: 100 x max(cos(image, prompt), 0); else null"
    )


class ErrorResponse(BaseModel):
    """Every error on /v1 and the health endpoints; /v2 errors are {"error": ...} as KServe v2 says."""

    detail: str = Field(examples=["steps must be an integer from 1 to 1000; got 0"])
