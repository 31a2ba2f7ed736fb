"""LoRA at run time, without re-export: read kohya / diffusers-PEFT files, map their modules to the
bundle's ONNX initializers, merge W' = W + sum_i scale_i * (alpha_i / r_i) * up_i @ down_i, and hand
the merged arrays to the backend as a `WeightSet` (`Backend.set_weights`).

The contract between the request (`GenerateOptions.loras`), the preparation (`prepare.py`, its LRU)
and the backends (ONNX Runtime and OpenVINO here, TensorRT by refit) is the three types below.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import RequestError

MAX_SCALE = 10.0  # |scale|; A1111 and diffusers take any, beyond this a LoRA only makes noise
DEFAULT_CACHE_SIZE = 2  # prepared weight sets kept (alternating between two LoRAs costs nothing)
MAX_CACHE_SIZE = 64
LORA_MODELS = ("clip", "unet")  # the text-encoder LoRA goes to clip; the UNet LoRA to every UNet graph


@dataclass(frozen=True)
class LoraRef:
    """One LoRA a request asks for: a .safetensors file and its strength (A1111's `<lora:name:scale>`)."""

    path: Path
    scale: float = 1.0


@dataclass(frozen=True, eq=False)
class WeightSet:
    """The merged weights of one model under one LoRA set, ready for a backend.

    `arrays` maps ONNX initializer names of the graph file the backend runs (the bundle's fp32 or
    fp16 file of that model) to arrays in that initializer's dtype (float32 / float16) and stored
    layout (Linear weights as the exporter stored them, transposed: (in, out); Conv weights
    (out, in, kh, kw)). Only initializers some LoRA touches are present: every other one keeps the
    bundle's value. `key` identifies the LoRA set: ((sha256 of file, scale), ...) in request order.
    """

    key: tuple[tuple[str, float], ...]
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class LoraSettings:
    """Per pipeline (server-wide): how many prepared weight sets the LRU keeps."""

    cache_size: int = DEFAULT_CACHE_SIZE

    def validate(self) -> LoraSettings:
        size = self.cache_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_CACHE_SIZE:
            raise RequestError(
                f"lora cache size must be an integer from 1 to {MAX_CACHE_SIZE}; got {size!r:.40}"
            )
        return self


def check_refs(loras: object) -> tuple[LoraRef, ...]:
    """The request's LoRAs, checked before anything is read: RequestError naming the bad one.

    Each must be a regular `.safetensors` file, with a finite scale, |scale| <= MAX_SCALE; the same
    file twice is refused (give one entry with the summed scale instead)."""
    if not isinstance(loras, (tuple, list)):
        raise RequestError(f"loras must be a list of LoRA references; got {type(loras).__name__}")
    seen: set[Path] = set()
    checked = []
    for ref in loras:
        if not isinstance(ref, LoraRef):
            raise RequestError(f"loras: each entry must be a LoraRef (path, scale); got {type(ref).__name__}")
        path = Path(ref.path)
        scale = ref.scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or abs(scale) > MAX_SCALE:  # fmt: skip
            raise RequestError(
                f"lora {path}: scale must be a finite number from {-MAX_SCALE:g} to {MAX_SCALE:g}; "
                f"got {scale!r:.40}"
            )
        if path.suffix != ".safetensors":
            raise RequestError(f"lora {path}: only .safetensors files are read (pickle files can run code)")
        if not path.is_file():
            raise RequestError(f"lora {path}: no such file")
        resolved = path.resolve()
        if resolved in seen:
            raise RequestError(f"lora {path}: given twice; give it once with the summed scale")
        seen.add(resolved)
        checked.append(LoraRef(path, float(scale)))
    return tuple(checked)


__all__ = ["LORA_MODELS", "MAX_SCALE", "LoraRef", "LoraSettings", "WeightSet", "check_refs"]
