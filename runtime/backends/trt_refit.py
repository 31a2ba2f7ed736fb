"""LoRA on TensorRT: refit an engine built with `python -m engines.build --refittable` in place.

The ONNX parser names an engine's weights after the ONNX initializers they came from, which are
the names a `WeightSet` uses (runtime/lora/), so `trt.Refitter.set_named_weights` takes the merged
arrays as they are. Restoring the bundle's weights is a refit too, with the original arrays read
from the fp16 ONNX file the engine was built from (kept on the host once read). TensorRT may ask
for more weights than were set (weights it built into one kernel together:
`get_missing_weights`); those get the values they should have, the set's or the original's. A
refit that fails leaves the engine's weights undefined: the caller drops the engine and
deserializes its plan again, which holds the original weights.

NVIDIA's TensorRT demo/Diffusion refits LoRA weights the same way; refittable engines may run
slower than plain ones (NVIDIA/TensorRT#2936 reports up to 1.7x), so refit is a build option.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from runtime.backends.base import BackendError

MAX_MISSING_ROUNDS = 4  # get_missing_weights after setting the missing ones is normally empty at once
BaseArrays = Callable[[Iterable[str]], Mapping[str, np.ndarray]]


class NotRefittable(BackendError):
    """A LoRA was asked for on an engine built without `--refittable`; the message says how to rebuild."""


class RefitFailed(BackendError):
    """TensorRT refused a refit; the engine's weights are undefined until its plan is loaded again."""


def refit(
    engine: Any,
    label: str,
    arrays: Mapping[str, np.ndarray],
    restore: Iterable[str],
    base: BaseArrays,
    logger: Any,
    log_tail: deque[str] | None = None,
) -> None:
    """Set `arrays` (ONNX initializer name -> value), put the names in `restore` back to their
    original values (`base(names)`), and refit the engine. The caller holds the engine's lock:
    nothing may run on it meanwhile."""
    import tensorrt as trt

    if not engine.refittable:
        raise NotRefittable(f"{label} was built without --refittable: its weights cannot be replaced")
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    unknown = sorted(name for name in arrays if name not in known)
    if unknown:
        raise BackendError(
            f"{label}: {len(unknown)} LoRA weight(s) are not refittable weights of this engine, "
            f"e.g. {', '.join(unknown[:3])} (is the engine built from the bundle's fp16 ONNX?)"
        )
    values = dict(arrays)
    originals = [name for name in restore if name not in values]
    values.update(base(originals))
    held: list[np.ndarray] = []  # TensorRT reads the host arrays during refit_cuda_engine

    def put(name: str, array: np.ndarray) -> None:
        prototype = refitter.get_weights_prototype(name)
        dtype = np.dtype(trt.nptype(prototype.dtype))
        if array.dtype != dtype or array.size != prototype.size:
            raise BackendError(
                f"{label}: weight {name} is {prototype.size} x {dtype} in the engine; the LoRA set "
                f"gives {array.size} x {array.dtype}"
            )
        data = np.ascontiguousarray(array)
        held.append(data)
        if not refitter.set_named_weights(name, trt.Weights(data)):
            raise BackendError(f"{label}: TensorRT refused the weights of {name}")

    for name, array in values.items():
        put(name, array)
    for _ in range(MAX_MISSING_ROUNDS):
        missing = list(refitter.get_missing_weights())
        if not missing:
            break
        extra = base([name for name in missing if name not in values])
        for name in missing:
            put(name, values[name] if name in values else extra[name])
    if not refitter.refit_cuda_engine():
        tail = f": {log_tail[-1]}" if log_tail else ""
        raise RefitFailed(f"{label}: TensorRT could not refit the engine{tail}")
