"""Init images and masks sent to the server: base64 text or file bytes -> checked uint8 arrays.

/v1/generate carries an image file as base64 text in JSON (a browser's `data:image/...;base64,`
URL prefix is accepted too); KServe v2 as a BYTES element, raw in the binary tensor extension or
base64 in JSON `data` (a JSON string cannot hold raw bytes), or as a UINT8 pixel tensor. The text
is decoded strictly (the base64 alphabet only, correct padding) after its length is checked
against the file cap, then `runtime.init_image.read_image` does every check on the bytes. Each
failure is a RequestError (422) naming the field.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from runtime.errors import RequestError
from runtime.init_image import MAX_FILE_BYTES, read_image

# The base64 text of the largest file read_image accepts (4 characters per 3 bytes, padded).
MAX_BASE64_CHARS = 4 * -(-MAX_FILE_BYTES // 3)
MAX_DATA_URL_PREFIX = 256  # "data:image/png;base64," and any parameters before the comma


def _payload(text: str, field: str) -> str:
    """The base64 part of `text`: all of it, or what follows a `data:image/...;base64,` prefix."""
    if text[:5].lower() != "data:":
        return text
    comma = text.find(",", 0, MAX_DATA_URL_PREFIX)
    header = text[5:comma] if comma >= 0 else text[5:MAX_DATA_URL_PREFIX]
    params = header.lower().split(";")
    if comma < 0 or not params[0].startswith("image/") or params[-1] != "base64":
        raise RequestError(
            f"{field}: a data URL must look like data:image/png;base64,...; got {'data:' + header!r:.60}"
        )
    return text[comma + 1 :]


def decode_base64(text: str, field: str) -> bytes:
    """Strictly decoded base64 (optionally a data URL); the length is checked before decoding."""
    if len(text) > MAX_BASE64_CHARS + MAX_DATA_URL_PREFIX:
        raise RequestError(
            f"{field}: {len(text)} characters of base64 is over the limit of {MAX_BASE64_CHARS} "
            f"(an image file of at most {MAX_FILE_BYTES} bytes)"
        )
    payload = _payload(text, field)
    if len(payload) > MAX_BASE64_CHARS:
        raise RequestError(
            f"{field}: {len(payload)} characters of base64 is over the limit of {MAX_BASE64_CHARS} "
            f"(an image file of at most {MAX_FILE_BYTES} bytes)"
        )
    if not payload:
        raise RequestError(f"{field} is empty; give an image file (PNG, JPEG or WebP), base64-encoded")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:  # ValueError: non-ASCII characters
        hint = " with no line breaks (e.g. `base64 -w0 FILE`)" if any(c.isspace() for c in payload) else ""
        raise RequestError(
            f"{field}: not valid base64 ({exc}); send the image file's bytes base64-encoded{hint}"
        ) from None


def image_from_base64(text: str, field: str, mask: bool = False) -> np.ndarray:
    """base64 text of an image file -> uint8 (H, W, 3) RGB, or (H, W) for a mask."""
    return read_image(decode_base64(text, field), field, mask)
