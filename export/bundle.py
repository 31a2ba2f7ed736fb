"""Writing a bundle directory: manifest entries, atomic commit, and reuse of an unchanged bundle.

The manifest is written through runtime/manifest.py's classes, the ones the runtime reads it with;
its `export` block (the exporter's record) holds the fingerprint that decides reuse. Everything is
written into a hidden staging directory inside the bundle and renamed into place; the old manifest
is removed first and the new one written last, so a reader never sees a manifest that names half-
written files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

from runtime.bundle import Bundle
from runtime.errors import SetupError
from runtime.files import sha256_file, write_atomic
from runtime.integrity import STAMP_NAME
from runtime.manifest import FileEntry, Manifest, ManifestError

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


def file_entry(root: Path, name: str, external_data: str | None, **extra: Any) -> FileEntry:
    """A model file set's entry: the .onnx (and its single data file, if any) with sha256 and size."""
    return FileEntry(
        file=name,
        sha256=sha256_file(root / name),
        bytes=(root / name).stat().st_size,
        external_data=external_data,
        external_data_sha256=None if external_data is None else sha256_file(root / external_data),
        external_data_bytes=None if external_data is None else (root / external_data).stat().st_size,
        **extra,
    )


def dir_hashes(root: Path, name: str) -> dict[str, str]:
    """sha256 per file of a bundle subdirectory, so runtime and reuse verify them like the models."""
    folder = root / name
    return {str(f.relative_to(folder)): sha256_file(f) for f in _files_under(folder)}


def _read_manifest(root: Path) -> Manifest | None:
    try:
        return Manifest.loads((root / MANIFEST).read_bytes())
    except (OSError, ManifestError):
        return None


def reusable(root: Path, fingerprint: dict[str, Any]) -> tuple[Manifest | None, str]:
    """The existing manifest if the bundle was exported from the same inputs and is intact.

    Returns (manifest or None, reason) — the reason is logged when the bundle is rebuilt.
    """
    try:
        manifest = Manifest.loads((root / MANIFEST).read_bytes())
    except OSError:
        return None, "no bundle there yet"
    except ManifestError as err:
        return None, f"the runtime cannot read its manifest ({err})"
    if manifest.export.get("fingerprint") != fingerprint:
        return None, "inputs, options, package versions or exporter code changed"
    for name, (digest, _) in manifest.hashed_files().items():
        path = root / name
        if not path.is_file() or sha256_file(path) != digest:
            return None, f"{name} is missing or its sha256 does not match the manifest"
    try:
        Bundle.open(root, verify="off")  # just hashed everything
    except SetupError as err:
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

    def commit(self, manifest: Manifest) -> None:
        """Move the staged files into the bundle, drop files the old manifest had, write the manifest."""
        old = _read_manifest(self.root)
        (self.root / MANIFEST).unlink(missing_ok=True)
        (self.root / STAMP_NAME).unlink(missing_ok=True)  # the runtime's verification record
        new_files = set(manifest.hashed_files())
        in_dirs = tuple(f"{d}/" for d in _DIRS)
        for name in sorted(new_files):
            if not name.startswith(in_dirs):
                os.replace(self.dir / name, self.root / name)
        for name in _DIRS:  # whole directories: move the old one out of the way, then swap
            if (self.root / name).exists():
                os.replace(self.root / name, self.dir / f"{name}.old")
            if (self.dir / name).exists():
                os.replace(self.dir / name, self.root / name)
        for name in old.hashed_files() if old is not None else ():
            if name not in new_files and not name.startswith(in_dirs):
                (self.root / name).unlink(missing_ok=True)
        write_atomic(self.root / MANIFEST, manifest.dumps())
