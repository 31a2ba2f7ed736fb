"""The one interface every engine implements; the pipeline never branches on backend."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np

from runtime.errors import SetupError
from runtime.lora import WeightSet
from runtime.specs import ModelSpec


class BackendError(SetupError):
    """A model could not be loaded or run; the message names the model and the cause."""


class Backend(Protocol):
    device: str
    precision: str  # which of the bundle's files it runs: "fp32" or "fp16"

    def run(self, model: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one bundle model on named float32/int32 inputs; returns its named outputs."""
        ...

    def set_weights(self, model: str, weights: WeightSet | None) -> None:
        """Run `model` with these merged initializers from the next `run` on (runtime/lora/); None
        or an empty set: the bundle's own weights, bit for bit. The pipeline calls it between
        generations only (never while another generation runs the model)."""
        ...

    def prepare(self, models: Iterable[str]) -> None:
        """Hint: these models will run soon; a backend may start loading them without waiting."""
        ...

    def close(self) -> None:
        """Release sessions / engines and their memory."""
        ...


def check_feeds(spec: ModelSpec, feeds: dict[str, np.ndarray]) -> None:
    """Reject wrong names, dtypes or ranks before an engine sees them (its errors are cryptic)."""
    expected = {t.name: t for t in spec.inputs}
    if set(feeds) != set(expected):
        raise BackendError(f"{spec.name}: inputs must be {sorted(expected)}; got {sorted(feeds)}")
    for name, array in feeds.items():
        t = expected[name]
        if array.dtype != np.dtype(t.dtype) or array.ndim != len(t.shape):
            raise BackendError(
                f"{spec.name}: input {name} must be {t.dtype} with shape {t.shape}; "
                f"got {array.dtype} {array.shape}"
            )
        for axis, dim in enumerate(t.shape):
            if isinstance(dim, int) and array.shape[axis] != dim:
                raise BackendError(f"{spec.name}: input {name} axis {axis} must be {dim}; got {array.shape}")
