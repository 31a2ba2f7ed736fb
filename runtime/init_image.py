"""Init images and masks for img2img and inpainting: bytes -> checked arrays -> the request's size.

Everything a caller can send is checked here before a model runs, each failure a RequestError
naming the field: bytes Pillow cannot read or that end early, images over MAX_PIXELS (checked
from the header, before decoding: a decompression bomb never expands), and modes with no one
obvious RGB reading (CMYK, 16-bit and float, palette, alpha). Resizing follows A1111's three
"resize modes"; the pixel maths (LANCZOS resampling, a mask binarized at 0.5 after an optional
Gaussian blur) is diffusers' VaeImageProcessor's, so images match its pipelines.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter, UnidentifiedImageError

from runtime.errors import RequestError

MAX_PIXELS = 4096 * 4096  # per input image, checked before decoding
MAX_FILE_BYTES = 64 * 1024 * 1024
RESIZE_MODES = ("just_resize", "crop_and_resize", "resize_and_fill")  # A1111's 0, 1, 2
IMAGE_MODES = {"RGB": "RGB", "L": "grayscale"}
MASK_MODES = {"L": "grayscale", "1": "1-bit", "RGB": "RGB (read as grayscale)"}
_REFUSED = {
    "CMYK": "CMYK: convert it to RGB first",
    "P": "palette: convert it to RGB first",
    "PA": "palette with alpha: flatten it onto a background first",
    "RGBA": "RGB with alpha: flatten it onto a background first (the alpha channel is not a mask)",
    "LA": "grayscale with alpha: flatten it onto a background first",
    "I;16": "16-bit: convert it to 8 bits per channel first",
    "I": "32-bit integer: convert it to 8 bits per channel first",
    "F": "32-bit float: convert it to 8 bits per channel first",
}


def read_image(data: bytes, field: str, mask: bool = False) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 3) RGB, or (H, W) grayscale for a mask."""
    allowed = MASK_MODES if mask else IMAGE_MODES
    if len(data) > MAX_FILE_BYTES:
        raise RequestError(f"{field}: {len(data)} bytes is over the limit of {MAX_FILE_BYTES}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestError(f"{field}: the image is over the limit of {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise RequestError(f"{field}: not an image Pillow can read (PNG, JPEG, WebP, ...)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise RequestError(f"{field}: corrupt or truncated image data ({exc})") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise RequestError(
            f"{field}: {width}x{height} is {width * height} pixels, over the limit of {MAX_PIXELS}"
        )
    mode = (
        "I;16" if any(";16" in str(tile.args) for tile in image.tile) else image.mode
    )  # 48-bit RGB reads as RGB
    if mode not in allowed:
        why = _REFUSED.get(mode, f"mode {mode!r}")
        raise RequestError(
            f"{field}: {why} (accepted: {', '.join(allowed.values())}); got a {image.mode} image"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data (Pillow's choice)
        raise RequestError(f"{field}: corrupt or truncated image data ({exc})") from None
    return np.asarray(image.convert("L" if mask else "RGB"))


def read_image_file(path: Path, field: str, mask: bool = False) -> np.ndarray:
    """`read_image` of a file; a missing file, a directory or an unreadable one is named as such."""
    if path.is_dir():
        raise RequestError(f"{field}: {path} is a directory; give an image file")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RequestError(f"{field}: {path} has {size} bytes, over the limit of {MAX_FILE_BYTES}")
        data = path.read_bytes()
    except FileNotFoundError:
        raise RequestError(f"{field}: {path} does not exist") from None
    except OSError as exc:
        raise RequestError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None
    return read_image(data, f"{field} ({path})", mask)


def check_array(value: object, field: str, mask: bool = False) -> np.ndarray:
    """An API caller's array: uint8, (H, W, 3) for an image, (H, W) for a mask, sides >= 1."""
    ndim, shape = (2, "(H, W)") if mask else (3, "(H, W, 3)")
    if not isinstance(value, np.ndarray):
        raise RequestError(f"{field} must be a uint8 array of shape {shape}; got {type(value).__name__}")
    channels_ok = mask or (value.ndim == 3 and value.shape[2] == 3)
    if value.dtype != np.uint8 or value.ndim != ndim or not channels_ok or min(value.shape[:2]) < 1:
        raise RequestError(f"{field} must be a uint8 array of shape {shape}; got {value.dtype} {value.shape}")
    if value.shape[0] * value.shape[1] > MAX_PIXELS:
        raise RequestError(
            f"{field}: {value.shape[1]}x{value.shape[0]} is over the limit of {MAX_PIXELS} pixels"
        )
    return value


def default_size(image: np.ndarray, multiple: int, largest: tuple[int, int]) -> tuple[int, int]:
    """(width, height) when the request names no size: the image's own, scaled down (aspect kept)
    to fit `largest` (width, height) if it is bigger, then rounded down to `multiple`."""
    height, width = image.shape[:2]
    scale = min(1.0, largest[0] / width, largest[1] / height)
    return (int(width * scale) // multiple * multiple, int(height * scale) // multiple * multiple)


def fit(image: np.ndarray, width: int, height: int, resize_mode: str) -> np.ndarray:
    """`image` (uint8, RGB or grayscale) at exactly width x height.

    just_resize: stretched (diffusers' behaviour); crop_and_resize: scaled to cover, then the centre
    cut out; resize_and_fill: scaled to fit inside, the borders filled with its edge pixels."""
    if image.shape[:2] == (height, width):
        return image
    pil = Image.fromarray(image)
    if resize_mode == "just_resize":
        return np.asarray(pil.resize((width, height), Image.Resampling.LANCZOS))
    src_h, src_w = image.shape[:2]
    cover = resize_mode == "crop_and_resize"
    scale = (max if cover else min)(width / src_w, height / src_h)
    new_w, new_h = max(1, round(src_w * scale)), max(1, round(src_h * scale))
    resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.LANCZOS))
    if cover:
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return resized[top : top + height, left : left + width]
    top, left = (height - new_h) // 2, (width - new_w) // 2
    pad = [(top, height - new_h - top), (left, width - new_w - left)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(resized, pad, mode="edge")


def prepare_mask(mask: np.ndarray, width: int, height: int, resize_mode: str, blur: int) -> np.ndarray:
    """uint8 (H, W) mask -> float32 (height, width) of 0 and 1 (1 = repaint): blurred (Gaussian,
    `blur` px, as diffusers' `mask_processor.blur`), fitted like the image, binarized at 0.5."""
    if blur > 0:
        mask = np.asarray(Image.fromarray(mask).filter(ImageFilter.GaussianBlur(blur)))
    fitted = fit(mask, width, height, resize_mode).astype(np.float32) / np.float32(255.0)
    return (fitted >= 0.5).astype(np.float32)


def to_unit(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 (1, 3, H, W) in [0, 1], the VAE encoder's input."""
    return (image.astype(np.float32) / np.float32(255.0)).transpose(2, 0, 1)[None]
