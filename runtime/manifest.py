"""`manifest.json`, the bundle's contract, as frozen dataclasses: the exporter writes it through
`Manifest.to_json` and the runtime reads it through `Manifest.from_json`, so the two cannot drift.

    {
      "format": "sdrt-bundle", "format_version": 2,
      "source": {"kind": "preset", "preset": "tiny", "seed": 0, ...},   # where the weights came from
      "packages": {"torch": "2.13.0+cpu", ...},                        # what exported it
      "hidden_size": 768, "projection_dim": 768 | null,
      "latent_channels": 4, "vae_scale_factor": 8, "vae_scaling": 0.18215, "sample_size": 64,
      "latent_multiple": 8,         # latent sides must divide by the UNet's total downsampling
      "scheduler": {... diffusers scheduler_config.json ...},
      "tokenizer": {"dir": "tokenizer", "context_length": 77, "bos_id": 49406, "eos_id": 49407,
                    "pad_id": 49407, "files": {"vocab.json": "<sha256>", ...}},
      "deprojector": null | {"variant": "v3", "checkpoint": "...", "input": "pooled",
                             "dir": "deprojector_checkpoint", "files": {...}},
      "vision": {"image_size": 224, "mean": [...], "std": [...], "source": "safety_checker"},  # optional,
                                                              # with models.clip_vision (CLIP score)
      "models": {
        "clip" | "deprojector" | "unet" | "vae_encoder" | "vae_decoder"
        | "unet_deepcache_full" | "unet_deepcache_shallow"          # these two: export --deepcache
        | "clip_vision" | "clip_guidance": {                        # the last: export --clip-guidance
          "inputs":  [{"name": "sample", "dtype": "float32", "shape": ["batch", 4, "height", "width"]}],
          "outputs": [...],
          "dims": {"batch": {"min": 1, "opt": 2, "max": 8}, ...},
          "opset": 18,
          "files": {"fp32": {"file": "unet.onnx", "sha256": "...", "bytes": 123,
                             "external_data": "unet.onnx.data" | null, "external_data_sha256": ...,
                             "external_data_bytes": ..., "trt_unsupported_ops": []},
                    "fp16": {...},
                    "int8": {"file": "unet.int8.xml", "external_data": "unet.int8.bin", ...}},  # --int8
          "ort_files": {"fp32": {... "fused": {"MultiHeadAttention": 32}}}     # optional
        }
      },
      "warnings": [...], "export": {"fingerprint": {...}, "stages": [...], ...,  # the exporter's record
                                    "int8": {"scheme": "hybrid", "overflow_fix": "enable",  # Int8Record
                                             "calibration": {"sha256": ..., ...}, "models": {...}}}
    }

Inputs and outputs stay float32 in every precision (the fp16 graphs cast inside), so a backend
feeds the same arrays whichever file it loads. `ort_files` are the same graphs with ONNX Runtime
contrib-op fusions (export/fusion.py) sharing the standard file's weights; ONNX Runtime on CPU or
CUDA prefers them, TensorRT and OpenVINO read `files`.

Format 2 (this one) added the typed schema, full validation at open, and hashes of the tokenizer
files; a format-1 bundle is refused with the re-export command. The step-caching graphs
(`unet_deepcache_*`) are optional models added within format 2, and so are the int8 file set (an
OpenVINO IR, export/int8.py), `vae_encoder` (img2img, inpainting) and `clip_guidance` (the
gradient of CLIP guidance, with `clip_vision`): older bundles still open.
An inpainting UNet is told by its `sample` input's channels (9 instead of 4).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from runtime.errors import SetupError
from runtime.specs import CLIP_GUIDANCE, CLIP_VISION, DEEPCACHE_FULL, DEEPCACHE_SHALLOW, ModelSpec, TensorSpec

FORMAT = "sdrt-bundle"
FORMAT_VERSION = 2
MODEL_NAMES = (
    "clip", "deprojector", "unet", "vae_encoder", "vae_decoder", DEEPCACHE_FULL, DEEPCACHE_SHALLOW,
    CLIP_VISION, CLIP_GUIDANCE,
)  # fmt: skip
REQUIRED_MODELS = ("clip", "unet", "vae_decoder")
OPTIONAL_MODELS = tuple(name for name in MODEL_NAMES if name not in REQUIRED_MODELS)
FILE_SETS = ("fp32", "fp16", "int8")  # int8: OpenVINO IR (export --int8), UNets and optionally the VAE
REEXPORT = "re-export it with `python -m export --model MODEL --out BUNDLE`"
# NNCF's overflow fix, as `export --int8` recorded it: "enable" keeps weights to 7 bits (no int16
# saturation on x86 without VNNI/AMX), "first_layer_only" only in the first layer (NNCF's default,
# and what every bundle quantized before the choice was recorded used).
OVERFLOW_FIXES = ("enable", "first_layer_only")

T = TypeVar("T")


class ManifestError(SetupError):
    """manifest.json is not a valid manifest of this format; the message names the key."""


class _Fields:
    """Typed reads from one JSON object, each failure naming the key path (`models.unet.opset`)."""

    def __init__(self, data: object, path: str):
        if not isinstance(data, dict):
            raise ManifestError(f"{path or 'manifest.json'} must be a JSON object; got {type(data).__name__}")
        self.data: dict[str, Any] = data
        self.path = path

    def _where(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: type[T] | tuple[type, ...], optional: bool = False) -> Any:
        if key not in self.data or (optional and self.data[key] is None):
            if optional:
                return None
            raise ManifestError(f"manifest.json lacks {self._where(key)}: {REEXPORT}")
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ManifestError(f"manifest.json: {self._where(key)} must be {names}; got {value!r:.80}")
        return value

    def integer(self, key: str, minimum: int = 0) -> int:
        value: int = self.get(key, int)
        if value < minimum:
            raise ManifestError(f"manifest.json: {self._where(key)} must be >= {minimum}; got {value}")
        return value

    def text(self, key: str) -> str:
        value: str = self.get(key, str)
        return value

    def sub(self, key: str) -> _Fields:
        return _Fields(self.get(key, dict), self._where(key))

    def items(self, key: str) -> list[tuple[str, _Fields]]:
        section = self.sub(key)
        return [(name, section.sub(name)) for name in section.data]


def _relative(name: str, where: str) -> str:
    """Bundle files are plain relative paths: no absolute paths, no `..` out of the bundle."""
    parts = name.replace("\\", "/").split("/")
    if not name or name.startswith("/") or ".." in parts or "" in parts:
        raise ManifestError(f"manifest.json: {where} must be a path inside the bundle; got {name!r}")
    return name


def _sha256(value: str, where: str) -> str:
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ManifestError(f"manifest.json: {where} must be a sha256 hex digest; got {value!r:.80}")
    return value


@dataclass(frozen=True)
class FileEntry:
    """One graph file (and its external weights, if any) with the hashes that vouch for it."""

    file: str
    sha256: str
    bytes: int
    external_data: str | None = None
    external_data_sha256: str | None = None
    external_data_bytes: int | None = None
    trt_unsupported_ops: tuple[str, ...] = ()
    fused: Mapping[str, int] = field(default_factory=dict)  # ORT variants: fused op -> count

    @classmethod
    def from_json(cls, f: _Fields) -> FileEntry:
        data = f.get("external_data", str, optional=True)
        entry = cls(
            file=_relative(f.text("file"), f._where("file")),
            sha256=_sha256(f.text("sha256"), f._where("sha256")),
            bytes=f.integer("bytes"),
            external_data=None if data is None else _relative(data, f._where("external_data")),
            external_data_sha256=None
            if data is None
            else _sha256(f.text("external_data_sha256"), f._where("external_data_sha256")),
            external_data_bytes=None if data is None else f.integer("external_data_bytes"),
            trt_unsupported_ops=tuple(f.get("trt_unsupported_ops", list, optional=True) or ()),
            fused={k: int(v) for k, v in (f.get("fused", dict, optional=True) or {}).items()},
        )
        return entry

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"file": self.file, "sha256": self.sha256, "bytes": self.bytes,
                               "external_data": self.external_data}  # fmt: skip
        if self.external_data is not None:
            out["external_data_sha256"] = self.external_data_sha256
            out["external_data_bytes"] = self.external_data_bytes
        if self.trt_unsupported_ops:
            out["trt_unsupported_ops"] = list(self.trt_unsupported_ops)
        if self.fused:
            out["fused"] = dict(self.fused)
        return out

    def hashed_files(self) -> dict[str, tuple[str, int]]:
        """Bundle-relative path -> (sha256, bytes) of the graph and its weights."""
        files = {self.file: (self.sha256, self.bytes)}
        if self.external_data is not None:
            assert self.external_data_sha256 is not None and self.external_data_bytes is not None
            files[self.external_data] = (self.external_data_sha256, self.external_data_bytes)
        return files


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    @classmethod
    def from_json(cls, f: _Fields) -> DimRange:
        r = cls(f.integer("min", 1), f.integer("opt", 1), f.integer("max", 1))
        if not r.min <= r.opt <= r.max:
            raise ManifestError(f"manifest.json: {f.path} must have min <= opt <= max; got {f.data}")
        return r

    def to_json(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def _tensor_from_json(f: _Fields) -> TensorSpec:
    shape = f.get("shape", list)
    if not all(isinstance(d, (int, str)) and not isinstance(d, bool) for d in shape):
        raise ManifestError(f"manifest.json: {f._where('shape')} must hold ints and names; got {shape}")
    return TensorSpec(f.text("name"), f.text("dtype"), tuple(shape))


def _tensor_to_json(t: TensorSpec) -> dict[str, Any]:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}


@dataclass(frozen=True)
class ModelManifest:
    spec: ModelSpec
    dims: Mapping[str, DimRange]
    opset: int
    files: Mapping[str, FileEntry]  # file set (fp32 / fp16) -> graph
    ort_files: Mapping[str, FileEntry] = field(default_factory=dict)  # ORT-fused variants

    @classmethod
    def from_json(cls, name: str, f: _Fields) -> ModelManifest:
        def tensors(key: str) -> tuple[TensorSpec, ...]:
            items = f.get(key, list)
            return tuple(_tensor_from_json(_Fields(t, f"{f._where(key)}[{i}]")) for i, t in enumerate(items))

        files = {p: FileEntry.from_json(e) for p, e in f.items("files")}
        ort_files = (
            {p: FileEntry.from_json(e) for p, e in f.items("ort_files")} if "ort_files" in f.data else {}
        )
        for precision in [*files, *ort_files]:
            if precision not in FILE_SETS:
                raise ManifestError(
                    f"manifest.json: {f.path} has file set {precision!r}; known: {', '.join(FILE_SETS)}"
                )
        if not files:
            raise ManifestError(f"manifest.json: {f._where('files')} names no file")
        return cls(
            spec=ModelSpec(name, tensors("inputs"), tensors("outputs")),
            dims={k: DimRange.from_json(d) for k, d in f.items("dims")},
            opset=f.integer("opset", 1),
            files=files,
            ort_files=ort_files,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "inputs": [_tensor_to_json(t) for t in self.spec.inputs],
            "outputs": [_tensor_to_json(t) for t in self.spec.outputs],
            "dims": {k: d.to_json() for k, d in self.dims.items()},
            "opset": self.opset,
            "files": {p: e.to_json() for p, e in self.files.items()},
        }
        if self.ort_files:
            out["ort_files"] = {p: e.to_json() for p, e in self.ort_files.items()}
        return out


def _hashes(f: _Fields, key: str) -> dict[str, str]:
    section = f.sub(key)
    return {
        _relative(name, section._where(name)): _sha256(section.text(name), section._where(name))
        for name in section.data
    }


@dataclass(frozen=True)
class TokenizerManifest:
    dir: str
    context_length: int
    bos_id: int
    eos_id: int
    pad_id: int
    files: Mapping[str, str]  # file inside `dir` -> sha256

    @classmethod
    def from_json(cls, f: _Fields) -> TokenizerManifest:
        return cls(
            dir=_relative(f.text("dir"), f._where("dir")),
            context_length=f.integer("context_length", 1),
            bos_id=f.integer("bos_id"),
            eos_id=f.integer("eos_id"),
            pad_id=f.integer("pad_id"),
            files=_hashes(f, "files"),
        )

    def to_json(self) -> dict[str, Any]:
        return {"dir": self.dir, "context_length": self.context_length, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "pad_id": self.pad_id, "files": dict(self.files)}  # fmt: skip


@dataclass(frozen=True)
class DeprojectorManifest:
    """Which deprojector `deprojector.onnx` was traced from, and its PyTorch checkpoint folder."""

    variant: str
    checkpoint: str
    input: str
    dir: str
    files: Mapping[str, str]

    @classmethod
    def from_json(cls, f: _Fields) -> DeprojectorManifest:
        return cls(f.text("variant"), f.text("checkpoint"), f.text("input"),
                   _relative(f.text("dir"), f._where("dir")), _hashes(f, "files"))  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return {"variant": self.variant, "checkpoint": self.checkpoint, "input": self.input,
                "dir": self.dir, "files": dict(self.files)}  # fmt: skip


@dataclass(frozen=True)
class VisionManifest:
    """How `clip_vision` wants its pixels (CLIPImageProcessor's rule): the shortest side resized to
    `image_size` (bicubic), the centre `image_size` square cut out, scaled to [0, 1], then
    normalized by `mean`/`std` per channel; and where the tower came from."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # "preset", "image_encoder" (CLIPVisionModelWithProjection) or "safety_checker"

    @classmethod
    def from_json(cls, f: _Fields) -> VisionManifest:
        def triple(key: str) -> tuple[float, float, float]:
            values = f.get(key, list)
            if len(values) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
            ):
                raise ManifestError(f"manifest.json: {f._where(key)} must be 3 numbers; got {values!r:.80}")
            return (float(values[0]), float(values[1]), float(values[2]))

        std = triple("std")
        if min(std) <= 0:
            raise ManifestError(f"manifest.json: {f._where('std')} must be positive; got {list(std)}")
        return cls(f.integer("image_size", 1), triple("mean"), std, f.text("source"))

    def to_json(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "source": self.source}  # fmt: skip


@dataclass(frozen=True)
class Int8Record:
    """How `export --int8` made the bundle's int8 files (manifest `export.int8`), the part read
    outside the exporter: the OpenVINO backend warns by `overflow_fix` on a CPU that saturates them."""

    scheme: str  # export.int8.SCHEMES
    overflow_fix: str  # OVERFLOW_FIXES

    @classmethod
    def from_json(cls, f: _Fields) -> Int8Record:
        fix = f.get("overflow_fix", str, optional=True) or OVERFLOW_FIXES[1]
        if fix not in OVERFLOW_FIXES:
            raise ManifestError(
                f"manifest.json: {f._where('overflow_fix')} must be one of {', '.join(OVERFLOW_FIXES)}; "
                f"got {fix!r:.80}"
            )
        return cls(scheme=f.text("scheme"), overflow_fix=fix)


def _int8_record(export: Mapping[str, Any]) -> Int8Record | None:
    record = export.get("int8")
    return None if record is None else Int8Record.from_json(_Fields(record, "export.int8"))


@dataclass(frozen=True)
class Manifest:
    hidden_size: int
    projection_dim: int | None
    latent_channels: int
    vae_scale_factor: int
    vae_scaling: float
    sample_size: int
    latent_multiple: int
    scheduler: Mapping[str, Any]  # diffusers' scheduler_config.json; checked by runtime.schedulers
    tokenizer: TokenizerManifest
    deprojector: DeprojectorManifest | None
    models: Mapping[str, ModelManifest]
    source: Mapping[str, Any] = field(default_factory=dict)  # informational: where the weights came from
    packages: Mapping[str, str | None] = field(default_factory=dict)  # informational: who exported it
    warnings: tuple[str, ...] = ()
    export: Mapping[str, Any] = field(default_factory=dict)  # the exporter's record (fingerprint, stages)
    vision: VisionManifest | None = None  # set exactly when models has clip_vision

    @classmethod
    def from_json(cls, data: object) -> Manifest:
        """Validate every field the runtime reads; ManifestError naming the first bad key."""
        f = _Fields(data, "")
        fmt, version = f.data.get("format"), f.data.get("format_version")
        if fmt != FORMAT or version != FORMAT_VERSION:
            raise ManifestError(
                f"manifest.json is format {fmt!r} v{version}; this runtime reads {FORMAT!r} "
                f"v{FORMAT_VERSION}: {REEXPORT}"
            )
        models = {name: ModelManifest.from_json(name, m) for name, m in f.items("models")}
        unknown = sorted(set(models) - set(MODEL_NAMES))
        missing = [name for name in REQUIRED_MODELS if name not in models]
        if unknown or missing:
            raise ManifestError(
                f"manifest.json: models must hold {', '.join(REQUIRED_MODELS)} (and optionally "
                f"{', '.join(OPTIONAL_MODELS)}); unknown {unknown or 'none'}, missing {missing or 'none'}"
            )
        deprojector = f.get("deprojector", dict, optional=True)
        vision = (
            None
            if f.get("vision", dict, optional=True) is None
            else VisionManifest.from_json(f.sub("vision"))
        )
        if (vision is None) != (CLIP_VISION not in models):
            raise ManifestError(
                f"manifest.json: vision and models.{CLIP_VISION} must be given together: {REEXPORT}"
            )
        if CLIP_GUIDANCE in models and CLIP_VISION not in models:
            raise ManifestError(
                f"manifest.json: models.{CLIP_GUIDANCE} needs models.{CLIP_VISION}: {REEXPORT}"
            )
        export = dict(f.get("export", dict, optional=True) or {})
        _int8_record(export)  # refused at open, like every other field the runtime reads
        return cls(
            hidden_size=f.integer("hidden_size", 1),
            projection_dim=f.get("projection_dim", int, optional=True),
            latent_channels=f.integer("latent_channels", 1),
            vae_scale_factor=f.integer("vae_scale_factor", 1),
            vae_scaling=float(f.get("vae_scaling", (int, float))),
            sample_size=f.integer("sample_size", 1),
            latent_multiple=f.integer("latent_multiple", 1),
            scheduler=dict(f.get("scheduler", dict)),
            tokenizer=TokenizerManifest.from_json(f.sub("tokenizer")),
            deprojector=None if deprojector is None else DeprojectorManifest.from_json(f.sub("deprojector")),
            models=models,
            source=dict(f.get("source", dict, optional=True) or {}),
            packages=dict(f.get("packages", dict, optional=True) or {}),
            warnings=tuple(f.get("warnings", list, optional=True) or ()),
            export=export,
            vision=vision,
        )

    @property
    def int8(self) -> Int8Record | None:
        """`export.int8`, typed; None when the bundle was never quantized."""
        return _int8_record(self.export)

    @classmethod
    def loads(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise ManifestError(f"manifest.json is not valid JSON ({exc}): {REEXPORT}") from None
        return cls.from_json(data)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "source": dict(self.source),
            "packages": dict(self.packages),
            "hidden_size": self.hidden_size,
            "projection_dim": self.projection_dim,
            "latent_channels": self.latent_channels,
            "vae_scale_factor": self.vae_scale_factor,
            "vae_scaling": self.vae_scaling,
            "sample_size": self.sample_size,
            "latent_multiple": self.latent_multiple,
            "scheduler": dict(self.scheduler),
            "tokenizer": self.tokenizer.to_json(),
            "deprojector": None if self.deprojector is None else self.deprojector.to_json(),
            "models": {name: m.to_json() for name, m in self.models.items()},
            "warnings": list(self.warnings),
            "export": dict(self.export),
            **({} if self.vision is None else {"vision": self.vision.to_json()}),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def hashed_files(self) -> dict[str, tuple[str, int | None]]:
        """Every file the manifest vouches for: bundle-relative path -> (sha256, bytes or None)."""
        files: dict[str, tuple[str, int | None]] = {}
        for model in self.models.values():
            for entry in [*model.files.values(), *model.ort_files.values()]:
                files.update(entry.hashed_files())
        for folder in (self.tokenizer, self.deprojector):
            if folder is not None:
                files.update(
                    {f"{folder.dir}/{name}": (digest, None) for name, digest in folder.files.items()}
                )
        return files
