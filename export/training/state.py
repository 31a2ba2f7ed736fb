"""Resumable training state: weights, Adam moments and loop counters, without pickle.

`<run>/resume/` holds model.safetensors (current weights), best.safetensors (the best weights
by held-out free-running loss), optimizer.safetensors (Adam's per-parameter tensors, keyed
`<param index>.<name>`) and state.json (param groups, step, best, history, and the run's
fingerprint, which must match to resume). The directory is rebuilt in a temporary sibling and
swapped in, so a crash leaves either the previous state or the new one, never a mix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from runtime.files import write_dir_atomic

STATE_DIR = "resume"
_MODEL, _BEST, _OPTIMIZER, _JSON = (
    "model.safetensors",
    "best.safetensors",
    "optimizer.safetensors",
    "state.json",
)


@dataclass
class LoopState:
    """Counters of the optimisation loop (everything but tensors)."""

    step: int = 0
    best_step: int = 0
    best_loss: float = float("inf")
    bad_evals: int = 0  # evaluations since the last improvement
    stopped: bool = False  # early stopping fired
    history: list[dict[str, float]] = field(default_factory=list)


def plain_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached, contiguous CPU copy of the module's state dict (safetensors-ready)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, entry in state["state"].items()
        for name, value in entry.items()
    }
    return tensors, state["param_groups"]


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_state(
    run_dir: Path,
    model: nn.Module,
    best: dict[str, Tensor],
    optimizer: torch.optim.Optimizer,
    loop: LoopState,
    fingerprint: dict[str, Any],
) -> None:
    """Write `<run_dir>/resume/` atomically."""
    with write_dir_atomic(run_dir / STATE_DIR) as tmp:
        save_file(plain_state(model), str(tmp / _MODEL))
        save_file(best, str(tmp / _BEST))
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / _OPTIMIZER))
        body = {"fingerprint": fingerprint, "loop": asdict(loop), "param_groups": groups}
        (tmp / _JSON).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")


def has_state(run_dir: Path) -> bool:
    return (run_dir / STATE_DIR / _JSON).is_file()


def state_fingerprint(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / STATE_DIR / _JSON).read_text())["fingerprint"])


def load_state(
    run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: dict[str, Any]
) -> tuple[LoopState, dict[str, Tensor]]:
    """Restore model and optimizer in place; returns the loop counters and the best weights."""
    folder = run_dir / STATE_DIR
    body = json.loads((folder / _JSON).read_text())
    if body["fingerprint"] != fingerprint:
        old = body["fingerprint"]
        changed = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        raise ValueError(
            f"{run_dir}: cannot resume, the run was started with different settings ({', '.join(changed)}); "
            "use the original settings or a new --out"
        )
    model.load_state_dict(load_file(folder / _MODEL), strict=True)
    _load_optimizer(optimizer, load_file(folder / _OPTIMIZER), body["param_groups"])
    return LoopState(**body["loop"]), load_file(folder / _BEST)
