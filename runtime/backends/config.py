"""How to open a backend: one frozen, validated value instead of a keyword bag.

Every front end (CLI, server, Ray, compare tool, benches) builds a `BackendConfig`; `validate()`
resolves the per-backend defaults and refuses combinations that mean nothing, so a setting is
never silently dropped: `threads` for TensorRT, `device cuda` for OpenVINO, `bf16` for ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from runtime.bundle import Bundle
from runtime.errors import RequestError

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
# fp32 / fp16: which of the bundle's files runs. bf16: the fp32 files, computed in bf16 (openvino).
# int8: the bundle's post-training-quantized models (`python -m export --int8`), the rest fp32 (openvino).
# int8-bf16: the same int8 models with their unquantized ops in bf16, the rest as bf16 (openvino, a
# CPU with bf16 instructions): int8 and bf16 composed.
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int8-bf16")
INT8_PRECISIONS = ("int8", "int8-bf16")  # run the bundle's int8 files
BF16_PRECISIONS = ("bf16", "int8-bf16")  # compute in bf16: need bf16 instructions
# Per backend: the devices it runs on (first = default) and the precisions (first = default).
DEVICES = {"onnxruntime": ("cpu", "cuda", "tensorrt"), "openvino": ("cpu",), "tensorrt": ("cuda",)}
BACKEND_PRECISIONS = {
    "onnxruntime": ("fp32", "fp16"),
    "openvino": ("fp32", "bf16", "int8", "int8-bf16"),
    "tensorrt": ("fp16",),
}
# Settings that mean something to one backend only.
THREADED = ("onnxruntime", "openvino")  # intra-op CPU threads
STATIC = {"onnxruntime": ("cpu",), "openvino": ("cpu",)}  # static_shapes: backend -> its devices
# int8 files are written for the UNet (always: the precision means it) and, by the exporter's
# choice, the other UNet graphs and the VAE decoder; a model without them runs its fp32 files.
INT8_REQUIRED = "unet"


def bundle_files(precision: str, model: str, bundle: Bundle) -> str:
    """Which of a bundle's file sets a precision runs `model` from: bf16 computes from the fp32
    files; int8 (and int8-bf16) runs the int8 files where the bundle has them (export --int8 lists
    which), else fp32."""
    if precision in INT8_PRECISIONS:
        return "int8" if "int8" in bundle.models[model].files else "fp32"
    return "fp32" if precision == "bf16" else precision


def check_bundle_precision(bundle: Bundle, precision: str) -> None:
    """Fail now, not mid-generation, if the bundle lacks the files a precision runs."""
    if precision in INT8_PRECISIONS:
        try:
            bundle.graph(INT8_REQUIRED, "int8")
        except RequestError as exc:  # name what was asked for, not only the missing file set
            raise RequestError(f"precision {precision} runs the bundle's int8 files: {exc}") from exc
    for model in bundle.models:
        bundle.graph(model, bundle_files(precision, model, bundle))


@dataclass(frozen=True)
class BackendConfig:
    backend: str = "onnxruntime"
    device: str | None = None  # None: the backend's own (cpu; tensorrt: cuda)
    precision: str | None = None  # None: the backend's own (fp32; tensorrt: fp16)
    threads: int | None = None  # intra-op threads per model (onnxruntime, openvino); None: all cores
    cache_graphs: bool = True  # keep derived graphs beside the bundle (.ort_cache, .ov_cache)
    engine_dir: Path | None = None  # tensorrt: where the engines are (default BUNDLE/engines)
    cuda_graphs: bool = True  # tensorrt: replay CUDA graphs for repeated shapes
    device_id: int = 0  # tensorrt: which GPU
    # onnxruntime (cpu), openvino: compile each model per request shape (cached, small LRU) instead
    # of once for any shape; a shape whose compile fails runs on the dynamic model.
    static_shapes: bool = False

    def validate(self) -> BackendConfig:
        """This config with defaults resolved; RequestError naming the setting and its choices."""
        if self.backend not in BACKENDS:
            raise RequestError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        devices, precisions = DEVICES[self.backend], BACKEND_PRECISIONS[self.backend]
        device = devices[0] if self.device is None else self.device
        precision = precisions[0] if self.precision is None else self.precision
        if device not in devices:
            raise RequestError(
                f"device must be {' or '.join(devices)} for backend {self.backend}; got {device!r}"
            )
        if precision not in precisions:
            openvino_only = precision in BF16_PRECISIONS + INT8_PRECISIONS
            hint = f"; {precision} needs backend openvino" if openvino_only else ""
            raise RequestError(
                f"precision must be {' or '.join(precisions)} for backend {self.backend}; "
                f"got {precision!r}{hint}"
            )
        if self.threads is not None:
            if self.backend not in THREADED:
                raise RequestError(f"threads applies to {' and '.join(THREADED)} only, not {self.backend}")
            if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
                raise RequestError(
                    f"threads must be an integer >= 1 (or unset: all cores); got {self.threads!r}"
                )
        if self.static_shapes and device not in STATIC.get(self.backend, ()):
            raise RequestError(
                f"static_shapes applies to openvino and onnxruntime on cpu only, not {self.backend}/{device}"
            )
        if isinstance(self.device_id, bool) or not isinstance(self.device_id, int) or self.device_id < 0:
            raise RequestError(f"device_id must be an integer >= 0; got {self.device_id!r}")
        return replace(self, device=device, precision=precision)
