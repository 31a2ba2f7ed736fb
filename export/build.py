"""The export pipeline: model source -> CLIP, deprojector, UNet, VAE encoder and decoder (and CLIP's
image tower when the source has one) as ONNX -> bundle.

Stage order is chosen for memory. All torch models are traced first, each to a raw ONNX file
in the staging directory, and then freed; every later pass works on a lean proto whose large
weights stay on disk (onnx_io), so fp16 conversion of the SD 1.5 UNet no longer holds several
copies of 3.4 GB. Per model: clean up (fold, dedupe, infer shapes), write fp32, add the
ORT-fused fp32 graph when attention matched (export/fusion.py), convert and write fp16, check
them and list ops TensorRT's parser lacks.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn
from transformers import CLIPTokenizer

from export import clip_guidance, deepcache, fp16, fusion, graph, onnx_io
from export.bundle import (
    DEPROJECTOR_DIR,
    TOKENIZER_DIR,
    Staging,
    dir_hashes,
    dir_signature,
    exporter_digest,
    file_entry,
    package_versions,
    reusable,
)
from export.deprojector import VicinityDeprojector, from_clip, load_deprojector, save_deprojector
from export.models import DEFAULT_SEED, PRESETS, SDComponents, VisionTower, has_vision_tower, load_model
from export.onnx_export import (
    BOS_ID,
    EOS_ID,
    OPSET,
    ClipVisionWrapper,
    ClipWrapper,
    UNetWrapper,
    VaeDecoderWrapper,
    VaeEncoderWrapper,
    example_inputs,
    export_onnx,
)
from export.progress import Progress, StageRecord, release_memory
from runtime.manifest import (
    MODEL_NAMES,
    DeprojectorManifest,
    DimRange,
    FileEntry,
    Manifest,
    ModelManifest,
    TokenizerManifest,
    VisionManifest,
)
from runtime.specs import (
    CLIP_GUIDANCE,
    CLIP_VISION,
    CONTEXT_LENGTH,
    DEEPCACHE_FULL,
    DEEPCACHE_SHALLOW,
    LATENT_CHANNELS,
    ModelSpec,
    clip_guidance_spec,
    clip_spec,
    clip_vision_spec,
    deepcache_full_spec,
    deepcache_shallow_spec,
    deprojector_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)

log = logging.getLogger(__name__)

PRECISION_CHOICES = {"fp32": ("fp32",), "fp16": ("fp16",), "both": ("fp32", "fp16")}
INIT_FROM_CLIP = "init-from-clip"
DEFAULT_VARIANT = "v1"
# Optimisation-profile ranges recorded for engines (TensorRT) and checked by backends.
BATCH = {"min": 1, "opt": 2, "max": 8}  # opt 2: one prompt with classifier-free guidance
TOKENS = {"min": CONTEXT_LENGTH, "opt": CONTEXT_LENGTH, "max": 3 * CONTEXT_LENGTH}
LATENT_MIN, LATENT_MAX = 8, 128  # 64..1024 px at scale factor 8
DEEPCACHE_MODELS = (DEEPCACHE_FULL, DEEPCACHE_SHALLOW)


@dataclass(frozen=True)
class ExportOptions:
    model: str  # preset name or diffusers folder
    out: Path
    seed: int = DEFAULT_SEED
    projection: Path | None = None
    deprojector: str | None = None  # None: initialise from CLIP; "none": omit; else a checkpoint dir
    precision: str = "both"
    force: bool = False  # rebuild even if the bundle could be reused
    # Step-caching graphs (export/deepcache.py): a second full UNet, so opt-in (+1 UNet of files).
    deepcache: bool = False
    # CLIP guidance's gradient graph (export/clip_guidance.py): needs CLIP's image tower and text
    # projection; opt-in (a second VAE decoder and image tower of files, and a slower export).
    clip_guidance: bool = False


@dataclass
class ExportResult:
    out: Path
    reused: bool
    reason: str
    manifest: Manifest
    stages: list[StageRecord] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_bytes: int = 0


def _empty_ids() -> torch.Tensor:
    """The tokenized "" padded to 77: BOS then EOS padding (int64)."""
    return torch.tensor([BOS_ID] + [EOS_ID] * (CONTEXT_LENGTH - 1), dtype=torch.int64)


def _variant_of(module: nn.Module) -> str:
    """Published variant name of a loaded checkpoint, from its config (Vicinity: "vicinity").

    v1 and v2 share a layout; v1 takes text_embeds (the spec), v2 pooled.
    """
    if isinstance(module, VicinityDeprojector):
        return "vicinity"
    config: Any = getattr(module, "config", None)
    if config.layout == "embed_first":
        return "v1" if config.input_kind == "text_embeds" else "v2"
    if config.ensemble_size == 1:
        return "v3"
    return "v5" if config.apply_mlp_to_input else "v4"


def deprojector_module(
    components: SDComponents, choice: str | None
) -> tuple[nn.Module, dict[str, Any]] | None:
    """The deprojector to export (taking pooled input) and its manifest entry, or None."""
    if choice == "none":
        return None
    if choice is None:
        module = from_clip(
            components.text_encoder,
            components.text_projection,
            variant=DEFAULT_VARIANT,
            empty_ids=_empty_ids(),
            input_kind="pooled",
        )
        return module, {"variant": DEFAULT_VARIANT, "checkpoint": INIT_FROM_CLIP, "input": "pooled"}
    loaded = load_deprojector(choice)
    entry = {"variant": _variant_of(loaded), "checkpoint": str(Path(choice).resolve()), "input": "pooled"}
    return loaded.with_input_kind("pooled").eval(), entry


def unet_channels(components: SDComponents) -> int:
    """The UNet's input channels: 4, or 9 for an inpainting UNet."""
    return int(components.unet.config.in_channels)  # type: ignore[attr-defined]


def _vision(components: SDComponents) -> VisionTower:
    if components.vision is None:
        raise ValueError(f"{CLIP_VISION}: this model has no CLIP image tower")
    return components.vision


def model_spec(name: str, components: SDComponents) -> ModelSpec:
    hidden, in_channels = components.hidden_size, unet_channels(components)
    if name == CLIP_VISION:
        tower = _vision(components)
        return clip_vision_spec(tower.image_size, tower.projection_dim)
    if name == CLIP_GUIDANCE:
        tower = _vision(components)
        return clip_guidance_spec(tower.image_size, tower.projection_dim)
    if name == "clip":
        projection = components.text_projection
        return clip_spec(hidden, None if projection is None else int(projection.shape[0]))
    if name == "deprojector":
        return deprojector_spec(hidden)
    if name == "unet":
        return unet_spec(hidden, in_channels)
    if name in DEEPCACHE_MODELS:
        channels = deepcache.feature_channels(components.unet)
        spec = deepcache_full_spec if name == DEEPCACHE_FULL else deepcache_shallow_spec
        return spec(hidden, channels, in_channels)
    if name == "vae_encoder":
        return vae_encoder_spec()
    return vae_decoder_spec()


def torch_module(name: str, components: SDComponents, deprojector: nn.Module | None = None) -> nn.Module:
    """The PyTorch module whose ONNX graph is `<name>.onnx` (tests compare against it too)."""
    if name == "clip":
        return ClipWrapper(components.text_encoder, components.text_projection).eval()
    if name == "deprojector":
        if deprojector is None:
            raise ValueError("the deprojector module is built by deprojector_module()")
        if isinstance(deprojector, VicinityDeprojector):
            return deprojector.fold_batchnorm()  # eval BatchNorm folded into the Linears: fewer nodes
        return deprojector.eval()
    if name == "unet":
        return UNetWrapper(components.unet).eval()
    if name == "vae_decoder":
        return VaeDecoderWrapper(components.vae).eval()
    if name == "vae_encoder":
        return VaeEncoderWrapper(components.vae).eval()
    if name == DEEPCACHE_FULL:
        return deepcache.FullWrapper(components.unet).eval()
    if name == DEEPCACHE_SHALLOW:
        return deepcache.ShallowWrapper(components.unet).eval()
    if name == CLIP_VISION:
        tower = _vision(components)
        return ClipVisionWrapper(tower.vision_model, tower.visual_projection).eval()
    if name == CLIP_GUIDANCE:
        return clip_guidance.ClipGuidanceGradient(components.vae, _vision(components)).eval()
    raise ValueError(f"unknown model {name!r}")


def dim_ranges(name: str, sample_size: int, vae_scale_factor: int) -> dict[str, dict[str, int]]:
    latent = {"min": LATENT_MIN, "opt": min(max(sample_size, LATENT_MIN), LATENT_MAX), "max": LATENT_MAX}
    if name == "vae_encoder":  # its input is the image: sides in pixels, one image per encode
        pixels = {k: v * vae_scale_factor for k, v in latent.items()}
        return {"batch": {**BATCH, "opt": 1}, "image_height": pixels, "image_width": pixels}
    if name == "clip":
        return {"batch": BATCH, "tokens": TOKENS}
    if name == "deprojector":
        return {"batch": BATCH}
    if name == CLIP_VISION:  # one image per CLIP score; its side is fixed by the tower
        return {"batch": {**BATCH, "opt": 1}}
    if name == CLIP_GUIDANCE:  # one image per gradient, like a decode; the resize matrices' pixels
        pixels = {k: v * vae_scale_factor for k, v in latent.items()}
        one = {"batch": {**BATCH, "opt": 1}, "height": latent, "width": latent}
        return {**one, "image_height": pixels, "image_width": pixels}
    if name == "unet" or name in DEEPCACHE_MODELS:
        return {"batch": BATCH, "height": latent, "width": latent, "tokens": TOKENS}
    return {"batch": {**BATCH, "opt": 1}, "height": latent, "width": latent}  # one image per decode


def _path_signature(path: Path | str | None) -> dict[str, str] | None:
    if path is None:
        return None
    resolved = Path(path).resolve()
    return {"path": str(resolved), "files": dir_signature(resolved)}


def fingerprint(opts: ExportOptions) -> dict[str, Any]:
    """Everything the exported files depend on; an equal fingerprint lets a bundle be reused."""
    preset = opts.model in PRESETS
    deprojector: Any = (
        opts.deprojector if opts.deprojector in (None, "none") else _path_signature(opts.deprojector)
    )
    return {
        "model": opts.model if preset else _path_signature(opts.model),
        "seed": opts.seed if preset else None,
        "projection": _path_signature(opts.projection),
        "deprojector": INIT_FROM_CLIP if deprojector is None else deprojector,
        "precision": opts.precision,
        "deepcache": opts.deepcache,
        **({"clip_guidance": True} if opts.clip_guidance else {}),
        "packages": package_versions(),
        "exporter": exporter_digest(),
    }


def _write_tokenizer(components: SDComponents, target: Path) -> TokenizerManifest:
    tokenizer = CLIPTokenizer.from_pretrained(components.tokenizer_dir)
    tokenizer.save_pretrained(target)
    if not (target / "tokenizer.json").is_file():
        raise RuntimeError(f"CLIPTokenizer.save_pretrained wrote no tokenizer.json to {target}")
    return TokenizerManifest(
        dir=TOKENIZER_DIR,
        context_length=CONTEXT_LENGTH,
        bos_id=int(tokenizer.bos_token_id),
        eos_id=int(tokenizer.eos_token_id),
        pad_id=int(tokenizer.pad_token_id),
        files={},  # hashed once the directory is complete
    )


def _write_precision(lean: Any, staging: Path, file: str, warnings: list[str]) -> FileEntry:
    """Save one precision, check it, record unsupported TensorRT ops; returns its files entry."""
    data = onnx_io.save(lean, staging / file)
    graph.check(staging / file)
    unsupported = tuple(graph.unsupported_trt_ops(lean))
    if unsupported:
        message = f"{file}: ops not in TensorRT's ONNX parser list: {', '.join(unsupported)}"
        log.warning(message)
        warnings.append(message)
    return file_entry(staging, file, data, trt_unsupported_ops=unsupported)


def _write_ort_variant(staging: Path, file: str, standard: FileEntry) -> FileEntry | None:
    """`<name>.ort.onnx`: the saved graph with ONNX Runtime fusions, reading the standard file's
    weights (same external data file, so no second copy); None when nothing matched."""
    model = onnx.load(str(staging / file), load_external_data=False)
    fused = fusion.fuse_attention(model)
    if not fused:
        return None
    variant = file.removesuffix(".onnx") + ".ort.onnx"
    (staging / variant).write_bytes(model.SerializeToString())
    graph.check(staging / variant)
    own = file_entry(staging, variant, None)
    return replace(standard, file=own.file, sha256=own.sha256, bytes=own.bytes, trt_unsupported_ops=(),
                   fused=dict(fused))  # fmt: skip


def _manifest_facts(components: SDComponents, opts: ExportOptions) -> dict[str, Any]:
    """The manifest fields that come from the torch side (read before the models are freed)."""
    vae_config: Any = components.vae.config  # type: ignore[attr-defined]
    projection = components.text_projection
    tower = components.vision
    return {
        "source": {**components.source, "projection": str(opts.projection) if opts.projection else None},
        "hidden_size": components.hidden_size,
        "projection_dim": None if projection is None else int(projection.shape[0]),
        "latent_channels": LATENT_CHANNELS,
        "vae_scale_factor": 2 ** (len(vae_config.block_out_channels) - 1),
        "vae_scaling": float(vae_config.scaling_factor),
        "sample_size": int(components.unet.config.sample_size),  # type: ignore[attr-defined]
        # The traced UNet has no odd-size upsampling path: latents must divide by its total downsampling.
        "latent_multiple": 2 ** (len(components.unet.config.block_out_channels) - 1),  # type: ignore[attr-defined]
        "scheduler": dict(components.scheduler_config),
        "vision": None
        if tower is None
        else VisionManifest(tower.image_size, tower.mean, tower.std, tower.source),
    }


def _trace_all(
    components: SDComponents, opts: ExportOptions, models: list[str], staging: Path, progress: Progress
) -> dict[str, Any] | None:
    """Trace every model to `staging/raw/<name>/<name>.onnx`; returns the deprojector's manifest entry.

    The deprojector's PyTorch weights are also saved (`deprojector_checkpoint/`), so the bundle
    carries the exact module its ONNX graph came from (for reference comparisons, re-export).
    CLIP's image tower goes first and is then dropped from `components` (sd15: 1.2 GB less while
    the UNet is traced).
    """
    deprojector_entry = None
    image_size = 0 if components.vision is None else components.vision.image_size
    for name in sorted(models, key=lambda n: (n != CLIP_GUIDANCE, n != CLIP_VISION)):
        with progress.stage(f"trace {name}"):
            deprojector = None
            if name == "deprojector":
                built = deprojector_module(components, opts.deprojector)
                assert built is not None, "models excludes the deprojector for --deprojector none"
                deprojector, deprojector_entry = built
                save_deprojector(deprojector, staging / DEPROJECTOR_DIR)
            module = torch_module(name, components, deprojector)
            spec = model_spec(name, components)
            raw = staging / "raw" / name / f"{name}.onnx"
            channels = deepcache.feature_channels(components.unet) if name in DEEPCACHE_MODELS else 0
            if name == CLIP_GUIDANCE:  # autograd inside: traced by make_fx, exported by dynamo
                assert isinstance(module, clip_guidance.ClipGuidanceGradient)
                tower = _vision(components)
                args = clip_guidance.example_inputs(tower.image_size, tower.projection_dim)
                clip_guidance.export_gradient(module, args, spec, raw)
            else:
                inputs = example_inputs(
                    name, components.hidden_size, channels, unet_channels(components), image_size
                )
                export_onnx(module, inputs, spec, raw)
            del module, deprojector
        if name == CLIP_VISION:
            components.vision = None
            release_memory()
    return deprojector_entry


def _convert(
    name: str, raw: Path, precisions: tuple[str, ...], staging: Path, progress: Progress, warnings: list[str]
) -> tuple[dict[str, FileEntry], dict[str, FileEntry]]:
    """Clean up the raw trace and write each precision; returns the `files` and `ort_files` entries."""
    files: dict[str, FileEntry] = {}
    ort_files: dict[str, FileEntry] = {}
    with progress.stage(f"clean {name}"):
        lean = graph.cleanup(onnx_io.load_lean(raw))
    if "fp32" in precisions:
        with progress.stage(f"write {name} fp32"):
            files["fp32"] = _write_precision(lean, staging, f"{name}.onnx", warnings)
        with progress.stage(f"fuse {name} for onnxruntime"):
            variant = _write_ort_variant(staging, f"{name}.onnx", files["fp32"])
        if variant is not None:
            ort_files["fp32"] = variant
    if "fp16" in precisions:
        with progress.stage(f"fp16 {name}"):
            lean16 = fp16.to_fp16(lean)
        with progress.stage(f"write {name} fp16"):
            files["fp16"] = _write_precision(lean16, staging, f"{name}.fp16.onnx", warnings)
    return files, ort_files


def export_bundle(opts: ExportOptions) -> ExportResult:
    """Export (or reuse) the bundle described by `opts`; see the module docstring for the stages."""
    start = time.perf_counter()
    fp = fingerprint(opts)
    reason = "--force"
    if not opts.force:
        reused, reason = reusable(opts.out, fp)
        if reused is not None:
            log.info("reusing bundle %s: %s", opts.out, reason)
            return ExportResult(opts.out, True, reason, reused, seconds=time.perf_counter() - start)
        log.info("exporting bundle %s: %s", opts.out, reason)
    precisions = PRECISION_CHOICES[opts.precision]
    models = [
        n
        for n in MODEL_NAMES
        if (n != "deprojector" or opts.deprojector != "none")
        and (opts.deepcache or n not in DEEPCACHE_MODELS)
        and (n != CLIP_VISION or has_vision_tower(opts.model))
        and (n != CLIP_GUIDANCE or opts.clip_guidance)
    ]
    # trace, clean, writes, fp16 conversion, ORT fusion of fp32
    stages_per_model = 2 + len(precisions) + ("fp16" in precisions) + ("fp32" in precisions)
    progress = Progress(total=3 + len(models) * stages_per_model)
    warnings: list[str] = []
    try:
        with Staging(opts.out) as staging:
            with progress.stage("load model"):
                components = load_model(opts.model, opts.seed, opts.projection)
            if (components.vision is None) == (CLIP_VISION in models):
                raise RuntimeError(f"{opts.model}: has_vision_tower() and load_model() disagree")
            if opts.clip_guidance and (components.vision is None or components.text_projection is None):
                raise ValueError(
                    f"--clip-guidance needs CLIP's image tower and text projection; {opts.model} lacks "
                    "one (a diffusers folder: `--projection DIR` and a safety_checker/ or image_encoder/)"
                )
            with progress.stage("tokenizer"):
                tokenizer = _write_tokenizer(components, staging.dir / TOKENIZER_DIR)
            facts = _manifest_facts(components, opts)
            specs = {name: model_spec(name, components) for name in models}
            raw_dir = staging.dir / "raw"
            deprojector_entry = _trace_all(components, opts, models, staging.dir, progress)
            del components  # every later stage works on ONNX files
            release_memory()

            entries: dict[str, ModelManifest] = {}
            for name in models:
                files, ort_files = _convert(
                    name, raw_dir / name / f"{name}.onnx", precisions, staging.dir, progress, warnings
                )
                shutil.rmtree(raw_dir / name)
                release_memory()
                ranges = dim_ranges(name, facts["sample_size"], facts["vae_scale_factor"])
                dims = {k: DimRange(**r) for k, r in ranges.items()}
                entries[name] = ModelManifest(specs[name], dims, OPSET, files, ort_files)

            with progress.stage("manifest"):
                deprojector = None
                if deprojector_entry is not None:
                    hashes = dir_hashes(staging.dir, DEPROJECTOR_DIR)
                    deprojector = DeprojectorManifest(**deprojector_entry, dir=DEPROJECTOR_DIR, files=hashes)
                manifest = Manifest(
                    **facts,
                    packages=fp["packages"],
                    tokenizer=replace(tokenizer, files=dir_hashes(staging.dir, TOKENIZER_DIR)),
                    deprojector=deprojector,
                    models=entries,
                    warnings=tuple(warnings),
                    export={
                        "fingerprint": fp,
                        "precisions": list(precisions),
                        **({"deepcache": {"branch": deepcache.BRANCH}} if opts.deepcache else {}),
                        "stages": progress.as_json(),
                        "seconds": round(time.perf_counter() - start, 2),
                        "peak_rss_bytes": progress.peak_rss_bytes,
                    },
                )
                staging.commit(manifest)
    finally:
        progress.close()
    return ExportResult(
        opts.out,
        False,
        reason,
        manifest,
        progress.records,
        time.perf_counter() - start,
        progress.peak_rss_bytes,
    )
