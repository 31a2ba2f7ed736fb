"""JSON shapes of `/v1/generate`: what the OpenAPI schema shows and what pydantic type-checks.

Types are checked here (strict: "25" is not a number of steps); ranges and allowed names are
checked by `runtime.options.validate` against the bundle, and by the server's limits, so the
allowed values are written once. The enums below only document them in the schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtime.errors import RequestError
from runtime.options import COMPOSE_MODES, MODES, GenerateOptions, ResolvedOptions, options_from, parse_size
from runtime.schedulers import SCHEDULERS
from runtime.tokenizer import LONG_PROMPT_MODES

_EXAMPLES: list[Any] = [
    {"prompt": "a cat maid, watercolor", "negative_prompt": "blurry", "steps": 25, "guidance": 7.5,
     "seed": 1, "size": "512x512", "scheduler": "dpmpp_2m_karras"},
    {"prompt": "cat, (maid:1.3)", "mode": "compose", "steps": 20, "seed": 7, "width": 512, "height": 512},
]  # fmt: skip


class GenerateRequest(BaseModel):
    """One prompt, its image settings, and an optional deadline."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": _EXAMPLES})

    prompt: str = Field(description="what to draw; with mode compose: 'cat, (maid:1.3)' pieces")
    negative_prompt: str = Field("", description="what to steer away from")
    steps: int = Field(25, strict=True, description="denoising steps (capped by the server's --max-steps)")
    guidance: float = Field(7.5, strict=True, description="classifier-free guidance scale, finite, >= 0")
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

    def to_options(self) -> GenerateOptions:
        return options_from(
            {**dict(self), "size": self.size_pair()},
            prompts=(self.prompt,),
            negative_prompts=(self.negative_prompt,) if self.negative_prompt else (),
            guidance=float(self.guidance),
        )


class GenerationParameters(BaseModel):
    """The settings the images were made with, defaults and sizes filled in."""

    prompt: str
    negative_prompt: str
    steps: int
    guidance: float
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

    @classmethod
    def from_options(cls, o: ResolvedOptions) -> GenerationParameters:
        return cls(
            prompt=o.prompts[0],
            negative_prompt=o.negative_prompts[0],
            steps=o.steps,
            guidance=o.guidance,
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
        )


class GenerateResponse(BaseModel):
    """Sent unless the request's Accept header asks for image/png."""

    images: list[str] = Field(description="base64 PNGs, each with an A1111 'parameters' text chunk")
    seeds: list[int] = Field(description="per image: the seed that reproduces it alone")
    infotexts: list[str] = Field(description="per image: the PNG's 'parameters' text")
    parameters: GenerationParameters
    timings: dict[str, float] = Field(description="seconds per stage: text, denoise, decode")


class ErrorResponse(BaseModel):
    """Every error on /v1 and the health endpoints; /v2 errors are {"error": ...} as KServe v2 says."""

    detail: str = Field(examples=["steps must be an integer from 1 to 1000; got 0"])
