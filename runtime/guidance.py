"""Classifier-free guidance: uncond and cond halves go through the UNet in one batched call."""

from __future__ import annotations

import numpy as np


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
