"""Backends run bundle models: name + float32 feeds -> named outputs. One interface, several engines."""

from __future__ import annotations

from runtime.backends.base import Backend, BackendError
from runtime.bundle import Bundle

BACKENDS = ("onnxruntime", "tensorrt")


def open_backend(name: str, bundle: Bundle, precision: str = "fp32", **options: object) -> Backend:
    """Create a backend by name; engines are imported only when asked for."""
    if name == "onnxruntime":
        from runtime.backends.onnxruntime import OrtBackend

        return OrtBackend(bundle, precision=precision, **options)  # type: ignore[arg-type]
    if name == "tensorrt":
        raise BackendError("backend 'tensorrt' is not available in this build yet; use 'onnxruntime'")
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")


__all__ = ["BACKENDS", "Backend", "BackendError", "open_backend"]
