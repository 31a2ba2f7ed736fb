"""W' = W + sum_i scale_i · (alpha_i / r_i) · up_i @ down_i, per initializer, in numpy.

Computed in float32 and cast once at the end to the initializer's dtype (float16 for the fp16
files), in the initializer's stored layout (Linear weights stored transposed are transposed back).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from runtime.errors import RequestError
from runtime.lora.files import LoraFile, LoraModule
from runtime.lora.targets import Target, Targets

# Which bundle model a file's component updates (the UNet's step-caching graphs take the UNet's).
COMPONENT_OF = {"clip": "text_encoder", "unet": "unet"}


def delta(module: LoraModule, target: Target, path: Path, scale: float) -> np.ndarray:
    """scale · (alpha / r) · up @ down in the stored layout of `target`: (out, in) or
    (out, in, kh, kw), or (in, out) for a transposed Linear (computed as down.T @ up.T, contiguous)."""
    down, up = module.down, module.up
    out_features, rank = up.shape[0], module.rank
    shape = target.weight_shape
    if down.size // rank * out_features != int(np.prod(shape)) or out_features != shape[0]:
        raise RequestError(
            f"lora {path.name}: key {module.key}: its update is {(out_features, *down.shape[1:])}, but "
            f"{target.module}'s weight is {shape} in this bundle (a LoRA for another model?)"
        )
    if len(shape) == 2 and down.ndim == 4 and down.shape[2:] != (1, 1):
        raise RequestError(
            f"lora {path.name}: key {module.key}: a {down.shape[2:]} conv update for Linear {target.module}"
        )
    up2 = up.reshape(out_features, rank) * np.float32(scale * module.alpha / rank)
    down2 = down.reshape(rank, -1)
    if target.transposed:
        return (down2.T @ up2.T).reshape(target.shape)
    return (up2 @ down2).reshape(target.shape)


def match(
    lora: LoraFile, component: str, targets: Targets, partial: bool = False
) -> list[tuple[LoraModule, Target]]:
    """The file's modules of `component`, each with the weight it updates; RequestError naming the
    first key whose module the graph lacks (`partial`: skipped, for the step-caching UNets, which
    hold part of the UNet), or whose weight is shared with another module."""
    underscored = targets.underscored()
    if partial and targets.unmapped:  # a LoRA's module might sit behind one of them, unchanged
        raise RequestError(
            f"loras: {len(targets.unmapped)} weights of {targets.path.name} (e.g. {targets.unmapped[0]}) "
            "could not be matched to UNet modules, so LoRA cannot be applied to it; use cache_interval 1"
        )
    pairs = []
    for module in lora.modules:
        if module.component != component:
            continue
        name = module.name if module.dotted else underscored.get(module.name)
        target = None if name is None else targets.by_module.get(name)
        if target is None and partial:
            continue
        if target is None:
            raise RequestError(
                f"lora {lora.path.name}: key {module.key} names a module this bundle's "
                f"{'text encoder' if component == 'text_encoder' else 'UNet'} does not have "
                "(a LoRA for another model, e.g. SDXL?)"
            )
        if target.shared_with:
            raise RequestError(
                f"lora {lora.path.name}: key {module.key}: {target.module} shares its weight "
                f"{target.initializer} with {', '.join(target.shared_with)} in this bundle (identical "
                "weights are stored once at export), so it cannot be changed alone"
            )
        pairs.append((module, target))
    return pairs


def merge(
    loras: Sequence[tuple[LoraFile, float]],
    component: str,
    targets: Targets,
    base: Callable[[str], np.ndarray],
    partial: bool = False,
) -> dict[str, np.ndarray]:
    """initializer -> merged array for every initializer some LoRA of `component` touches.

    `base(name)` gives a touched initializer's stored value (a memory map is fine)."""
    deltas: dict[str, tuple[Target, np.ndarray]] = {}
    for lora, scale in loras:
        for module, target in match(lora, component, targets, partial):
            update = delta(module, target, lora.path, scale)
            if target.initializer in deltas:
                update += deltas[target.initializer][1]
            deltas[target.initializer] = (target, update)

    def add_base(name: str) -> np.ndarray:
        target, update = deltas[name]
        np.add(update, base(name), out=update)  # numpy widens fp16 base values exactly
        return update if target.dtype == np.float32 else update.astype(target.dtype)

    # memory-bound adds over up to GBs of weights: one thread per core (numpy releases the GIL)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(deltas, pool.map(add_base, deltas), strict=True))
