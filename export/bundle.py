"""Writing a bundle directory: manifest entries, atomic commit, and reuse of an unchanged bundle.

The manifest follows runtime/bundle.py's schema (which the runtime reads) plus extra keys:
sha256/bytes of every file (external data and tokenizer files too), TensorRT op warnings, and
an `export` block whose fingerprint decides reuse. Everything is written into a hidden staging
directory inside the bundle and renamed into place; the old manifest is removed first and the
new one written last, so a reader never sees a manifest that names half-written files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from runtime.bundle import FORMAT, FORMAT_VERSION, Bundle, BundleError
from runtime.files import sha256_file, write_atomic
from runtime.specs import ModelSpec, TensorSpec

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
DEPROJECTOR_DIR = "deprojector_checkpoint"  # the PyTorch weights deprojector.onnx was traced from
_DIRS = (TOKENIZER_DIR, DEPROJECTOR_DIR)  # manifest keys "tokenizer" / "deprojector" name them
_STAGING_PREFIX = ".export-staging-"
PACKAGES = (
    "torch", "diffusers", "transformers", "onnx", "onnxruntime", "onnxscript", "polygraphy",
    "onnx-graphsurgeon", "numpy", "safetensors", "tokenizers",
)  # fmt: skip
# Sources whose change alters the exported files (a code change must not reuse a stale bundle).
_EXPORTER_SOURCES = (
    "onnx_export.py", "onnx_io.py", "graph.py", "fp16.py", "fusion.py", "build.py", "models.py",
    "tokenizer_files.py", "trt_supported_ops.txt", "deprojector",
)  # fmt: skip


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def dir_signature(path: Path) -> str:
    """A cheap identity of a model/checkpoint folder: relative paths, sizes and mtimes."""
    digest = hashlib.sha256()
    for file in _files_under(path):
        stat = file.stat()
        digest.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def exporter_digest() -> str:
    """sha256 over the exporter's own sources."""
    root = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _EXPORTER_SOURCES:
        target = root / name
        for file in _files_under(target) if target.is_dir() else [target]:
            if file.suffix in (".py", ".txt"):
                digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def file_entry(root: Path, name: str, external_data: str | None) -> dict[str, Any]:
    """`files.<precision>` entry: the .onnx (and its single data file, if any) with sha256 and size."""
    entry: dict[str, Any] = {
        "file": name,
        "sha256": sha256_file(root / name),
        "bytes": (root / name).stat().st_size,
        "external_data": external_data,
    }
    if external_data is not None:
        entry["external_data_sha256"] = sha256_file(root / external_data)
        entry["external_data_bytes"] = (root / external_data).stat().st_size
    return entry


def _tensor(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


def model_entry(
    spec: ModelSpec, dims: dict[str, dict[str, int]], opset: int, files: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    return {
        "inputs": [_tensor(t) for t in spec.inputs],
        "outputs": [_tensor(t) for t in spec.outputs],
        "dims": dims,
        "opset": opset,
        "files": files,
    }


def dir_entry(root: Path, name: str) -> dict[str, str]:
    """sha256 per file of a bundle subdirectory, so reuse can verify them like the models."""
    folder = root / name
    return {str(f.relative_to(folder)): sha256_file(f) for f in _files_under(folder)}


def manifest_files(manifest: dict[str, Any]) -> dict[str, str]:
    """Every file the manifest vouches for (bundle-relative path -> sha256)."""
    files: dict[str, str] = {}
    for model in manifest.get("models", {}).values():
        for entry in [*model["files"].values(), *model.get("ort_files", {}).values()]:
            files[entry["file"]] = entry["sha256"]
            if entry.get("external_data"):
                files[entry["external_data"]] = entry["external_data_sha256"]
    for key in ("tokenizer", "deprojector"):
        section = manifest.get(key) or {}
        for name, digest in section.get("files", {}).items():
            files[f"{section['dir']}/{name}"] = digest
    return files


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        manifest: dict[str, Any] = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return (
        manifest
        if manifest.get("format") == FORMAT and manifest.get("format_version") == FORMAT_VERSION
        else None
    )


def reusable(root: Path, fingerprint: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The existing manifest if the bundle was exported from the same inputs and is intact.

    Returns (manifest or None, reason) — the reason is logged when the bundle is rebuilt.
    """
    manifest = _read_manifest(root)
    if manifest is None:
        return None, "no bundle there yet"
    if manifest.get("export", {}).get("fingerprint") != fingerprint:
        return None, "inputs, options, package versions or exporter code changed"
    for name, digest in manifest_files(manifest).items():
        path = root / name
        if not path.is_file() or sha256_file(path) != digest:
            return None, f"{name} is missing or its sha256 does not match the manifest"
    try:
        Bundle.open(root)
    except (BundleError, KeyError, TypeError) as err:
        return None, f"the runtime cannot open it ({err})"
    return manifest, "same inputs, sha256 verified"


def _remove_orphaned_staging(root: Path) -> None:
    """Delete staging directories left by an export that was killed (its process is gone)."""
    for path in root.glob(f"{_STAGING_PREFIX}*-*"):
        pid = path.name[len(_STAGING_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


class Staging:
    """A hidden directory inside the bundle where new files are written before the commit.

    On exit without commit (an error, Ctrl-C) the staging directory is deleted and the old
    bundle is left as it was.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        _remove_orphaned_staging(root)
        self.dir = Path(tempfile.mkdtemp(dir=root, prefix=f"{_STAGING_PREFIX}{os.getpid()}-"))

    def __enter__(self) -> Staging:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def commit(self, manifest: dict[str, Any]) -> None:
        """Move the staged files into the bundle, drop files the old manifest had, write the manifest."""
        old = _read_manifest(self.root)
        (self.root / MANIFEST).unlink(missing_ok=True)
        new_files = set(manifest_files(manifest))
        in_dirs = tuple(f"{d}/" for d in _DIRS)
        for name in sorted(new_files):
            if not name.startswith(in_dirs):
                os.replace(self.dir / name, self.root / name)
        for name in _DIRS:  # whole directories: move the old one out of the way, then swap
            if (self.root / name).exists():
                os.replace(self.root / name, self.dir / f"{name}.old")
            if (self.dir / name).exists():
                os.replace(self.dir / name, self.root / name)
        for name in manifest_files(old or {}):
            if name not in new_files and not name.startswith(in_dirs):
                (self.root / name).unlink(missing_ok=True)
        write_atomic(self.root / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
