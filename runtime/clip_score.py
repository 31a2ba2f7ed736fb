"""CLIP score of generated images against their prompts, torch-free (numpy + Pillow + the backend).

    score = 100 * max(cos(image_embeds, text_embeds), 0)

as torchmetrics' CLIPScore defines it, per image, with `image_embeds` from the bundle's
`clip_vision` (CLIP's image tower and visual projection) and `text_embeds` from its `clip`
(pooled @ text_projection^T) for the prompt's own text: truncated to 77 tokens, the negative prompt
never counts, and for the compose / deproject modes the prompt string as written is encoded by
CLIP, not the embedding the deprojector was given.

Preprocessing is transformers' CLIPImageProcessor, step for step (its PIL backend: transformers
4's CLIPImageProcessor, transformers 5's CLIPImageProcessorPil, which 5's CLIPImageProcessor falls
back to without torchvision); `tests/test_clip_score_parity.py` compares the arrays (equal) and
the scores with it. The steps:

1. resize, PIL bicubic (reducing_gap None), the shortest side to `image_size`; the other side
   becomes int(image_size * long / short), truncated, not rounded
   (`get_resize_output_image_size(default_to_square=False)`);
2. centre crop to image_size x image_size, the top-left corner at ((H - S) // 2, (W - S) // 2);
3. rescale: uint8 -> float64 * (1 / 255) -> float32;
4. normalise in float32: (x - mean) / std per channel, with the bundle's mean and std
   (manifest `vision`, the tower's own preprocessor config).

What a score adds to a generation: `python scripts/bench_clip_score.py --bundle DIR`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from runtime.backends.base import Backend
from runtime.bundle import Bundle, BundleError
from runtime.errors import RequestError
from runtime.manifest import REEXPORT, VisionManifest
from runtime.specs import CLIP_VISION

TEXT_EMBEDS = "text_embeds"
RESCALE = 1 / 255  # CLIPImageProcessor's rescale_factor
# How to get a bundle that can score, for the refusal's message.
HOW = (
    "re-export it with `python -m export --model MODEL --out BUNDLE` (a diffusers folder needs "
    "`--projection DIR` with CLIP's text_projection for the text side, and a `safety_checker/` or "
    "`image_encoder/` folder for the image side)"
)


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) after CLIPImageProcessor's resize: the shortest side becomes `size`, the
    other int(size * long / short) (transformers' get_resize_output_image_size, truncating)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def preprocess(images: np.ndarray | Sequence[np.ndarray], vision: VisionManifest) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB images -> float32 (N, 3, S, S) pixel_values for `clip_vision`."""
    size = vision.image_size
    mean = np.asarray(vision.mean, dtype=np.float32)
    std = np.asarray(vision.std, dtype=np.float32)
    rows = []
    for image in images:
        pil = Image.fromarray(np.asarray(image, dtype=np.uint8), "RGB")
        pil = pil.resize(resized_size(pil.width, pil.height, size), Image.Resampling.BICUBIC)
        top, left = (pil.height - size) // 2, (pil.width - size) // 2
        x = np.asarray(pil)[top : top + size, left : left + size]
        x = (x.astype(np.float64) * RESCALE).astype(np.float32)
        rows.append(((x - mean) / std).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> list[float]:
    """100 * max(cos, 0) row by row (float64); a zero vector has no direction and scores 0."""
    a = np.asarray(image_embeds, dtype=np.float64)
    b = np.asarray(text_embeds, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"image and text embeddings must both be (N, P); got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    cos = np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)
    return [float(s) for s in 100 * np.clip(cos, 0.0, 1.0)]


def clip_scores(
    backend: Backend, vision: VisionManifest, images: np.ndarray, text_embeds: np.ndarray
) -> list[float]:
    """One score per image: uint8 (N, H, W, 3) against text_embeds (N, P), row by row, in ONE
    batched `clip_vision` call (a backend splits it only where its engines cap the batch)."""
    pixels = preprocess(images, vision)
    image_embeds = backend.run(CLIP_VISION, {"pixel_values": pixels})["image_embeds"]
    return scores(image_embeds, text_embeds)


def check_bundle(bundle: Bundle) -> VisionManifest:
    """The bundle's vision settings, if it can score: RequestError naming what is missing and how
    to get it; BundleError when its two towers do not fit together (a damaged manifest)."""
    vision = bundle.manifest.vision
    text = TEXT_EMBEDS in bundle.models["clip"].spec.output_names
    missing = [
        what
        for what, present in (
            (f"CLIP's image tower ({CLIP_VISION})", vision is not None and CLIP_VISION in bundle.models),
            ("CLIP's text projection (clip text_embeds)", text),
        )
        if not present
    ]
    if missing:
        raise RequestError(f"clip_score needs {' and '.join(missing)}; bundle {bundle.root} has none: {HOW}")
    assert vision is not None
    clip = bundle.models["clip"].spec
    text_dim = clip.outputs[clip.output_names.index(TEXT_EMBEDS)].shape[-1]
    spec = bundle.models[CLIP_VISION].spec
    image_dim, pixels = spec.outputs[0].shape[-1], spec.inputs[0].shape[-1]
    if image_dim != text_dim or pixels != vision.image_size:
        raise BundleError(
            f"bundle {bundle.root}: {CLIP_VISION} (image_embeds {image_dim}, pixels {pixels}) does not fit "
            f"clip's text_embeds ({text_dim}) and vision.image_size ({vision.image_size}): {REEXPORT}"
        )
    return vision
