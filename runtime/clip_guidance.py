"""UPainting-style CLIP guidance, torch-free: the second pass's correction of the noise prediction.

Pass 1 runs plain classifier-free guidance to its final latent x̂₀. Pass 2 starts from the same
noise (and draws the same ancestral noise) and, at every step after the first `skip`, corrects the
CFG prediction before the scheduler steps, exactly as the CFG/UPainting note writes it:

    c    = sqrt(1 - ᾱ_t)
    x_in = c · x̂₀ - (1 - c) · x_t
    ε'   = ε_cfg - scale · c · ∇ cos(f(x_in), g(prompt))

ᾱ_t is the noise schedule's alphas_cumprod at the step's timestep t (linearly interpolated for the
fractional timesteps of Euler's "linspace" spacing), x_t the latents in the DDPM convention, i.e.
what the UNet reads (`scale_model_input`: Euler-type samplers divide by sqrt(σ² + 1)), f CLIP's image
tower after the VAE decoder and g its text tower (`text_embeds`). The gradient is taken with respect
to x_in (the input of f), by the bundle's `clip_guidance` graph (export/clip_guidance.py), and the
minus sign is the note's: the correction lowers ε along the direction that raises the score.
Every sampler is ε-prediction here, so the corrected ε means the same thing to each of them.

CLIP's preprocessing inside the graph is a linear map, `resize_rows · image · resize_colsᵀ`, whose
matrices this module computes: PIL's bicubic resize (the one runtime/clip_score.py uses) and the
centre crop, with float coefficients. What differs from clip_score's preprocessing: no uint8
rounding of the decoded image or between PIL's two passes, and no fixed-point coefficients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from runtime.backends.base import Backend
from runtime.bundle import Bundle, BundleError
from runtime.clip_score import check_bundle as check_clip_score
from runtime.clip_score import resized_size
from runtime.errors import RequestError
from runtime.manifest import REEXPORT
from runtime.schedulers.base import Scheduler
from runtime.specs import CLIP_GUIDANCE

DEFAULT_SKIP = 10  # the note: skipping the first 10 steps gave better FID and CLIP score
MAX_SCALE = 1e6
HOW = "re-export it with `python -m export --model MODEL --out BUNDLE --clip-guidance`"
# Called after CFG with (step index, ε_cfg, latents); returns the ε the scheduler steps with.
Correction = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


def _bicubic(x: np.ndarray) -> np.ndarray:
    """PIL's bicubic kernel (a = -0.5)."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def resample_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64: PIL's bicubic resample of one axis as a matrix
    (Pillow's precompute_coeffs: the kernel widened by the scale when reducing, normalised rows)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    matrix = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        weights = _bicubic((np.arange(lo, hi) - center + 0.5) / filterscale)
        total = weights.sum()
        matrix[xx, lo:hi] = weights / total if total != 0 else weights
    return matrix


@lru_cache(maxsize=16)
def resize_matrices(height: int, width: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 (size, height) and (size, width): CLIPImageProcessor's resize (shortest side to
    `size`, PIL bicubic) and centre crop of an image (height, width) as rows · image · colsᵀ."""
    new_width, new_height = resized_size(width, height, size)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    rows = resample_matrix(height, new_height)[top : top + size]
    cols = resample_matrix(width, new_width)[left : left + size]
    return rows.astype(np.float32), cols.astype(np.float32)


def alpha_bar(scheduler: Scheduler, t: float) -> float:
    """alphas_cumprod at timestep t (interpolated between the integer timesteps)."""
    table = scheduler.alphas_cumprod
    return float(np.interp(t, np.arange(len(table)), table))


def blend(x0: np.ndarray, x_t: np.ndarray, root: np.float32) -> np.ndarray:
    """x_in = c · x̂₀ - (1 - c) · x_t with c = sqrt(1 - ᾱ_t), as the note writes it."""
    return root * x0 - (np.float32(1.0) - root) * x_t


def gradient(
    backend: Backend, x_in: np.ndarray, text_embeds: np.ndarray, image_size: int, scale_factor: int
) -> np.ndarray:
    """∇ cos(f(x_in), g) per row, one image per call (the decoder's backward at 512x512 is GBs)."""
    height, width = x_in.shape[2] * scale_factor, x_in.shape[3] * scale_factor
    rows, cols = resize_matrices(height, width, image_size)
    grads = [
        backend.run(
            CLIP_GUIDANCE,
            {"latent": x_in[i : i + 1], "text_embeds": text_embeds[i : i + 1],
             "resize_rows": rows, "resize_cols": cols},
        )["grad"]
        for i in range(len(x_in))
    ]  # fmt: skip
    return np.concatenate(grads)


@dataclass(frozen=True)
class Guide:
    """Pass 2's inputs for a batch of rows: pass 1's final latents and the prompts' text_embeds."""

    x0: np.ndarray  # (N, 4, h, w): x̂₀, pass 1's final latents
    text_embeds: np.ndarray  # (N, P): g(prompt) of each row
    scale: float
    skip: int  # steps run without the correction, counted from the first step run
    image_size: int  # the CLIP image tower's side
    scale_factor: int  # the VAE's

    def correction(
        self, backend: Backend, scheduler: Scheduler, timesteps: np.ndarray, begin: int
    ) -> Correction:
        """The hook the denoise loop calls after CFG (runtime/denoise.py)."""

        def correct(i: int, eps: np.ndarray, latents: np.ndarray) -> np.ndarray:
            if i - begin < self.skip:
                return eps
            root = np.float32(np.sqrt(1.0 - alpha_bar(scheduler, float(timesteps[i]))))
            x_t = scheduler.scale_model_input(latents, i).astype(np.float32, copy=False)
            x_in = blend(self.x0, x_t, root)
            grad = gradient(backend, x_in, self.text_embeds, self.image_size, self.scale_factor)
            return eps - np.float32(self.scale) * root * grad

        return correct


def check_bundle(bundle: Bundle) -> int:
    """The CLIP image side, if the bundle can guide: RequestError naming what is missing and how to
    get it; BundleError when the gradient graph does not fit the towers (a damaged manifest)."""
    if CLIP_GUIDANCE not in bundle.models:
        raise RequestError(
            f"clip_guidance needs the {CLIP_GUIDANCE} graph; bundle {bundle.root} has none: {HOW}"
        )
    vision = check_clip_score(bundle)
    spec = bundle.models[CLIP_GUIDANCE].spec
    text, rows = spec.inputs[1].shape[-1], spec.inputs[2].shape[0]
    image_embeds = bundle.models["clip_vision"].spec.outputs[0].shape[-1]
    if text != image_embeds or rows != vision.image_size:
        raise BundleError(
            f"bundle {bundle.root}: {CLIP_GUIDANCE} (text_embeds {text}, pixels {rows}) does not fit "
            f"clip_vision ({image_embeds}) and vision.image_size ({vision.image_size}): {REEXPORT}"
        )
    return vision.image_size


def check_options(scale: object, skip: object, steps: int, bundle: Bundle) -> tuple[float, int]:
    """(scale, skip) checked: RequestError naming the parameter and its range; a scale > 0 also
    needs the bundle's gradient graph and towers (`check_bundle`)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 <= scale <= MAX_SCALE:
        raise RequestError(f"clip_guidance must be a number from 0 (off) to {MAX_SCALE:g}; got {scale!r:.40}")
    if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) or skip < 0:
        raise RequestError(f"clip_guidance_skip must be an integer >= 0; got {skip!r:.40}")
    if scale > 0:
        check_bundle(bundle)
        if skip >= steps:
            raise RequestError(
                f"clip_guidance_skip must be below steps ({steps}) for the guidance to act; got {skip}"
            )
    return float(scale), int(skip)
