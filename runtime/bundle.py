"""Open a bundle directory: `manifest.json` (schema in runtime/manifest.py) plus the files it names.

`Bundle.open` validates the whole manifest, checks that every file it names exists, and verifies the
tokenizer's files; a backend verifies each model's graph and weights just before it loads them
(`Bundle.verified_path`), so a run hashes only what it reads, and only once per stamp.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import RequestError, SetupError
from runtime.integrity import VERIFY_MODES, IntegrityError, Verifier
from runtime.manifest import REEXPORT, DimRange, FileEntry, Manifest, ManifestError, ModelManifest

__all__ = ["VERIFY_MODES", "Bundle", "BundleError", "DimRange", "IntegrityError", "ModelManifest"]


class BundleError(SetupError):
    """The bundle directory is missing, incomplete, damaged or of another format version."""


@dataclass(frozen=True)
class Bundle:
    root: Path
    manifest: Manifest
    verifier: Verifier = field(compare=False, repr=False)

    @classmethod
    def open(cls, root: str | Path, verify: str = "stamp") -> Bundle:
        root = Path(root)
        verifier = Verifier(root, verify)  # RequestError for an unknown mode, before any I/O
        path = root / "manifest.json"
        # A path that holds no bundle at all is the caller's mistake (exit 2 / 4xx); a bundle that is
        # there but damaged is a broken installation (exit 3 / 5xx).
        if not root.is_dir():
            raise RequestError(f"bundle {root} is not a directory: create one with `python -m export`")
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            raise RequestError(
                f"bundle {root} has no manifest.json: create one with `python -m export`"
            ) from None
        except OSError as exc:
            raise BundleError(f"cannot read {path} ({exc.strerror})") from None
        try:
            manifest = Manifest.loads(text)
        except ManifestError as exc:
            raise BundleError(f"bundle {root}: {exc}") from None
        bundle = cls(root, manifest, verifier)
        tokenizer = root / manifest.tokenizer.dir
        if not tokenizer.is_dir():
            raise BundleError(f"bundle {root}: the tokenizer directory {tokenizer} is missing: {REEXPORT}")
        for name, (_, size) in manifest.hashed_files().items():
            file = root / name
            if not file.is_file():
                raise BundleError(f"bundle {root}: {file} is missing (manifest.json names it): {REEXPORT}")
            if size is not None and verify != "off" and file.stat().st_size != size:
                raise BundleError(
                    f"bundle {root}: {file} has {file.stat().st_size} bytes, manifest.json says {size} "
                    f"(truncated or replaced): {REEXPORT}"
                )
        for name, digest in manifest.tokenizer.files.items():
            bundle.verify(f"{manifest.tokenizer.dir}/{name}", digest)
        return bundle

    def verify(self, name: str, sha256: str) -> Path:
        """root/name, once its content matches `sha256` (IntegrityError naming it and the repair)."""
        path = self.root / name
        self.verifier.check(path, sha256, f"{REEXPORT} (bundle {self.root})")
        return path

    def verified_path(self, entry: FileEntry) -> Path:
        """The graph file of `entry`, after verifying it and its external weights."""
        for name, (digest, _) in entry.hashed_files().items():
            self.verify(name, digest)
        return self.root / entry.file

    @property
    def models(self) -> Mapping[str, ModelManifest]:
        return self.manifest.models

    def graph(self, model: str, file_set: str, fused: bool = False) -> FileEntry:
        """The manifest entry of `model` in `file_set` (fp32 / fp16 / int8); `fused`: prefer ORT's
        variant. RequestError when the bundle was exported without that file set."""
        entry = self.models[model]
        if fused and file_set in entry.ort_files:
            return entry.ort_files[file_set]
        if file_set not in entry.files:
            have = ", ".join(sorted(entry.files)) or "none"
            how = "--int8" if file_set == "int8" else f"--precision {file_set}"
            raise RequestError(
                f"precision must be one the bundle has for {model} ({have}); got {file_set!r} "
                f"(add it with `python -m export --model MODEL --out BUNDLE {how}`)"
            )
        return entry.files[file_set]

    @property
    def hidden_size(self) -> int:
        return self.manifest.hidden_size

    @property
    def latent_channels(self) -> int:
        return self.manifest.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.manifest.vae_scale_factor

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self.manifest.scheduler)

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / self.manifest.tokenizer.dir

    @property
    def has_deprojector(self) -> bool:
        return "deprojector" in self.models

    @property
    def unet_in_channels(self) -> int:
        """4, or 9 (runtime.specs.INPAINT_CHANNELS) for an inpainting UNet."""
        channels = self.models["unet"].spec.inputs[0].shape[1]
        assert isinstance(channels, int), "unet.sample's channel dim is fixed"
        return channels

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this many pixels (VAE factor x UNet downsampling)."""
        return self.vae_scale_factor * self.manifest.latent_multiple

    def image_size_range(self) -> tuple[DimRange, DimRange]:
        """Allowed image (height, width) in pixels, from the UNet's latent ranges."""
        unet, f = self.models["unet"], self.vae_scale_factor
        h, w = unet.dims["height"], unet.dims["width"]
        return (DimRange(h.min * f, h.opt * f, h.max * f), DimRange(w.min * f, w.opt * f, w.max * f))
