"""What one generation asks for, validated once, before any model runs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from runtime.bundle import Bundle
from runtime.clip_guidance import DEFAULT_SKIP
from runtime.clip_guidance import check_options as check_clip_guidance
from runtime.clip_score import check_bundle as check_clip_score
from runtime.compose import parse_prompt
from runtime.errors import RequestError
from runtime.guidance import CFG_CONVENTIONS, one_based
from runtime.init_image import RESIZE_MODES, check_array, default_size, fit, prepare_mask
from runtime.lora import LoraRef, check_refs
from runtime.schedulers import SCHEDULERS, make_scheduler
from runtime.specs import DEEPCACHE_FULL, DEEPCACHE_SHALLOW, INPAINT_CHANNELS
from runtime.tokenizer import LONG_PROMPT_MODES

MODES = ("standard", "deproject", "compose")
COMPOSE_MODES = ("sum", "diff_only")
DEFAULT_SEED = 0
MAX_STEPS = 1000
MAX_IMAGES = 64
MAX_CACHE_INTERVAL = 1000  # = MAX_STEPS: a larger interval is the same as this one
# Inpainting: "unet" feeds the mask to an inpainting UNet (9 input channels, diffusers'
# StableDiffusionInpaintPipeline); "blend" keeps the unmasked area from the re-noised init latents
# after every step (diffusers' legacy inpainting, any UNet); "auto" picks by the bundle's UNet.
MASK_MODES = ("auto", "unet", "blend")
DEFAULT_STRENGTH = 0.75  # A1111's default denoising strength
MAX_MASK_BLUR = 64


@dataclass(frozen=True)
class GenerateOptions:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] = ()  # empty: "" for every prompt; one: shared; else one per prompt
    steps: int = 25
    guidance: float = 7.5  # in `cfg_convention`
    seed: int = DEFAULT_SEED
    height: int | None = None  # None: the bundle's preferred size
    width: int | None = None
    scheduler: str = "pndm"
    mode: str = "standard"
    compose_mode: str = "sum"
    normalize: bool = False
    num_images: int = 1  # per prompt
    long_prompt: str = "truncate"
    latents: np.ndarray | None = field(default=None, compare=False)  # (N, 4, h, w) initial noise
    # Step caching: the whole UNet every N-th step, its shallow part in between; 1 = off (exact).
    cache_interval: int = 1
    # img2img / inpainting (runtime/init_image.py reads files and bytes into these arrays).
    init_image: np.ndarray | None = field(default=None, compare=False)  # uint8 (H, W, 3) RGB
    mask: np.ndarray | None = field(default=None, compare=False)  # uint8 (H, W); white = repaint
    strength: float | None = None  # 0 < s <= 1; None: DEFAULT_STRENGTH with an init image
    mask_blur: int = 0  # Gaussian blur radius of the mask in pixels, before it is binarized
    mask_mode: str = "auto"
    resize_mode: str = "just_resize"  # how an init image of another size is fitted
    clip_score: bool = False  # score each image against its prompt (runtime/clip_score.py)
    cfg_convention: str = "1-based"  # how `guidance` is written (runtime/guidance.py)
    # UPainting-style CLIP guidance (runtime/clip_guidance.py): a second, corrected pass; 0 = off.
    clip_guidance: float = 0.0
    clip_guidance_skip: int = DEFAULT_SKIP  # steps run uncorrected first
    loras: tuple[LoraRef, ...] = ()  # applied in this order to CLIP and the UNet(s) (runtime/lora/)

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.num_images


@dataclass(frozen=True)
class ResolvedOptions:
    """GenerateOptions after `validate`: sizes filled in, one negative prompt per prompt.

    Only `validate` makes these; the pipeline and the server take them without checking again."""

    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...]  # exactly one per prompt ("" for none)
    steps: int
    guidance: float
    seed: int
    height: int
    width: int
    scheduler: str
    mode: str
    compose_mode: str
    normalize: bool
    num_images: int
    long_prompt: str
    latents: np.ndarray | None = field(default=None, compare=False)
    cache_interval: int = 1
    init_image: np.ndarray | None = field(default=None, compare=False)  # uint8 (height, width, 3)
    mask: np.ndarray | None = field(default=None, compare=False)  # float32 (height, width), 1 = repaint
    strength: float | None = None  # set exactly when init_image is
    mask_blur: int = 0
    mask_mode: str | None = None  # "unet" or "blend" exactly when mask is set
    resize_mode: str = "just_resize"
    clip_score: bool = False  # checked: the bundle has clip_vision and clip's text_embeds
    cfg_convention: str = "1-based"  # of `guidance`, which stays as given (the infotext shows it)
    clip_guidance: float = 0.0  # checked: > 0 needs the bundle's clip_guidance graph and towers
    clip_guidance_skip: int = DEFAULT_SKIP  # checked: below steps when clip_guidance > 0
    loras: tuple[LoraRef, ...] = ()  # checked files and scales; their content is read by the pipeline

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.num_images

    @property
    def cfg_scale(self) -> float:
        """The 1-based guidance scale the loop runs: eps_u + cfg_scale · (eps_c - eps_u)."""
        return one_based(self.guidance, self.cfg_convention)

    @property
    def seeds(self) -> list[int]:
        """Per image: seed + index, so image i alone reproduces with that seed."""
        return [self.seed + i for i in range(self.total_images)]

    def rngs(self) -> list[np.random.Generator]:
        """One generator per image, seeded with its seed: its initial noise, then its step noise."""
        return [np.random.default_rng(s) for s in self.seeds]

    def initial_latents(
        self, channels: int, vae_scale_factor: int, rngs: list[np.random.Generator] | None = None
    ) -> np.ndarray:
        """(N, C, h, w) starting noise: the caller's `latents`, else the first draw of each image's
        generator (`rngs`, fresh ones by default)."""
        if self.latents is not None:
            return self.latents.astype(np.float32)
        shape = (channels, self.height // vae_scale_factor, self.width // vae_scale_factor)
        return np.stack([rng.standard_normal(shape, dtype=np.float32) for rng in rngs or self.rngs()])


def parse_size(text: str, name: str = "size") -> tuple[int, int]:
    """'512x768' -> (width 512, height 768), as A1111 writes sizes; RequestError naming `name`.

    Only the form is checked here: whether the bundle can make that size is `validate`'s job.
    """
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise RequestError(f"{name} must look like 512x512 (WIDTHxHEIGHT); got {text!r:.40}") from None
    return width, height


_FIELDS = frozenset(f.name for f in fields(GenerateOptions))


def options_from(values: Mapping[str, Any], **overrides: Any) -> GenerateOptions:
    """GenerateOptions from a flat mapping such as `vars(args)` or a request's fields.

    Keys named like a GenerateOptions field are taken and other keys ignored; `size`, a
    (width, height) pair or None, fills width and height; `overrides` win over `values`.
    Nothing is validated here: `validate` does that against the bundle.
    """
    kwargs = {k: v for k, v in values.items() if k in _FIELDS}
    if values.get("size") is not None:
        kwargs["width"], kwargs["height"] = values["size"]
    return GenerateOptions(**{**kwargs, **overrides})


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise RequestError(f"{name} must be one of {', '.join(allowed)}; got {value!r:.60}")


def _check_text(name: str, texts: tuple[str, ...]) -> None:
    """Strings only, and encodable as UTF-8: a lone surrogate (from invalid UTF-8 on the command
    line, or a JSON escape like \\ud800) would otherwise fail deep inside the tokenizer."""
    for text in texts:
        if not isinstance(text, str):
            raise RequestError(f"{name} must be text; got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(
                f"{name} must be valid UTF-8 text; character {exc.start} is not ({text[exc.start]!r})"
            ) from None


def _negatives(o: GenerateOptions) -> tuple[str, ...]:
    """The negative prompts, one per prompt: none -> "", one -> shared by all."""
    n, given = len(o.prompts), len(o.negative_prompts)
    if given == n:
        return tuple(o.negative_prompts)
    if given == 0:
        return ("",) * n
    if given == 1:
        return tuple(o.negative_prompts) * n
    allowed = "at most 1" if n == 1 else f"0, 1 or {n} (one per prompt)"
    raise RequestError(f"negative prompts: give {allowed} for {n} prompt(s); got {given}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(options: GenerateOptions | ResolvedOptions, bundle: Bundle) -> ResolvedOptions:
    """Check every field against the bundle; RequestError naming the first bad one and its range."""
    o = options
    if isinstance(o, ResolvedOptions):
        return o
    if not isinstance(o.prompts, (tuple, list)) or not o.prompts:
        raise RequestError("prompts must be a non-empty list of strings")
    _check_text("prompt", o.prompts)
    _check_text("negative prompt", tuple(o.negative_prompts))
    negatives = _negatives(o)
    _choice("scheduler", o.scheduler, SCHEDULERS)
    most = min(MAX_STEPS, make_scheduler(o.scheduler, bundle.scheduler_config).max_steps)
    if not _is_int(o.steps) or not 1 <= o.steps <= most:
        raise RequestError(f"steps must be an integer from 1 to {most}; got {o.steps!r:.40}")
    guidance_ok = isinstance(o.guidance, (int, float)) and not isinstance(o.guidance, bool)
    if not guidance_ok or not math.isfinite(o.guidance) or o.guidance < 0:
        raise RequestError(f"guidance must be a finite number >= 0; got {o.guidance!r:.40}")
    if not _is_int(o.seed) or not 0 <= o.seed < 2**63:
        raise RequestError(f"seed must be an integer from 0 to 2**63-1; got {o.seed!r:.40}")
    if not _is_int(o.num_images) or not o.num_images >= 1 or o.total_images > MAX_IMAGES:
        raise RequestError(
            f"num_images must be >= 1 with prompts x num_images <= {MAX_IMAGES}; "
            f"got {o.num_images!r:.40} x {len(o.prompts)} prompts"
        )
    _choice("mode", o.mode, MODES)
    _choice("compose_mode", o.compose_mode, COMPOSE_MODES)
    _choice("long_prompt", o.long_prompt, LONG_PROMPT_MODES)
    if not isinstance(o.normalize, bool):
        raise RequestError(f"normalize must be true or false; got {o.normalize!r:.40}")
    if o.mode != "standard" and not bundle.has_deprojector:
        raise RequestError(f"mode {o.mode!r} needs a bundle with a deprojector; {bundle.root} has none")
    if o.mode != "standard" and o.long_prompt == "chunk":
        raise RequestError(
            "long_prompt 'chunk' works with mode 'standard' only (the deprojector makes 77 states)"
        )
    if o.mode == "compose":
        for prompt in o.prompts:
            try:
                pieces = parse_prompt(prompt)
            except ValueError as exc:
                raise RequestError(f"prompt: {exc}") from None
            if not pieces:
                raise RequestError(
                    f"prompt must hold at least one non-empty comma-separated piece for mode compose; "
                    f"got {prompt!r:.60}"
                )
    h_range, w_range = bundle.image_size_range()
    multiple, factor = bundle.size_multiple, bundle.vae_scale_factor
    init_image = None if o.init_image is None else check_array(o.init_image, "init_image")
    height = o.height if o.height is not None else h_range.opt
    width = o.width if o.width is not None else w_range.opt
    if init_image is not None and o.height is None and o.width is None:
        width, height = default_size(init_image, multiple, (w_range.max, h_range.max))
    for name, value, r in (("height", height, h_range), ("width", width, w_range)):
        low, high = -(-r.min // multiple) * multiple, r.max // multiple * multiple
        if not _is_int(value) or value % multiple or not low <= value <= high:
            source = ""
            if init_image is not None and o.height is None and o.width is None:
                shape = init_image.shape
                source = f" (taken from init_image's {shape[1]}x{shape[0]}: give a size)"
            raise RequestError(
                f"{name} must be a multiple of {multiple} from {low} to {high}; got {value!r:.40}{source}"
            )
    if not _is_int(o.cache_interval) or not 1 <= o.cache_interval <= MAX_CACHE_INTERVAL:
        raise RequestError(
            f"cache_interval must be an integer from 1 (off) to {MAX_CACHE_INTERVAL}; "
            f"got {o.cache_interval!r:.40}"
        )
    if o.cache_interval > 1 and not all(m in bundle.models for m in (DEEPCACHE_FULL, DEEPCACHE_SHALLOW)):
        raise RequestError(
            f"cache_interval {o.cache_interval} needs a bundle with the step-caching UNets; "
            f"{bundle.root} has none: re-export it with `python -m export ... --deepcache`, "
            "or use cache_interval 1"
        )
    _choice("cfg_convention", o.cfg_convention, CFG_CONVENTIONS)
    if not isinstance(o.clip_score, bool):
        raise RequestError(f"clip_score must be true or false; got {o.clip_score!r:.40}")
    if o.clip_score:
        check_clip_score(bundle)
    clip_guidance, clip_guidance_skip = check_clip_guidance(
        o.clip_guidance, o.clip_guidance_skip, o.steps, bundle
    )
    image_fields = _image_fields(o, bundle, init_image, width, height)
    loras = check_refs(o.loras)
    if o.latents is not None:
        expected = (o.total_images, bundle.latent_channels, height // factor, width // factor)
        if not isinstance(o.latents, np.ndarray) or o.latents.shape != expected \
                or not np.all(np.isfinite(o.latents)):  # fmt: skip
            raise RequestError(f"latents must be finite with shape {expected}; got {np.shape(o.latents)}")
    return ResolvedOptions(
        prompts=tuple(o.prompts), negative_prompts=negatives, steps=o.steps, guidance=float(o.guidance),
        seed=o.seed, height=height, width=width, scheduler=o.scheduler, mode=o.mode,
        compose_mode=o.compose_mode, normalize=o.normalize, num_images=o.num_images,
        long_prompt=o.long_prompt, latents=o.latents, cache_interval=o.cache_interval,
        clip_score=o.clip_score, cfg_convention=o.cfg_convention, loras=loras, clip_guidance=clip_guidance,
        clip_guidance_skip=clip_guidance_skip, **image_fields,
    )  # fmt: skip


def _image_fields(
    o: GenerateOptions, bundle: Bundle, init_image: np.ndarray | None, width: int, height: int
) -> dict[str, Any]:
    """The img2img / inpainting fields of ResolvedOptions: checked, images fitted to the size."""
    _choice("mask_mode", o.mask_mode, MASK_MODES)
    _choice("resize_mode", o.resize_mode, RESIZE_MODES)
    if not _is_int(o.mask_blur) or not 0 <= o.mask_blur <= MAX_MASK_BLUR:
        raise RequestError(
            f"mask_blur must be an integer from 0 to {MAX_MASK_BLUR} pixels; got {o.mask_blur!r:.40}"
        )
    inpainting_unet = bundle.unet_in_channels == INPAINT_CHANNELS
    if init_image is None:
        for name, value in (("mask", o.mask), ("strength", o.strength)):
            if value is not None:
                raise RequestError(f"{name} needs an init_image (img2img / inpainting); none was given")
        if inpainting_unet:
            raise RequestError(f"bundle {bundle.root} has an inpainting UNet: give an init_image and a mask")
        return {}
    if "vae_encoder" not in bundle.models:
        raise RequestError(
            f"init_image needs a bundle with the VAE encoder; {bundle.root} has none: re-export it "
            "with `python -m export --model MODEL --out BUNDLE`"
        )
    strength = DEFAULT_STRENGTH if o.strength is None else o.strength
    number = isinstance(strength, (int, float)) and not isinstance(strength, bool)
    if not number or not math.isfinite(strength) or not 0 < strength <= 1:
        raise RequestError(f"strength must be a number with 0 < strength <= 1; got {strength!r:.40}")
    if min(int(o.steps * strength), o.steps) < 1:
        raise RequestError(
            f"strength x steps must give at least one step: {strength} x {o.steps} runs none; "
            f"raise strength to >= {1 / o.steps:.3g} or steps to >= {math.ceil(1 / strength)}"
        )
    fields_: dict[str, Any] = {
        "init_image": fit(init_image, width, height, o.resize_mode), "strength": float(strength),
        "resize_mode": o.resize_mode,
    }  # fmt: skip
    if o.mask is None:
        if inpainting_unet:
            raise RequestError(
                f"bundle {bundle.root} has an inpainting UNet: give a mask with the init_image"
            )
        if o.mask_mode != "auto" or o.mask_blur:
            raise RequestError("mask_mode and mask_blur need a mask; none was given")
        return fields_
    mask = check_array(o.mask, "mask", mask=True)
    if mask.shape != init_image.shape[:2]:
        raise RequestError(
            f"mask must have the init_image's size {init_image.shape[1]}x{init_image.shape[0]}; "
            f"got {mask.shape[1]}x{mask.shape[0]}"
        )
    mode = o.mask_mode if o.mask_mode != "auto" else ("unet" if inpainting_unet else "blend")
    if mode == "unet" and not inpainting_unet:
        raise RequestError(
            f"mask_mode 'unet' needs an inpainting UNet (9 input channels); {bundle.root}'s has "
            f"{bundle.unet_in_channels}: use mask_mode 'blend' or 'auto'"
        )
    binary = prepare_mask(mask, width, height, o.resize_mode, o.mask_blur)
    if not binary.any():
        raise RequestError("mask is all black: nothing would be repainted (white marks the area to repaint)")
    if binary.all():
        raise RequestError("mask is all white: everything would be repainted; for that, leave the mask out")
    return {**fields_, "mask": binary, "mask_blur": o.mask_blur, "mask_mode": mode}
