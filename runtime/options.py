"""What one generation asks for, validated once, before any model runs."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from runtime.bundle import Bundle
from runtime.schedulers import SCHEDULERS
from runtime.tokenizer import LONG_PROMPT_MODES

MODES = ("standard", "deproject", "compose")
COMPOSE_MODES = ("sum", "diff_only")
DEFAULT_SEED = 0
MAX_STEPS = 1000
MAX_IMAGES = 64


@dataclass(frozen=True)
class GenerateOptions:
    prompts: tuple[str, ...]
    negative_prompts: tuple[str, ...] = ()  # empty: "" for every prompt; one: shared; else one per prompt
    steps: int = 25
    guidance: float = 7.5
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

    @property
    def total_images(self) -> int:
        return len(self.prompts) * self.num_images


def parse_size(text: str, name: str = "size") -> tuple[int, int]:
    """'512x768' -> (width 512, height 768), as A1111 writes sizes; ValueError naming `name`.

    Only the form is checked here: whether the bundle can make that size is `validate`'s job.
    """
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"{name} must look like 512x512 (WIDTHxHEIGHT); got {text!r}") from None
    return width, height


def size_argument(text: str) -> tuple[int, int]:
    """`parse_size` as an argparse `type=` for --size: argparse prints its message as it is."""
    try:
        return parse_size(text, "--size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


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
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def validate(options: GenerateOptions, bundle: Bundle) -> GenerateOptions:
    """Check every field against the bundle; return the options with sizes filled in."""
    o = options
    if not o.prompts or not all(isinstance(p, str) for p in o.prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    if len(o.negative_prompts) not in (0, 1, len(o.prompts)):
        raise ValueError(
            f"negative_prompts must have 0, 1 or {len(o.prompts)} entries (one per prompt); "
            f"got {len(o.negative_prompts)}"
        )
    if isinstance(o.steps, bool) or not isinstance(o.steps, int) or not 1 <= o.steps <= MAX_STEPS:
        raise ValueError(f"steps must be an integer from 1 to {MAX_STEPS}; got {o.steps!r}")
    if not isinstance(o.guidance, (int, float)) or not math.isfinite(o.guidance) or o.guidance < 0:
        raise ValueError(f"guidance must be a finite number >= 0; got {o.guidance!r}")
    if isinstance(o.seed, bool) or not isinstance(o.seed, int) or not 0 <= o.seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63-1; got {o.seed!r}")
    if not isinstance(o.num_images, int) or not o.num_images >= 1 or o.total_images > MAX_IMAGES:
        raise ValueError(
            f"num_images must be >= 1 with prompts x num_images <= {MAX_IMAGES}; "
            f"got {o.num_images!r} x {len(o.prompts)} prompts"
        )
    _choice("scheduler", o.scheduler, SCHEDULERS)
    _choice("mode", o.mode, MODES)
    _choice("compose_mode", o.compose_mode, COMPOSE_MODES)
    _choice("long_prompt", o.long_prompt, LONG_PROMPT_MODES)
    if o.mode != "standard" and not bundle.has_deprojector:
        raise ValueError(f"mode {o.mode!r} needs a bundle with a deprojector; {bundle.root} has none")
    if o.mode != "standard" and o.long_prompt == "chunk":
        raise ValueError(
            "long_prompt 'chunk' works with mode 'standard' only (the deprojector makes 77 states)"
        )
    h_range, w_range = bundle.image_size_range()
    height = o.height if o.height is not None else h_range.opt
    width = o.width if o.width is not None else w_range.opt
    multiple, factor = bundle.size_multiple, bundle.vae_scale_factor
    for name, value, r in (("height", height, h_range), ("width", width, w_range)):
        low, high = -(-r.min // multiple) * multiple, r.max // multiple * multiple
        if not isinstance(value, int) or value % multiple or not low <= value <= high:
            raise ValueError(f"{name} must be a multiple of {multiple} from {low} to {high}; got {value!r}")
    if o.latents is not None:
        expected = (o.total_images, bundle.manifest["latent_channels"], height // factor, width // factor)
        if o.latents.shape != expected or not np.all(np.isfinite(o.latents)):
            raise ValueError(f"latents must be finite with shape {expected}; got {o.latents.shape}")
    return replace(o, height=height, width=width)
