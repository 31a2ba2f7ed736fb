"""Backends run bundle models: name + float32 feeds -> named outputs. One interface, several engines."""

from __future__ import annotations

from runtime.backends.base import Backend, BackendError
from runtime.backends.config import BACKENDS, PRECISIONS, BackendConfig, bundle_files
from runtime.bundle import Bundle


def open_backend(bundle: Bundle, config: BackendConfig | None = None) -> Backend:
    """Create the configured backend; its engine library is imported only when asked for."""
    config = (config or BackendConfig()).validate()
    if config.backend == "onnxruntime":
        from runtime.backends.onnxruntime import OrtBackend

        return OrtBackend(bundle, config)
    if config.backend == "openvino":
        from runtime.backends.openvino import OvBackend

        return OvBackend(bundle, config)
    from runtime.backends.tensorrt import TrtBackend

    return TrtBackend(bundle, config)


__all__ = [
    "BACKENDS",
    "PRECISIONS",
    "Backend",
    "BackendConfig",
    "BackendError",
    "bundle_files",
    "open_backend",
]
