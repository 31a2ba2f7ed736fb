"""uint8 arrays -> PNGs carrying their generation parameters (A1111's "parameters" chunk).

The CLI and the server both write through here, so a served image and the CLI's file for the
same parameters are byte-identical.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runtime.files import write_atomic

if TYPE_CHECKING:
    from runtime.pipeline import Result


def parameters_text(prompt: str, negative: str, settings: dict[str, object]) -> str:
    """A1111 style: prompt line, 'Negative prompt: ...' line, then 'Key: value, ...'."""
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{k}: {v}" for k, v in settings.items()))
    return "\n".join(lines)


def infotext(result: Result, index: int, backend: str, precision: str, model: str) -> str:
    """Parameters text of image `index` of a result (images are prompt-major)."""
    o = result.options
    prompt_index = index // o.num_images
    negatives = o.negative_prompts
    negative = negatives[0] if len(negatives) == 1 else (negatives[prompt_index] if negatives else "")
    settings: dict[str, object] = {
        "Steps": o.steps,
        "Sampler": o.scheduler,
        "CFG scale": o.guidance,
        "Seed": result.seeds[index],
        "Size": f"{o.width}x{o.height}",
        "Mode": o.mode,
        "Backend": f"{backend}/{precision}",
        "Model": model,
    }
    if o.mode == "compose":
        settings.update({"Compose": o.compose_mode, "Normalize": o.normalize})
    return parameters_text(o.prompts[prompt_index], negative, settings)


def png_bytes(image: np.ndarray | Image.Image, parameters: str) -> bytes:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    info = PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: np.ndarray | Image.Image, path: Path, parameters: str) -> Path:
    """Written atomically (temp name, then rename): a crash never leaves half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, png_bytes(image, parameters))
    return path
