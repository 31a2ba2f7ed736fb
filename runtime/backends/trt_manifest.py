"""The engine manifest (`<bundle>/engines/manifest.json`): what each plan was built from, and for what.

A TensorRT plan is only valid for the ONNX content, TensorRT build (version and CUDA variant: the
cu12 and cu13 wheels share a version string) and GPU architecture it was built with, so the cache
key is content, never a path (TensorRT's demo reuses any file that exists). `python -m
engines.build` writes the entries; TrtBackend refuses every entry whose key no longer matches this
process, says why, and names the command that rebuilds it.

    {"format": "sdrt-engines", "format_version": 1,
     "engines": {"unet.b1-8.512x512": {
        "model": "unet", "plan": "unet.b1-8.512x512.plan", "plan_sha256": ..., "plan_bytes": ...,
        "source": {"file": "unet.fp16.onnx", "sha256": ..., "external_data_sha256": ... | null},
        "profiles": [{"batch": {"min": 1, "opt": 2, "max": 8}, "height": {...}, ...}],
        "flags": {"precision": "fp16", "strongly_typed": true},   (+ "refittable": true: --refittable)
        "settings": {"opt_level": 3 | null, "workspace_gb": 8.0 | null},
        "environment": {"tensorrt": "10.16.1.11", "tensorrt_cuda": "cu13",
                        "cuda_runtime": "13.0", "cuda_driver": "13.0",
                        "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"},
        "build_seconds": 312.4,
        "key": "<sha256 of source, tensorrt, tensorrt_cuda, capability, profiles, flags>"}}}

`tensorrt_cuda` is the CUDA major TensorRT was built for ("cu13"), `cuda_runtime` the libcudart
TensorRT loaded in the building process, `cuda_driver` the CUDA version the driver supports: what
TensorRT and the driver actually use, not cuda-python's own statically linked runtime.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runtime.backends.trt_shapes import Profile
from runtime.bundle import Bundle, DimRange
from runtime.errors import SetupError

FORMAT = "sdrt-engines"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
DEFAULT_DIR = "engines"  # inside the bundle
PRECISION = "fp16"  # engines are built from the bundle's fp16 ONNX (precision lives in the graph)


class EngineManifestError(SetupError):
    """The engine directory's manifest.json is unreadable or of another format (a broken
    installation, not a bad request)."""


@dataclass(frozen=True)
class GpuEnvironment:
    tensorrt: str
    tensorrt_cuda: str  # the CUDA variant of TensorRT's build: "cu12", "cu13" (part of the key)
    cuda_runtime: str
    cuda_driver: str
    gpu: str
    compute_capability: str


@dataclass(frozen=True)
class SourceOnnx:
    file: str
    sha256: str
    external_data_sha256: str | None


@dataclass(frozen=True)
class EngineEntry:
    name: str  # "<model>.<profile label>", also the plan's stem
    model: str
    plan: str
    plan_sha256: str
    plan_bytes: int
    source: SourceOnnx
    profiles: tuple[Profile, ...]
    flags: dict[str, Any]
    settings: dict[str, Any]  # build settings that do not change results (not part of the key)
    environment: GpuEnvironment
    build_seconds: float
    key: str

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["name"]
        data["profiles"] = [{k: asdict(r) for k, r in p.items()} for p in self.profiles]
        return data

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> EngineEntry:
        return cls(
            name=name,
            model=data["model"],
            plan=data["plan"],
            plan_sha256=data["plan_sha256"],
            plan_bytes=int(data["plan_bytes"]),
            source=SourceOnnx(**data["source"]),
            profiles=tuple({k: DimRange(**r) for k, r in p.items()} for p in data["profiles"]),
            flags=dict(data["flags"]),
            settings=dict(data["settings"]),
            # manifests written before the CUDA variant was recorded: "" (stale until rebuilt)
            environment=GpuEnvironment(**{"tensorrt_cuda": "", **data["environment"]}),
            build_seconds=float(data["build_seconds"]),
            key=data["key"],
        )


def cache_key(
    source: SourceOnnx, env: GpuEnvironment, profiles: tuple[Profile, ...], flags: dict[str, Any]
) -> str:
    """sha256 over everything a plan depends on: the ONNX content, TensorRT (version and CUDA
    variant), the GPU architecture, the optimisation profiles and the precision flags. The GPU's
    name, the CUDA runtime and driver versions are recorded but not part of it."""
    fields = {
        "source": asdict(source),
        "tensorrt": env.tensorrt,
        "tensorrt_cuda": env.tensorrt_cuda,
        "compute_capability": env.compute_capability,
        "profiles": [{k: asdict(r) for k, r in sorted(p.items())} for p in profiles],
        "flags": flags,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def entry_key(entry: EngineEntry, env: GpuEnvironment, source: SourceOnnx) -> str:
    """The key `entry` would have if it were built here, now, from `source`."""
    return cache_key(source, env, entry.profiles, entry.flags)


def source_onnx(bundle: Bundle, model: str) -> SourceOnnx:
    """The fp16 ONNX an engine for `model` is built from, with the hashes the bundle recorded."""
    f = bundle.graph(model, PRECISION)
    return SourceOnnx(f.file, f.sha256, f.external_data_sha256)


def stale_reasons(entry: EngineEntry, env: GpuEnvironment, source: SourceOnnx) -> list[str]:
    """Why `entry` cannot run here (empty if it can)."""
    built, reasons = entry.environment, []
    if entry.source != source:
        was, now = entry.source.sha256[:12], source.sha256[:12]
        reasons.append(f"{source.file} or its weights changed since the build (sha256 {was} -> {now})")
    if built.tensorrt != env.tensorrt:
        reasons.append(f"built with TensorRT {built.tensorrt}, this process has {env.tensorrt}")
    elif built.tensorrt_cuda != env.tensorrt_cuda:
        was = built.tensorrt_cuda or "an unrecorded CUDA variant"
        reasons.append(
            f"built with TensorRT {built.tensorrt} for {was}, this process has its {env.tensorrt_cuda} build"
        )
    if built.compute_capability != env.compute_capability:
        reasons.append(
            f"built for compute capability {built.compute_capability} ({built.gpu}), "
            f"this GPU is {env.compute_capability} ({env.gpu})"
        )
    if not reasons and entry.key != entry_key(entry, env, source):
        reasons.append("its key does not match its recorded fields (manifest.json was edited)")
    return reasons


def build_command(bundle_root: Path, engine_dir: Path, stale_only: bool, extra: Sequence[str] = ()) -> str:
    """The exact command that (re)builds engines for this bundle and engine directory; `extra`
    arguments (say `--shapes 640x512`) are appended."""
    parts = ["python", "-m", "engines.build", str(bundle_root)]
    if engine_dir.resolve() != (bundle_root / DEFAULT_DIR).resolve():
        parts += ["--engine-dir", str(engine_dir)]
    if stale_only:
        parts.append("--rebuild-stale")
    return shlex.join([*parts, *extra])


def read_manifest(engine_dir: Path) -> dict[str, EngineEntry]:
    """Entries by name; an engine directory without a manifest has none."""
    path = engine_dir / MANIFEST
    if not path.is_file():
        return {}
    advice = "delete it and rebuild the engines"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineManifestError(f"{path} is unreadable ({exc}); {advice}") from exc
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or data.get("format_version") != FORMAT_VERSION
    ):
        raise EngineManifestError(f"{path} is not an {FORMAT!r} v{FORMAT_VERSION} manifest; {advice}")
    try:
        return {name: EngineEntry.from_json(name, e) for name, e in data["engines"].items()}
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineManifestError(f"{path} has a malformed entry ({exc!r}); {advice}") from exc


def manifest_text(entries: dict[str, EngineEntry]) -> str:
    engines = {name: entries[name].to_json() for name in sorted(entries)}
    return (
        json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "engines": engines}, indent=2) + "\n"
    )
