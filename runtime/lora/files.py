"""LoRA files as users have them -> one low-rank update per (component, module), torch-free.

Two layouts, told apart by their keys:
- kohya / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`, and `lora_te_…`
  for the text encoder; <module> is the diffusers module path with `.` written `_` (resolved against
  the bundle's module names by the caller, since `_` is ambiguous). Conv LoRAs (LoCon): down
  (r, in, kh, kw), up (out, r, 1, 1). No alpha key: alpha = rank.
- diffusers / PEFT (`save_lora_weights`): `unet.<module>.lora_A.weight`, `.lora_B.weight`,
  `text_encoder.<module>.…`; alpha from the file's `lora_adapter_metadata` (`unet.lora_alpha`,
  `unet.alpha_pattern`, …) when present, else alpha = rank, as diffusers does.

The safetensors container is parsed here (8-byte header length, JSON header, raw little-endian
data): numpy has no bfloat16, which many LoRAs are stored in, and nothing else is needed.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from runtime.errors import RequestError

COMPONENTS = ("unet", "text_encoder")
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_PEFT_PREFIX = {"unet.": "unet", "text_encoder.": "text_encoder"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "BF16": np.uint16}
_MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class LoraModule:
    """One module's update: delta W = (alpha / rank) · up @ down, before the request's scale."""

    component: str  # "unet" or "text_encoder"
    name: str  # kohya: the module's underscored name; PEFT: its dotted diffusers path
    dotted: bool  # whether `name` is a dotted path already
    key: str  # the file's key of `down`, for messages
    down: np.ndarray  # (r, in) or (r, in, kh, kw), float32
    up: np.ndarray  # (out, r) or (out, r, 1, 1), float32
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass(frozen=True)
class LoraFile:
    path: Path
    layout: str  # "kohya" or "peft"
    modules: tuple[LoraModule, ...]


def _refuse(path: Path, what: str) -> RequestError:
    return RequestError(f"lora {path.name}: {what}")


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a safetensors file as float32 (float tensors only), and its metadata."""
    data = path.read_bytes()
    if len(data) < 8:
        raise _refuse(path, "not a safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if not 2 <= size <= min(_MAX_HEADER, len(data) - 8):
        raise _refuse(path, "not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _refuse(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _refuse(path, "not a safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + size :]
    tensors: dict[str, np.ndarray] = {}
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _refuse(path, f"not a safetensors file (bad header entry {key!r:.80})") from None
        if dtype not in _DTYPES:
            raise _refuse(path, f"{key}: dtype {dtype} is not a float type a LoRA uses")
        item = np.dtype(_DTYPES[dtype]).itemsize
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(body) or end - begin != count * item:
            raise _refuse(path, f"{key}: its data offsets do not fit the file (truncated?)")
        raw = np.frombuffer(body[begin:end], dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
        # bfloat16 is the upper half of a float32
        array = (raw.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else raw.astype(np.float32)
        tensors[key] = array.reshape(shape)
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def _layout(path: Path, keys: list[str]) -> str:
    if any(k.startswith(tuple(_KOHYA_PREFIX)) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    raise _refuse(
        path,
        f"no key matches a known LoRA layout (kohya lora_unet_/lora_te_…lora_down.weight, or diffusers "
        f"unet./text_encoder.…lora_A.weight); first key: {keys[0] if keys else '(none)'}",
    )


def _peft_alphas(metadata: dict[str, str], path: Path) -> dict[str, tuple[float | None, dict[str, float]]]:
    """component -> (lora_alpha, alpha_pattern) from diffusers' `lora_adapter_metadata`."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError:
        raise _refuse(path, "its lora_adapter_metadata is not JSON") from None
    alphas = {}
    for component in COMPONENTS:
        alpha = config.get(f"{component}.lora_alpha")
        pattern = config.get(f"{component}.alpha_pattern") or {}
        alphas[component] = (
            None if alpha is None else float(alpha),
            {k: float(v) for k, v in pattern.items()},
        )
    return alphas


def _pattern_alpha(module: str, default: float | None, pattern: dict[str, float]) -> float | None:
    """PEFT's alpha_pattern lookup: a key matches the module's full name or a `.`-suffix of it."""
    for key, value in pattern.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _pairs(path: Path, tensors: dict[str, np.ndarray], layout: str) -> dict[str, tuple[str, str, str | None]]:
    """module key stem -> (down key, up key, alpha key or None); refuses keys of unknown kinds."""
    down_suffix, up_suffix = (
        (".lora_down.weight", ".lora_up.weight")
        if layout == "kohya"
        else (".lora_A.weight", ".lora_B.weight")
    )
    prefixes = tuple(_KOHYA_PREFIX) if layout == "kohya" else tuple(_PEFT_PREFIX)
    stems: dict[str, tuple[str, str, str | None]] = {}
    for key in tensors:
        if not key.startswith(prefixes):
            raise _refuse(path, f"key {key} belongs to no UNet or text-encoder module this runtime can apply")
        if key.endswith(down_suffix):
            stem = key.removesuffix(down_suffix)
        elif key.endswith(up_suffix) or (layout == "kohya" and key.endswith(".alpha")):
            continue
        else:
            raise _refuse(
                path,
                f"key {key}: not a plain LoRA factor ({down_suffix}, {up_suffix}"
                f"{', .alpha' if layout == 'kohya' else ''}); LoHa, LoKr, DoRA and LoCon-Tucker are not "
                "supported",
            )
        up = stem + up_suffix
        if up not in tensors:
            raise _refuse(path, f"key {key} has no matching {up}")
        alpha = stem + ".alpha"
        stems[stem] = (key, up, alpha if alpha in tensors else None)
    for key in tensors:
        if key.endswith(up_suffix) and key.removesuffix(up_suffix) not in stems:
            raise _refuse(path, f"key {key} has no matching {key.removesuffix(up_suffix)}{down_suffix}")
    return stems


def _check_factors(path: Path, key: str, down: np.ndarray, up: np.ndarray) -> None:
    linear = down.ndim == 2 and up.ndim == 2
    conv = down.ndim == 4 and up.ndim == 4 and up.shape[2:] == (1, 1)
    if not (linear or conv) or up.shape[1] != down.shape[0] or down.shape[0] < 1:
        raise _refuse(path, f"key {key}: shapes down {down.shape} / up {up.shape} are not a LoRA pair")
    for name, array in (("down", down), ("up", up)):
        if not np.all(np.isfinite(array)):
            raise _refuse(path, f"key {key}: the {name} factor holds NaN or inf")


def read_lora(path: Path) -> LoraFile:
    """Parse and check one LoRA file (RequestError naming the file and the first bad key)."""
    tensors, metadata = read_safetensors(path)
    keys = list(tensors)
    layout = _layout(path, keys)
    alphas = _peft_alphas(metadata, path) if layout == "peft" else {}
    modules = []
    for stem, (down_key, up_key, alpha_key) in _pairs(path, tensors, layout).items():
        down, up = tensors[down_key], tensors[up_key]
        _check_factors(path, down_key, down, up)
        prefixes = _KOHYA_PREFIX if layout == "kohya" else _PEFT_PREFIX
        prefix = next(p for p in prefixes if stem.startswith(p))
        component, name = prefixes[prefix], stem.removeprefix(prefix)
        alpha: float | None = None
        if alpha_key is not None:
            value = tensors[alpha_key]
            if value.size != 1 or not np.isfinite(value).all():
                raise _refuse(path, f"key {alpha_key}: alpha must be one finite number")
            alpha = float(value.reshape(()))
        elif component in alphas:
            alpha = _pattern_alpha(name, *alphas[component])
        rank = down.shape[0]
        modules.append(
            LoraModule(
                component, name, layout == "peft", down_key, down, up, float(rank) if alpha is None else alpha
            )
        )
    if not modules:
        raise _refuse(path, f"holds no LoRA factors; first key: {keys[0] if keys else '(none)'}")
    return LoraFile(path, layout, tuple(modules))
