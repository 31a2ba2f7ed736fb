"""A deterministic init image and mask for the img2img / inpainting workloads of the benchmarks and
the compare tool: smooth gradients and a bright disc (structure the VAE keeps, unlike noise), and a
centred rectangle to repaint. No files: every process makes the same pixels from the size alone."""

from __future__ import annotations

import numpy as np


def init_image(width: int, height: int) -> np.ndarray:
    """uint8 (height, width, 3) RGB."""
    y, x = np.mgrid[0:height, 0:width]
    y, x = y / height, x / width
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05).astype(float)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x * y)], axis=-1) * 0.7 + 0.3 * disc[..., None]
    return (rgb * 255).round().astype(np.uint8)


def init_mask(width: int, height: int) -> np.ndarray:
    """uint8 (height, width): white (repaint) over the middle half of each side."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return mask
