"""uint8 arrays -> PNG (or JPEG/WebP) files carrying their generation parameters (A1111's "parameters" chunk).

The CLI and the server both write through here, so a served image and the CLI's file for the
same parameters are byte-identical.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from runtime.errors import RequestError
from runtime.files import write_atomic
from runtime.lora.infotext import lora_hashes, prompt_with_tags

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
    if o.cfg_convention != "1-based":  # A1111's CFG scale is 1-based: say when it is not
        settings["CFG convention"] = o.cfg_convention
    if o.cache_interval > 1:  # only when on: exact images keep their text unchanged
        settings["Cache interval"] = o.cache_interval
    if o.strength is not None:  # img2img / inpainting, in A1111's words where it has them
        settings["Denoising strength"] = o.strength
        settings["Resize mode"] = o.resize_mode
    if o.mask is not None:
        settings.update({"Mask blur": o.mask_blur, "Mask mode": o.mask_mode})
    if o.clip_guidance > 0:  # only when on: unguided images keep their text unchanged
        settings.update({"CLIP guidance": o.clip_guidance, "CLIP guidance skip": o.clip_guidance_skip})
    if result.clip_scores is not None:  # asked for: an image without it keeps its text unchanged
        settings["CLIP score"] = f"{result.clip_scores[index]:.2f}"
    prompt = o.prompts[prompt_index]
    if o.loras:  # A1111's way: the tags in the prompt line, the files' hashes in `Lora hashes`
        prompt = prompt_with_tags(prompt, o.loras)
        settings["Lora hashes"] = lora_hashes(o.loras)
    return parameters_text(prompt, o.negative_prompts[prompt_index], settings)


# Output formats by file extension. PNG keeps the parameters in a text chunk; JPEG in its comment
# segment; WebP (written lossless) in EXIF UserComment, as A1111 does.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_USER_COMMENT, _EXIF_IFD = 0x9286, 0x8769


def png_bytes(image: np.ndarray | Image.Image, parameters: str) -> bytes:
    return image_bytes(image, parameters, "PNG")


def image_bytes(image: np.ndarray | Image.Image, parameters: str, image_format: str) -> bytes:
    """Encoded as PNG, JPEG (quality 95) or lossless WebP, the parameters embedded."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    if image_format == "PNG":
        info = PngInfo()
        info.add_text("parameters", parameters)
        pil.save(buffer, format="PNG", pnginfo=info)
    elif image_format == "JPEG":
        pil.save(buffer, format="JPEG", quality=95, comment=parameters.encode())
    else:
        exif = Image.Exif()
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        pil.save(buffer, format="WEBP", lossless=True, exif=exif)
    return buffer.getvalue()


def image_format(path: Path, name: str = "--out") -> str:
    """The format its extension names (none: PNG), or RequestError listing the extensions written."""
    if not path.suffix:
        return "PNG"
    try:
        return IMAGE_FORMATS[path.suffix.lower()]
    except KeyError:
        raise RequestError(
            f"{name}: cannot write {path.suffix!r} images ({path}); use one of {', '.join(IMAGE_FORMATS)}"
        ) from None


def check_writable(paths: list[Path], name: str = "--out") -> None:
    """Before any model loads: each path is a writable file location (its folder is created).

    A probe file is created and removed in each folder, because permission bits do not tell
    (root on a read-only mount, /proc, a full quota)."""
    for path in paths:
        image_format(path, name)
        if path.is_dir():
            raise RequestError(
                f"{name}: {path} is a directory; give a file name such as {path / 'image.png'}"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
                pass
        except OSError as exc:
            raise RequestError(f"{name}: cannot write to {path.parent}: {exc.strerror or exc}") from None


def save_image(image: np.ndarray | Image.Image, path: Path, parameters: str) -> Path:
    """In the format of the path's extension, written atomically (temp name, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, image_bytes(image, parameters, image_format(path)))
    return path
