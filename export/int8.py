"""An int8 UNet (and, opt-in, VAE decoder) in the bundle: post-training quantization (NNCF) of
the fp32 graphs for OpenVINO, calibrated on inputs recorded from the bundle's own pipeline. A bundle
with the step-caching UNets (`export --deepcache`) gets int8 versions of those too, so
`--cache-interval` and int8 combine. The VAE decoder is quantized only with `vae=True`
(`--int8-vae`): 3x faster, but its int8 activations cost more image quality than the UNet's
(README "int8" has both measurements), so the default keeps it fp32.

Why OpenVINO + NNCF: OpenVINO is the faster CPU engine here in fp32 already, and NNCF is the
quantizer its int8 kernels are tuned for (the one optimum-intel uses); the result is an OpenVINO
IR (`<model>.int8.xml` + `.bin`), file set "int8", run by `--backend openvino --precision int8`.

Why calibrate through the pipeline: a UNet's activation ranges depend on the timestep and on the
text states; random inputs gave a UNet-call cosine of 0.978 to fp32 on SD 1.5 shapes. Here the
bundle itself generates from built-in captions (export/captions.py, seeded) with a fixed scheduler,
size and step count, so the calibration set is identical on every machine; its count and sha256
are recorded in the manifest (`export.int8`), with the measured quality on held-out inputs. The
scheduler is the runtime's default one (PNDM, as optimum-intel calibrates with the pipeline's own):
the inputs most requests will feed. On `sd15` shapes it also judged better on DDIM images than a
DDIM calibration did (README "int8"). The
step-caching pair: the full UNet calibrates on the UNet's inputs (it takes the same ones), the
shallow one on inputs recorded from a second, cached run of the same captions; the VAE decoder on
the final latents of every calibration generation.

Schemes (`--int8-scheme`), both measured in the README:
  hybrid  convolutions fully int8 (weights and activations), the attention/feed-forward matmuls
          int8 weights only: the matmuls are where int8 activations lose accuracy.
  full    every convolution and matmul with int8 weights and activations (faster, less exact).
In both, the first convolution (`conv_in`, reading the noisy latents) stays fp32: quantizing its
input was most of the error (tiny, held-out UNet-call cosine 0.979 with it, 0.997 without; keeping
`conv_out` fp32 as well changed nothing).

Overflow fix (`--int8-overflow-fix`, NNCF's): a CPU without an int8 dot-product instruction (VNNI,
AMX) multiply-adds u8 x s8 pairs into int16, which saturates with 8-bit weights; NNCF's fix keeps
them to 7 bits. "first_layer_only" (NNCF's default) applies it where it matters least, right for
VNNI/AMX; "enable" everywhere, right without them (tiny, on an AVX2-only AMD EPYC, held-out
UNet-call cosine 0.988 -> 0.996). "auto" picks by the exporting CPU and the manifest records the
choice; the OpenVINO backend warns when a bundle's choice saturates on the CPU it runs on.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import MANIFEST, file_entry
from export.captions import builtin_captions
from export.compare.cpu import cpu_model
from runtime.backends import Backend, BackendConfig, open_backend
from runtime.bundle import Bundle
from runtime.cpu import cpu_flags, int8_dot_instructions
from runtime.errors import RequestError
from runtime.files import write_atomic
from runtime.lora import WeightSet
from runtime.manifest import OVERFLOW_FIXES as RECORDED_FIXES
from runtime.manifest import FileEntry, Manifest, ModelManifest
from runtime.options import GenerateOptions, ResolvedOptions, validate
from runtime.pipeline import Pipeline
from runtime.specs import DEEPCACHE_FULL, DEEPCACHE_SHALLOW, INPAINT_CHANNELS

log = logging.getLogger(__name__)

SCHEMES = ("hybrid", "full")
OVERFLOW_FIXES = ("auto", *RECORDED_FIXES)
QUANTIZED_MODEL = "unet"
UNETS = (QUANTIZED_MODEL, DEEPCACHE_FULL, DEEPCACHE_SHALLOW)  # quantized when the bundle has them
VAE = "vae_decoder"


@dataclass(frozen=True)
class Int8Options:
    """How the int8 UNet is calibrated and quantized; all of it is recorded in the manifest."""

    scheme: str = "hybrid"
    samples: int = 30  # UNet calls whose inputs calibrate (each a CFG batch of 2)
    size: int = 256  # calibration images are size x size pixels
    steps: int = 10  # denoising steps per caption
    scheduler: str = GenerateOptions.scheduler  # the runtime's default sampler
    seed: int = 0  # captions and initial latents
    holdout: int = 3  # UNet calls of one more caption, never calibrated on: the recorded quality
    cache_interval: int = 3  # of the cached run that records the shallow UNet's inputs
    vae: bool = False  # also quantize the VAE decoder
    overflow_fix: str = "auto"  # NNCF's 7-bit weights: "enable" (no VNNI/AMX), "first_layer_only"

    def validate(self) -> Int8Options:
        if self.scheme not in SCHEMES:
            raise ValueError(f"int8 scheme must be one of {', '.join(SCHEMES)}; got {self.scheme!r}")
        if self.overflow_fix not in OVERFLOW_FIXES:
            raise ValueError(
                f"int8 overflow_fix must be one of {', '.join(OVERFLOW_FIXES)}; got {self.overflow_fix!r}"
            )
        for name in ("samples", "steps", "holdout", "cache_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"int8 {name} must be >= 1; got {getattr(self, name)}")
        if self.holdout > self.steps:
            raise ValueError(f"int8 holdout must be <= steps ({self.steps}); got {self.holdout}")
        return self


def overflow_fix_for(flags: frozenset[str]) -> str:
    """The overflow fix "auto" means on a CPU with these flags: 8-bit weights past the first layer
    only where int8 dot products do not saturate."""
    return "first_layer_only" if int8_dot_instructions(flags) else "enable"


Call = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # (inputs, fp32 outputs)
# The step-caching full UNet takes the UNet's inputs (and returns its noise prediction too): it
# calibrates on those; every other model on its own recorded calls.
CALIBRATES_ON = {DEEPCACHE_FULL: QUANTIZED_MODEL}


@dataclass(frozen=True)
class ModelQuality:
    """A quantized graph against its fp32 original on held-out calls (export.compare.metrics)."""

    cosine_min: float  # smallest per-row cosine of the main output (noise_pred or image)
    max_abs: float
    holdout_calls: int
    image_psnr_db_min: float | None = None  # the VAE decoder: PSNR of the uint8 images


@dataclass(frozen=True)
class Int8Result:
    manifest: Manifest
    quality: dict[str, ModelQuality]  # per quantized model
    reused: bool


class _Recorder:
    """A backend that keeps a copy of every input and fp32 output of the UNets it runs, per caption."""

    def __init__(self, inner: Backend):
        self.inner = inner
        self.device, self.precision = inner.device, inner.precision
        self.calls: dict[str, list[Call]] = {}
        self.caption = 0  # index of the caption being generated

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.inner.run(model, feeds)
        if model in (*UNETS, VAE):
            copies = ({k: v.copy() for k, v in feeds.items()}, {k: v.copy() for k, v in outputs.items()})
            self.calls.setdefault(f"{model}/{self.caption}", []).append(copies)
        return outputs

    def prepare(self, models: Iterable[str]) -> None:
        self.inner.prepare(models)

    def set_weights(self, model: str, weights: WeightSet | None) -> None:
        self.inner.set_weights(model, weights)

    def close(self) -> None:
        self.inner.close()


@dataclass(frozen=True)
class Calibration:
    feeds: dict[str, list[dict[str, np.ndarray]]]  # per model: calibrate on these
    holdout: dict[str, list[Call]]  # per model: calls of the held-out caption
    captions: list[str]  # the last one is the held-out caption

    def sha256(self) -> str:
        """Identity of the calibration inputs: equal on every machine that records the same set."""
        digest = hashlib.sha256()
        for model in sorted(self.feeds):
            for feeds in self.feeds[model]:
                for name in sorted(feeds):
                    digest.update(f"{model}/{name}{feeds[name].shape}".encode())
                    digest.update(np.ascontiguousarray(feeds[name]).tobytes())
        return digest.hexdigest()


def quantized_models(bundle: Bundle, opts: Int8Options) -> list[str]:
    return [model for model in UNETS if model in bundle.models] + ([VAE] if opts.vae else [])


def _calibration_options(
    bundle: Bundle, opts: Int8Options, caption: str, index: int, interval: int
) -> ResolvedOptions:
    """One calibration generation, validated against the bundle (RequestError naming the int8 flag)."""
    options = GenerateOptions(
        prompts=(caption,),
        steps=opts.steps,
        scheduler=opts.scheduler,
        seed=opts.seed + index,
        height=opts.size,
        width=opts.size,
        cache_interval=interval,
    )
    try:
        return validate(options, bundle)
    except RequestError as exc:
        raise RequestError(f"int8 calibration (--int8-size/--int8-steps): {exc}") from None


def record_calibration(bundle: Bundle, opts: Int8Options, threads: int | None = None) -> Calibration:
    """Run the bundle's fp32 pipeline on built-in captions (and, for the step-caching pair, once
    more with caching on); the UNet inputs it fed, in order, and the held-out caption's calls."""
    count = math.ceil(opts.samples / opts.steps)
    captions = builtin_captions(count + 1, opts.seed)  # the last one is held out
    intervals = [1] + ([opts.cache_interval] if DEEPCACHE_SHALLOW in bundle.models else [])
    runs = [
        [_calibration_options(bundle, opts, caption, i, interval) for interval in intervals]
        for i, caption in enumerate(captions)
    ]  # all validated before a model loads
    backend = _Recorder(open_backend(bundle, BackendConfig("openvino", threads=threads)))
    pipeline = Pipeline(bundle, backend)
    try:
        for i, per_caption in enumerate(runs):
            backend.caption = i
            for options in per_caption:
                pipeline.generate(options)
            log.info("calibration %d/%d: %s", i + 1, len(captions), captions[i])
    finally:
        pipeline.close()

    def calls(model: str, captions_: range) -> list[Call]:
        return [call for c in captions_ for call in backend.calls.get(f"{model}/{c}", [])]

    feeds, holdout = {}, {}
    for model in quantized_models(bundle, opts):
        source = CALIBRATES_ON.get(model, model)
        feeds[model] = [f for f, _ in calls(source, range(count))][: opts.samples]
        held = calls(source, range(count, count + 1))
        picks = sorted(set(np.linspace(0, len(held) - 1, opts.holdout).round().astype(int).tolist()))
        holdout[model] = [held[i] for i in picks]
    return Calibration(feeds, holdout, captions)


def _weighted_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes whose second input is a constant: the linear layers."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        source = op.input_value(1).get_node()
        while source.get_type_name() in ("Convert", "Transpose", "Reshape") and source.get_input_size():
            source = source.input_value(0).get_node()
        if source.get_type_name() == "Constant":
            names.append(op.get_friendly_name())
    return names


def _input_convolution(model: Any) -> str:
    """The first convolution in graph order: conv_in, which reads the latents."""
    return next(
        op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"
    )


def quantize(
    fp32_graph: Path, feeds: list[dict[str, np.ndarray]], scheme: str, overflow_fix: str
) -> tuple[Any, list[str]]:
    """An fp32 ONNX UNet quantized by NNCF on the calibration inputs (an openvino.Model), and the
    names of the layers left in fp32 on purpose."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import OverflowFix

    nncf.set_log_level(logging.WARNING)  # it lists every layer it skips at INFO
    model = ov.convert_model(str(fp32_graph))
    kept = [_input_convolution(model)]
    fix = OverflowFix(overflow_fix)
    advanced = nncf.AdvancedQuantizationParameters(overflow_fix=fix)
    weight_only: list[str] = []
    if scheme == "hybrid":
        weight_only = _weighted_matmuls(model)
        model = nncf.compress_weights(
            model,
            mode=nncf.CompressWeightsMode.INT8_ASYM,
            ignored_scope=nncf.IgnoredScope(types=["Convolution"]),
        )
        # nothing left for SmoothQuant to balance: the matmuls' activations stay fp32
        advanced = nncf.AdvancedQuantizationParameters(
            overflow_fix=fix,
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
        )
    quantized = nncf.quantize(
        model,
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
        ignored_scope=nncf.IgnoredScope(names=[*kept, *weight_only], validate=False),
        advanced_parameters=advanced,
    )
    return quantized, kept


def held_out_quality(model: Any, holdout: list[Call], threads: int | None) -> ModelQuality:
    """A quantized graph's main output (noise prediction, image) vs the fp32 one, on inputs it was
    not calibrated on; for images also the PSNR of their uint8 pixels (the compare tool's metrics)."""
    import openvino as ov

    from export.compare.metrics import image_metrics, tensor_metrics, to_uint8

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = ov.Core().compile_model(model, "CPU", config)
    tensors, psnrs = [], []
    for feeds, reference in holdout:
        name = next(iter(reference))  # the spec's first output: noise_pred or image
        out, ref = compiled(feeds)[name], reference[name]
        tensors.append(tensor_metrics(out, ref))
        if name == "image":  # (1, 3, H, W) in [0, 1]
            pixels = [to_uint8(x[0].transpose(1, 2, 0)) for x in (out, ref)]
            psnrs.append(min(image_metrics(*pixels)["psnr_db"], 100.0))  # identical: inf
    return ModelQuality(
        cosine_min=min(t["cosine"] for t in tensors),
        max_abs=max(t["max_abs"] for t in tensors),
        holdout_calls=len(tensors),
        image_psnr_db_min=min(psnrs) if psnrs else None,
    )


def fingerprint(bundle: Bundle, opts: Int8Options) -> dict[str, Any]:
    """What decides reuse of the int8 UNets: source graphs, options, tool versions, this code."""
    versions = {name: _version(name) for name in ("nncf", "openvino")}
    return {
        "source_sha256": {m: bundle.graph(m, "fp32").sha256 for m in quantized_models(bundle, opts)},
        "options": asdict(opts),
        "packages": versions,
        "code_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _recorded_quality(manifest: Manifest) -> dict[str, ModelQuality]:
    models = manifest.export["int8"]["models"]
    return {model: ModelQuality(**facts["quality"]) for model, facts in models.items()}


def add_int8(root: Path, opts: Int8Options, threads: int | None = None, force: bool = False) -> Int8Result:
    """Write (or reuse) the bundle's int8 models and their manifest entries.

    Each IR is written under a temp name and renamed; the manifest is replaced last (atomically).
    A reader still holding the old manifest may find a replaced IR: its hash then refuses it
    (IntegrityError), it is never run. The bundle's files are verified as they are used (the
    calibration run loads every graph it quantizes), not hashed again up front."""
    opts = opts.validate()
    if opts.overflow_fix == "auto":  # resolved before the fingerprint: another CPU may re-quantize
        opts = replace(opts, overflow_fix=overflow_fix_for(cpu_flags()))
    bundle = Bundle.open(root)
    if bundle.unet_in_channels == INPAINT_CHANNELS:
        raise RequestError(
            "--int8: an inpainting UNet (9 input channels) cannot be quantized yet: calibration runs "
            "text-to-image generations, which an inpainting UNet does not make"
        )
    manifest = bundle.manifest
    models = quantized_models(bundle, opts)
    fp = fingerprint(bundle, opts)
    existing = manifest.export.get("int8")
    up_to_date = isinstance(existing, dict) and existing.get("fingerprint") == fp
    if up_to_date and not force and all("int8" in manifest.models[m].files for m in models):
        log.info("int8 models are up to date (same sources, options and tools): reused")
        return Int8Result(manifest, _recorded_quality(manifest), reused=True)
    start = time.perf_counter()
    calibration = record_calibration(bundle, opts, threads)
    log.info(
        "recorded calibration inputs in %.1f s; quantizing (%s)", time.perf_counter() - start, opts.scheme
    )
    entries: dict[str, ModelManifest] = {  # none keeps int8 files of an earlier, different choice
        name: replace(m, files={k: v for k, v in m.files.items() if k != "int8"})
        for name, m in manifest.models.items()
    }
    per_model: dict[str, Any] = {}
    qualities: dict[str, ModelQuality] = {}
    for model in models:
        source = bundle.verified_path(bundle.graph(model, "fp32"))  # stamped by the calibration run
        quantized, kept = quantize(source, calibration.feeds[model], opts.scheme, opts.overflow_fix)
        quality = qualities[model] = held_out_quality(quantized, calibration.holdout[model], threads)
        log.info("int8 %s vs fp32 on held-out inputs: cosine >= %.5f", model, quality.cosine_min)
        entry = _save(quantized, root / f"{model}.int8.xml")
        del quantized
        entries[model] = replace(entries[model], files={**entries[model].files, "int8": entry})
        per_model[model] = {
            "samples": len(calibration.feeds[model]),
            "kept_fp32": kept,
            "quality": asdict(quality),
        }
    record = {
        "fingerprint": fp,
        "tool": f"nncf {fp['packages']['nncf']}, openvino {fp['packages']['openvino']}",
        "scheme": opts.scheme,
        "overflow_fix": opts.overflow_fix,
        # the held-out quality was measured here: int8 kernels differ between CPUs
        "measured_on": {"cpu": cpu_model(), "int8_dot": int8_dot_instructions()},
        "models": per_model,
        "calibration": {
            "sha256": calibration.sha256(),
            "captions": len(calibration.captions) - 1,
            "size": opts.size,
            "steps": opts.steps,
            "scheduler": opts.scheduler,
            "seed": opts.seed,
            "cache_interval": opts.cache_interval if DEEPCACHE_SHALLOW in models else None,
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    updated = replace(manifest, models=entries, export={**manifest.export, "int8": record})
    write_atomic(root / MANIFEST, updated.dumps().encode())
    for name in set(manifest.hashed_files()) - set(updated.hashed_files()):  # an earlier choice's
        (root / name).unlink(missing_ok=True)
    return Int8Result(updated, qualities, reused=False)


def _save(model: Any, final: Path) -> FileEntry:
    """The IR under temp names, renamed into place (.bin first: an .xml means complete)."""
    import openvino as ov

    tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.xml")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), final.with_suffix(".bin"))
        os.replace(tmp, final)
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
    return file_entry(final.parent, final.name, final.with_suffix(".bin").name)
