"""Read a bundle directory: `manifest.json` plus the ONNX files and tokenizer it names.

The manifest is what makes a bundle self-describing (written by `python -m export`):

    {
      "format": "sdrt-bundle", "format_version": 1,
      "source": {"kind": "preset", "preset": "tiny", "seed": 0} | {"kind": "diffusers_folder", ...},
      "packages": {"torch": "2.13.0+cpu", "diffusers": ..., "onnx": ..., ...},
      "hidden_size": 768, "projection_dim": 768 | null,
      "latent_channels": 4, "vae_scale_factor": 8, "vae_scaling": 0.18215,
      "latent_multiple": 8,   # latent sides must divide by the UNet's total downsampling
      "tokenizer": {"dir": "tokenizer", "context_length": 77, "bos_id": 49406, "eos_id": 49407,
                    "pad_id": 49407},
      "scheduler": {... diffusers scheduler_config.json ...},
      "deprojector": null | {"variant": "v1", "checkpoint": "...", "input": "pooled"},
      "models": {
        "clip" | "deprojector" | "unet" | "vae_decoder": {
          "inputs":  [{"name": ..., "dtype": "float32", "shape": ["batch", 77, 768]}, ...],
          "outputs": [...],
          "dims": {"batch": {"min": 1, "opt": 2, "max": 8}, "height": {...}, ...},
          "opset": 18,
          "files": {"fp32": {"file": "unet.onnx", "sha256": "...", "bytes": 123,
                             "external_data": "unet.onnx.data" | null},
                    "fp16": {...}},
          "ort_files": {"fp32": {"file": "unet.ort.onnx", ..., "external_data": "unet.onnx.data",
                                 "fused": {"MultiHeadAttention": 32}}}   # optional, see below
        }
      }
    }

Inputs and outputs stay float32 in both precisions (the fp16 graphs cast inside), so a backend
feeds the same arrays whichever file it loads. `ort_files` are the same graphs with ONNX Runtime
contrib-op fusions (export/fusion.py), sharing the standard file's weights; ONNX Runtime on CPU
or CUDA prefers them, TensorRT always reads `files`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.specs import ModelSpec, TensorSpec

FORMAT = "sdrt-bundle"
FORMAT_VERSION = 1
MODEL_NAMES = ("clip", "deprojector", "unet", "vae_decoder")
PRECISIONS = ("fp32", "fp16")
# Top-level manifest keys the runtime reads. A key added to the format later (latent_multiple)
# is checked here too, so a bundle exported before it fails at open with advice, not later.
REQUIRED_KEYS = (
    "models", "hidden_size", "latent_channels", "vae_scale_factor", "latent_multiple", "scheduler",
    "tokenizer",
)  # fmt: skip


class BundleError(ValueError):
    """The bundle directory is missing, incomplete or of another format version."""


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class ModelEntry:
    spec: ModelSpec
    dims: dict[str, DimRange]
    files: dict[str, Path]  # precision -> absolute path of the .onnx
    ort_files: dict[str, Path] = field(default_factory=dict)  # precision -> ORT-fused variant

    def ort_path(self, precision: str) -> Path:
        """The graph ONNX Runtime should load: the fused variant when the bundle has one."""
        return self.ort_files.get(precision) or self.path(precision)

    def path(self, precision: str) -> Path:
        if precision not in self.files:
            have = ", ".join(sorted(self.files)) or "none"
            raise BundleError(
                f"precision must be one the bundle has for {self.spec.name} ({have}); got {precision!r}"
            )
        return self.files[precision]


def _tensor(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(d["name"], d["dtype"], tuple(d["shape"]))


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: dict[str, Any]
    models: dict[str, ModelEntry]

    @classmethod
    def open(cls, root: str | Path) -> Bundle:
        root = Path(root)
        manifest_path = root / "manifest.json"
        if not manifest_path.is_file():
            raise BundleError(f"bundle {root} has no manifest.json: create one with `python -m export`")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise BundleError(
                f"bundle {root} is format {manifest.get('format')!r} v{manifest.get('format_version')}; "
                f"this runtime reads {FORMAT!r} v{FORMAT_VERSION}: re-export it with `python -m export`"
            )
        missing = [key for key in REQUIRED_KEYS if key not in manifest]
        if missing:
            raise BundleError(
                f"bundle {root}: manifest.json lacks {', '.join(missing)} (exported by an older sdrt): "
                "re-export it with `python -m export`"
            )
        models = {}
        for name, m in manifest["models"].items():
            files = {p: root / f["file"] for p, f in m["files"].items()}
            ort_files = {p: root / f["file"] for p, f in m.get("ort_files", {}).items()}
            for precision, path in [*files.items(), *ort_files.items()]:
                if not path.is_file():
                    raise BundleError(f"bundle {root}: {name} ({precision}) file {path.name} is missing")
            spec = ModelSpec(name, tuple(map(_tensor, m["inputs"])), tuple(map(_tensor, m["outputs"])))
            dims = {k: DimRange(**v) for k, v in m["dims"].items()}
            models[name] = ModelEntry(spec, dims, files, ort_files)
        for required in ("clip", "unet", "vae_decoder"):
            if required not in models:
                raise BundleError(f"bundle {root} lacks the {required} model")
        return cls(root, manifest, models)

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def vae_scale_factor(self) -> int:
        return int(self.manifest["vae_scale_factor"])

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.manifest["scheduler"])

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / str(self.manifest["tokenizer"]["dir"])

    @property
    def has_deprojector(self) -> bool:
        return "deprojector" in self.models

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels (VAE factor x UNet downsampling)."""
        return self.vae_scale_factor * int(self.manifest["latent_multiple"])

    def image_size_range(self) -> tuple[DimRange, DimRange]:
        """Allowed image (height, width) in pixels, from the UNet's latent ranges."""
        unet, f = self.models["unet"], self.vae_scale_factor
        h, w = unet.dims["height"], unet.dims["width"]
        return (DimRange(h.min * f, h.opt * f, h.max * f), DimRange(w.min * f, w.opt * f, w.max * f))
