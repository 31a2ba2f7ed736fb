"""uint8 arrays -> PNG files carrying their generation parameters (A1111's "parameters" chunk)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def parameters_text(prompt: str, negative: str, settings: dict[str, object]) -> str:
    """A1111 style: prompt line, 'Negative prompt: ...' line, then 'Key: value, ...'."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def save_png(image: np.ndarray | Image.Image, path: Path, parameters: str) -> Path:
    """Write atomically (temp name, then rename) so a crash never leaves half a PNG."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    info = PngInfo()
    info.add_text("parameters", parameters)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pil.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path
