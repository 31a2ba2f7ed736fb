"""--shapes / --batch / --dynamic -> the optimisation profiles of each bundle model's engine.

One engine per model holds one profile per requested image size (static: fastest kernels) plus
one ranged profile for --dynamic; profiles of one engine share its weights. Every profile keeps
the bundle's token range, so long prompts (77·k tokens) need no extra profile. Sizes are pixels
on the command line and latents (pixels / vae_scale_factor) in profiles, like the bundle's dims.
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.backends.trt_shapes import Profile
from runtime.bundle import Bundle, DimRange

SPATIAL = ("height", "width")


@dataclass(frozen=True)
class ProfileRequest:
    shapes: tuple[tuple[int, int], ...] = ()  # (width, height) in pixels: one static profile each
    batch: tuple[int, int] | None = None  # (min, max); None: the bundle's range
    dynamic: tuple[int, int] | None = None  # (min, max) pixels for both sides: one ranged profile


def _int(text: str, flag: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{flag}: {text!r} is not a whole number") from None
    if value < 1:
        raise ValueError(f"{flag}: {value} must be positive")
    return value


def _range(text: str, flag: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    lo, hi = _int(low, flag), _int(high or low, flag)
    if lo > hi:
        raise ValueError(f"{flag}: {text!r} has min > max")
    return lo, hi


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """'512x512,768x512' -> ((512, 512), (768, 512)), WIDTHxHEIGHT like runtime.generate's --size."""
    shapes = []
    for item in text.split(","):
        width, sep, height = item.strip().lower().partition("x")
        if not sep:
            raise ValueError(f"--shapes: {item!r} must look like 512x512 (WIDTHxHEIGHT)")
        shapes.append((_int(width, "--shapes"), _int(height, "--shapes")))
    return tuple(dict.fromkeys(shapes))


def parse_batch(text: str) -> tuple[int, int]:
    """'1-4' -> (1, 4); '2' -> (2, 2)."""
    return _range(text, "--batch")


def parse_dynamic(text: str) -> tuple[int, int]:
    """'256-1024' -> (256, 1024) pixels, for both height and width."""
    return _range(text, "--dynamic")


def _latent(pixels: int, dim: DimRange, scale: int, flag: str) -> int:
    if pixels % scale:
        raise ValueError(f"{flag}: {pixels} px is not a multiple of {scale} (the VAE's scale factor)")
    if not dim.min * scale <= pixels <= dim.max * scale:
        raise ValueError(
            f"{flag}: {pixels} px is outside the bundle's range {dim.min * scale}-{dim.max * scale}"
        )
    return pixels // scale


def model_profiles(bundle: Bundle, model: str, request: ProfileRequest) -> tuple[Profile, ...]:
    """The profiles of `model`'s engine; models without spatial dims get one."""
    dims, scale = bundle.models[model].dims, bundle.vae_scale_factor
    base = dict(dims)
    if request.batch is not None:
        lo, hi = request.batch
        if not dims["batch"].min <= lo <= hi <= dims["batch"].max:
            raise ValueError(
                f"--batch: {lo}-{hi} is outside the bundle's range {dims['batch'].min}-{dims['batch'].max}"
            )
        base["batch"] = DimRange(lo, min(max(dims["batch"].opt, lo), hi), hi)
    if not all(d in dims for d in SPATIAL):
        return (base,)
    profiles: list[Profile] = []
    shapes = request.shapes
    if not shapes and request.dynamic is None:
        shapes = ((dims["width"].opt * scale, dims["height"].opt * scale),)  # the bundle's default size
    for width, height in shapes:
        h = _latent(height, dims["height"], scale, "--shapes")
        w = _latent(width, dims["width"], scale, "--shapes")
        profiles.append({**base, "height": DimRange(h, h, h), "width": DimRange(w, w, w)})
    if request.dynamic is not None:
        lo, hi = request.dynamic
        for d in SPATIAL:
            latent_lo, latent_hi = (
                _latent(lo, dims[d], scale, "--dynamic"),
                _latent(hi, dims[d], scale, "--dynamic"),
            )
            base[d] = DimRange(latent_lo, min(max(dims[d].opt, latent_lo), latent_hi), latent_hi)
        profiles.append(base)
    return tuple(profiles)


def profile_label(profiles: tuple[Profile, ...], scale: int) -> str:
    """Names the engine's plan: 'b1-8', 'b1-4.512x512+768x512', 'b2.512x512+dyn256-1024'."""

    def span(r: DimRange, unit: int = 1) -> str:
        return f"{r.min * unit}" if r.min == r.max else f"{r.min * unit}-{r.max * unit}"

    label = f"b{span(profiles[0]['batch'])}"
    sizes = []
    for p in profiles:
        if "height" not in p:
            continue
        h, w = p["height"], p["width"]
        static = h.min == h.max and w.min == w.max
        sizes.append(f"{w.min * scale}x{h.min * scale}" if static else f"dyn{span(h, scale)}")
    return f"{label}.{'+'.join(sizes)}" if sizes else label
