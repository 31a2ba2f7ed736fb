"""Classifier-free guidance: uncond and cond halves go through the UNet in one batched call.

The scale has two conventions in the literature: 1-based, eps_u + s1 · (eps_c - eps_u) (diffusers,
A1111, this runtime's default: s1 = 1 is the conditional prediction alone) and 0-based,
eps_c + s0 · (eps_c - eps_u) (s0 = 0 is the conditional prediction alone). They are the same
guidance with s0 = s1 - 1; a 0-based request is run as its 1-based twin, so both give the same
image bit for bit.
"""

from __future__ import annotations

import numpy as np

CFG_CONVENTIONS = ("1-based", "0-based")


def one_based(scale: float, convention: str) -> float:
    """The 1-based scale s1 of a scale given in `convention` (s1 = s0 + 1 for 0-based)."""
    return scale + 1.0 if convention == "0-based" else scale


def uses_uncond(guidance: float) -> bool:
    """Guidance 1.0 (or less) makes eps_u + s(eps_c - eps_u) independent of eps_u for s = 1; skip it."""
    return guidance > 1.0


def unet_batch(latents: np.ndarray, guidance: float) -> np.ndarray:
    """(N, 4, h, w) -> (2N, 4, h, w) as [uncond; cond] when guiding."""
    return np.concatenate([latents, latents]) if uses_uncond(guidance) else latents


def combine(noise_pred: np.ndarray, guidance: float) -> np.ndarray:
    """eps_u + s · (eps_c - eps_u) from the stacked [uncond; cond] prediction."""
    if not uses_uncond(guidance):
        return noise_pred
    eps_u, eps_c = np.split(noise_pred, 2)
    return eps_u + np.float32(guidance) * (eps_c - eps_u)
