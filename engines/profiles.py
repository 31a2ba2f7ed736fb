"""--shapes / --batch / --dynamic -> the optimisation profiles of each bundle model's engine.

One engine per model holds one profile per requested image size (static: fastest kernels) plus
one ranged profile for --dynamic; profiles of one engine share its weights. Every profile keeps
the bundle's token range, so long prompts (77·k tokens) need no extra profile. Sizes are pixels
on the command line and latents (pixels / vae_scale_factor) in profiles, like the bundle's dims.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from runtime.backends.trt_shapes import Profile
from runtime.bundle import Bundle, DimRange

SPATIAL = ("height", "width")  # latents
PIXEL_SPATIAL = ("image_height", "image_width")  # the VAE encoder's input image


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


def _side(pixels: int, dim: DimRange, scale: int, unit: int, flag: str) -> int:
    """`pixels` in the dim's unit (latents: `unit` = scale; the VAE encoder's image: 1)."""
    if pixels % scale:
        raise ValueError(f"{flag}: {pixels} px is not a multiple of {scale} (the VAE's scale factor)")
    if not dim.min * unit <= pixels <= dim.max * unit:
        raise ValueError(
            f"{flag}: {pixels} px is outside the bundle's range {dim.min * unit}-{dim.max * unit}"
        )
    return pixels // unit


def spatial_dims(dims: Mapping[str, object], scale: int) -> tuple[tuple[str, str], int] | None:
    """The (height, width) dim names of a model and their unit in pixels: latents for most models,
    pixels for the VAE encoder (whose input is the image); None for models without a size."""
    if all(d in dims for d in SPATIAL):
        return SPATIAL, scale
    if all(d in dims for d in PIXEL_SPATIAL):
        return PIXEL_SPATIAL, 1
    return None


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
    spatial = spatial_dims(dims, scale)
    if spatial is None:
        return (base,)
    (height_dim, width_dim), unit = spatial
    profiles: list[Profile] = []
    shapes = request.shapes
    if not shapes and request.dynamic is None:
        shapes = ((dims[width_dim].opt * unit, dims[height_dim].opt * unit),)  # the bundle's default size
    for width, height in shapes:
        h = _side(height, dims[height_dim], scale, unit, "--shapes")
        w = _side(width, dims[width_dim], scale, unit, "--shapes")
        profile = {**base, height_dim: DimRange(h, h, h), width_dim: DimRange(w, w, w)}
        profiles.append({**profile, **_pixel_dims(profile, scale)})
    if request.dynamic is not None:
        lo, hi = request.dynamic
        for d in (height_dim, width_dim):
            low, high = (
                _side(lo, dims[d], scale, unit, "--dynamic"),
                _side(hi, dims[d], scale, unit, "--dynamic"),
            )
            base[d] = DimRange(low, min(max(dims[d].opt, low), high), high)
        profiles.append({**base, **_pixel_dims(base, scale)})
    return tuple(profiles)


def _pixel_dims(profile: Profile, scale: int) -> Profile:
    """A model with both latent and pixel sides (clip_guidance: the latent and its resize matrices'
    image sides) gets pixel ranges that follow its latent ones: the image is the decoded latent."""
    if not all(d in profile for d in (*SPATIAL, *PIXEL_SPATIAL)):
        return {}
    return {
        pixel: DimRange(r.min * scale, r.opt * scale, r.max * scale)
        for pixel, r in ((p, profile[latent]) for p, latent in zip(PIXEL_SPATIAL, SPATIAL, strict=True))
    }


def profile_label(profiles: tuple[Profile, ...], scale: int) -> str:
    """Names the engine's plan: 'b1-8', 'b1-4.512x512+768x512', 'b2.512x512+dyn256-1024'."""

    def span(r: DimRange, unit: int = 1) -> str:
        return f"{r.min * unit}" if r.min == r.max else f"{r.min * unit}-{r.max * unit}"

    label = f"b{span(profiles[0]['batch'])}"
    sizes = []
    for p in profiles:
        spatial = spatial_dims(p, scale)
        if spatial is None:
            continue
        (height_dim, width_dim), unit = spatial
        h, w = p[height_dim], p[width_dim]
        static = h.min == h.max and w.min == w.max
        sizes.append(f"{w.min * unit}x{h.min * unit}" if static else f"dyn{span(h, unit)}")
    return f"{label}.{'+'.join(sizes)}" if sizes else label
