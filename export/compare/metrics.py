"""Accuracy numbers: runtime output vs PyTorch output for the same inputs.

Everything is computed in float64 so the metric itself adds no error. Cosines are taken per
batch row over the flattened tensor and the smallest row is reported: one bad row must not be
averaged away. The deprojector is also measured per sequence position (77 values), because its
positions are generated one after another and errors can grow along the sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _rows(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(x.shape[0], -1)


def cosine_rows(ours: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Cosine similarity of each batch row (flattened); 1.0 where both rows are all zeros."""
    a, b = _rows(ours), _rows(ref)
    dot = (a * b).sum(axis=1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1.0), np.where(dot == 0, 1.0, 0.0))


def tensor_metrics(ours: np.ndarray, ref: np.ndarray, per_position: bool = False) -> dict[str, Any]:
    """max abs, mean abs and min cosine; with `per_position`, also 77 values for (B, T, D) outputs."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: runtime {ours.shape} vs PyTorch {ref.shape}")
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    out: dict[str, Any] = {
        "shape": list(ref.shape),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "cosine": float(cosine_rows(ours, ref).min()),
        "ref_max_abs": float(np.abs(ref).max()),  # scale of the output, to read max abs against
    }
    if per_position:
        b, t = ref.shape[:2]
        flat = (ours.reshape(b * t, -1), ref.reshape(b * t, -1))
        position_cos = cosine_rows(*flat).reshape(b, t).min(axis=0)
        out["per_position_max_abs"] = diff.reshape(b, t, -1).max(axis=(0, 2)).tolist()
        out["per_position_cosine"] = position_cos.tolist()
        out["min_position_cosine"] = float(position_cos.min())
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float [0, 1] -> uint8 with the rounding diffusers' numpy_to_pil and runtime/vae.py use."""
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def image_metrics(ours: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """uint8 (H, W, 3) images: max / mean pixel difference (of 255), PSNR (dB) and SSIM."""
    if ours.shape != ref.shape or ours.dtype != np.uint8 or ref.dtype != np.uint8:
        raise ValueError(
            f"need two uint8 images of one shape; got {ours.dtype}{ours.shape}, {ref.dtype}{ref.shape}"
        )
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    identical = not diff.any()
    return {
        "max_pixel_diff": int(diff.max()),
        "mean_pixel_diff": float(diff.mean()),
        "psnr_db": float("inf") if identical else float(peak_signal_noise_ratio(ref, ours, data_range=255)),
        "ssim": float(structural_similarity(ref, ours, channel_axis=-1, data_range=255)),
    }


def latent_drift(ours: np.ndarray, ref: np.ndarray) -> dict[str, list[float]]:
    """Per denoising step (S, N, 4, h, w): max abs and relative L2 (|ours - ref| / |ref|) of the latents."""
    steps = min(len(ours), len(ref))
    a = np.asarray(ours[:steps], np.float64).reshape(steps, -1)
    b = np.asarray(ref[:steps], np.float64).reshape(steps, -1)
    diff = a - b
    return {
        "max_abs": np.abs(diff).max(axis=1).tolist(),
        "rel_l2": (np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-30)).tolist(),
    }
