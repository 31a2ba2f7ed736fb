"""Backends run bundle models: name + float32 feeds -> named outputs. One interface, several engines."""

from __future__ import annotations

from runtime.backends.base import Backend, BackendError
from runtime.bundle import Bundle

BACKENDS = ("onnxruntime", "openvino", "tensorrt")
# fp32 / fp16: which of the bundle's files runs. bf16: the fp32 files, computed in bf16 (openvino).
PRECISIONS = ("fp32", "fp16", "bf16")


def bundle_files(precision: str) -> str:
    """Which of a bundle's file sets a precision runs from (bf16 computes from the fp32 files)."""
    return "fp32" if precision == "bf16" else precision


def check_precision(backend: str, precision: str) -> None:
    """Precisions only some backends run; ValueError naming both otherwise."""
    if precision == "bf16" and backend != "openvino":
        raise ValueError(f"precision bf16 needs backend openvino; {backend} runs fp32 or fp16")


def open_backend(name: str, bundle: Bundle, precision: str | None = None, **options: object) -> Backend:
    """Create a backend by name; engines are imported only when asked for.

    `precision` defaults to the backend's own (onnxruntime and openvino: fp32; tensorrt: fp16, the
    only one its engines are built in). onnxruntime's `device` means nothing to the others, nor
    `threads` to TensorRT: dropped.
    """
    if precision is not None:
        check_precision(name, precision)
        options["precision"] = precision
    if name == "onnxruntime":
        from runtime.backends.onnxruntime import OrtBackend

        return OrtBackend(bundle, **options)  # type: ignore[arg-type]
    if name == "openvino":
        from runtime.backends.openvino import OvBackend

        device = options.pop("device", "cpu")
        if device != "cpu":
            raise ValueError(f"device must be cpu for backend openvino; got {device!r}")
        return OvBackend(bundle, **options)  # type: ignore[arg-type]
    if name == "tensorrt":
        from runtime.backends.tensorrt import TrtBackend

        for ort_only in ("device", "threads"):
            options.pop(ort_only, None)
        return TrtBackend(bundle, **options)  # type: ignore[arg-type]
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")


__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "BackendError",
    "bundle_files",
    "check_precision",
    "open_backend",
]
