"""Backends run bundle models: name + float32 feeds -> named outputs. One interface, several engines."""

from __future__ import annotations

from runtime.backends.base import Backend, BackendError
from runtime.bundle import Bundle

BACKENDS = ("onnxruntime", "tensorrt")


def open_backend(name: str, bundle: Bundle, precision: str | None = None, **options: object) -> Backend:
    """Create a backend by name; engines are imported only when asked for.

    `precision` defaults to the backend's own (onnxruntime: fp32; tensorrt: fp16, the only one its
    engines are built in). onnxruntime's `device` and `threads` mean nothing to TensorRT: dropped.
    """
    if precision is not None:
        options["precision"] = precision
    if name == "onnxruntime":
        from runtime.backends.onnxruntime import OrtBackend

        return OrtBackend(bundle, **options)  # type: ignore[arg-type]
    if name == "tensorrt":
        from runtime.backends.tensorrt import TrtBackend

        for ort_only in ("device", "threads"):
            options.pop(ort_only, None)
        return TrtBackend(bundle, **options)  # type: ignore[arg-type]
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")


__all__ = ["BACKENDS", "Backend", "BackendError", "open_backend"]
