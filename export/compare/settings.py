"""What one comparison asks for. Both processes read it, so it is plain data with a JSON form."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# In the order a generation first needs them; "vae_encoder" only in bundles exported with it.
COMPONENTS = ("clip", "deprojector", "vae_encoder", "unet", "vae_decoder")
# export.models.PRESETS, repeated so this module stays torch-free
PRESETS = ("tiny", "sd15", "tiny-inpaint", "sd15-inpaint")
STAGES = ("text", "denoise", "decode")  # end-to-end stages, as runtime.pipeline.Result.timings names them
IMAGE_STAGES = ("text", "encode", "denoise", "decode")  # with an init image: its VAE encoding too


class UsageError(ValueError):
    """Bad arguments or an unusable bundle / model / backend combination: exit code 2."""


@dataclass(frozen=True)
class Settings:
    bundle: Path
    model: str  # preset name or diffusers folder the PyTorch side loads
    seed_weights: int  # weight seed of a preset (ignored for folders)
    projection: str | None  # text_projection source of a folder model, from the manifest
    backend: str
    precision: str
    width: int
    height: int
    steps: int
    runs: int
    prompt: str
    negative: str
    seed: int  # initial-latent seed
    scheduler: str
    guidance: float
    mode: str
    threads: int
    bf16: bool  # also time PyTorch under bfloat16 autocast
    out: Path
    cache_intervals: tuple[int, ...] = ()  # step-caching variants the runtime also runs (> 1 each)
    # img2img / inpainting on export/init_images.py's init image at (width, height): None = text to image
    strength: float | None = None  # 0 < strength <= 1
    mask: bool = False  # inpainting with export/init_images.py's mask (needs `strength`)
    # CLIP guidance (runtime/clip_guidance.py): both sides also run one guided generation; 0 = off
    clip_guidance: float = 0.0
    clip_guidance_skip: int = 10

    @property
    def workload(self) -> str:
        """ "text-to-image", "img2img" or "inpainting"."""
        if self.strength is None:
            return "text-to-image"
        return "inpainting" if self.mask else "img2img"

    @property
    def stages(self) -> tuple[str, ...]:
        """The end-to-end stages both sides time for this workload."""
        return STAGES if self.strength is None else IMAGE_STAGES

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Settings:
        return cls(**{
            **d,
            "bundle": Path(d["bundle"]),
            "out": Path(d["out"]),
            "cache_intervals": tuple(d.get("cache_intervals", ())),
            "strength": None if d.get("strength") is None else float(d["strength"]),
            "mask": bool(d.get("mask", False)),
        })  # fmt: skip

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, path: Path) -> Settings:
        return cls.from_json(json.loads(path.read_text()))
