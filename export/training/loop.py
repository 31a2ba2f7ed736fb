"""The optimisation loop: teacher-forced Adam steps, held-out evaluation, early stopping.

Training uses the teacher-forced pass (one causal pass per batch); what the runtime does is
free-run (`model.forward`, each output fed back), and the two diverge (upstream: ~0.11 vs
~0.8). So every evaluation reports both on the held-out pairs, and early stopping and the
kept ("best") weights follow the free-running loss.

Ensemble members are trained as independent units (upstream trained units one by one and
merged them): each member has its own loss and its own shuffle of the data, so members that
start as identical copies of CLIP's last layer still diverge. Batch order depends only on
(seed, epoch, member), which makes a resumed run take the same steps as an uninterrupted one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from export.deprojector import Deprojector
from export.training.loss import position_cosine, weighted_mse
from export.training.pairs import Pairs
from export.training.state import LoopState, has_state, load_state, plain_state, save_state
from export.training.teacher import member_count, teacher_forced, teacher_forced_mean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopSettings:
    steps: int  # total optimizer steps (a resumed run continues up to this count)
    batch: int
    lr: float
    seed: int
    eval_every: int  # steps between held-out evaluations (and resume-state saves)
    patience: int  # evaluations without improvement before stopping
    device: str = "cpu"


def _to(pairs: Pairs, device: str) -> Pairs:
    return Pairs(pairs.inputs.to(device), pairs.targets.to(device), pairs.weights.to(device))


@torch.no_grad()
def evaluate(model: Deprojector, pairs: Pairs, batch: int, device: str = "cpu") -> dict[str, float]:
    """Held-out weighted losses and position cosines, free-running and teacher-forced."""
    model.eval()
    totals = dict.fromkeys(("free_loss", "tf_loss", "free_cosine", "tf_cosine"), 0.0)
    for start in range(0, len(pairs), batch):
        chunk = _to(pairs.take(slice(start, start + batch)), device)
        free = model(chunk.inputs)
        forced = teacher_forced_mean(model, chunk.inputs, chunk.targets)
        size = len(chunk)
        totals["free_loss"] += weighted_mse(free, chunk.targets, chunk.weights).item() * size
        totals["tf_loss"] += weighted_mse(forced, chunk.targets, chunk.weights).item() * size
        totals["free_cosine"] += position_cosine(free, chunk.targets).item() * size
        totals["tf_cosine"] += position_cosine(forced, chunk.targets).item() * size
    return {k: v / len(pairs) for k, v in totals.items()}


class _Batches:
    """Indices of member k's batch at a step: epoch-wise shuffles, full batches only."""

    def __init__(self, size: int, batch: int, seed: int) -> None:
        self.size, self.batch, self.seed = size, min(batch, size), seed
        self.per_epoch = size // self.batch
        self._perms: dict[tuple[int, int], Tensor] = {}

    def __call__(self, step: int, member: int) -> Tensor:
        epoch, offset = divmod(step, self.per_epoch)
        key = (epoch, member)
        if key not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k[0] == epoch}
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch * 1009 + member)
            self._perms[key] = torch.randperm(self.size, generator=gen)
        return self._perms[key][offset * self.batch : (offset + 1) * self.batch]


def _train_step(
    model: Deprojector,
    optimizer: torch.optim.Optimizer,
    train: Pairs,
    batches: _Batches,
    step: int,
    device: str,
) -> float:
    """One Adam step on every member's own batch; returns the mean member loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    members = member_count(model)
    total = 0.0
    for k in range(members):
        chunk = _to(train.take(batches(step, k)), device)
        loss = weighted_mse(
            teacher_forced(model, chunk.inputs, chunk.targets, k), chunk.targets, chunk.weights
        )
        (loss / members).backward()  # members share no parameters: this is k independent losses
        total += loss.item() / members
    optimizer.step()
    return total


def _record(loop: LoopState, metrics: dict[str, Any], patience: int) -> bool:
    """Append an evaluation; True when it is the new best. Sets `stopped` after `patience` misses."""
    loop.history.append(metrics)
    if metrics["free_loss"] < loop.best_loss:
        loop.best_loss, loop.best_step, loop.bad_evals = metrics["free_loss"], loop.step, 0
        return True
    loop.bad_evals += 1
    loop.stopped = loop.bad_evals >= patience
    return False


def _describe(metrics: dict[str, Any]) -> str:
    return (
        f"step {metrics['step']}: held-out free-running {metrics['free_loss']:.4f} "
        f"(cosine {metrics['free_cosine']:.4f}), teacher-forced {metrics['tf_loss']:.4f} "
        f"(cosine {metrics['tf_cosine']:.4f})"
    )


def run_loop(
    model: Deprojector,
    train: Pairs,
    held_out: Pairs,
    settings: LoopSettings,
    run_dir: Path,
    fingerprint: dict[str, Any],
    resume: bool,
) -> LoopState:
    """Train `model` in place and leave the best weights in it; resume state goes to run_dir."""
    model.to(settings.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=settings.lr)
    if resume and has_state(run_dir):
        loop, best = load_state(run_dir, model, optimizer, fingerprint)
        log.info(
            "resuming %s at step %d (best %.4f at step %d)",
            run_dir,
            loop.step,
            loop.best_loss,
            loop.best_step,
        )
    else:
        loop = LoopState()
        initial = {"step": 0, **evaluate(model, held_out, settings.batch, settings.device)}
        log.info("initial %s", _describe(initial))
        _record(loop, initial, settings.patience)
        best = plain_state(model)
        save_state(run_dir, model, best, optimizer, loop, fingerprint)
    batches = _Batches(len(train), settings.batch, settings.seed)
    losses: list[float] = []
    last = loop.history[-1]
    with tqdm(total=settings.steps, initial=min(loop.step, settings.steps), unit="step", desc="train") as bar:
        while loop.step < settings.steps and not loop.stopped:
            losses.append(_train_step(model, optimizer, train, batches, loop.step, settings.device))
            loop.step += 1
            bar.update(1)
            bar.set_postfix(
                train=f"{losses[-1]:.4f}", free=f"{last['free_loss']:.4f}", tf=f"{last['tf_loss']:.4f}"
            )
            if loop.step % settings.eval_every and loop.step != settings.steps:
                continue
            last = {"step": loop.step, "train_loss": sum(losses) / len(losses)}
            last.update(evaluate(model, held_out, settings.batch, settings.device))
            losses.clear()
            log.info(_describe(last))
            if _record(loop, last, settings.patience):
                best = plain_state(model)
            save_state(run_dir, model, best, optimizer, loop, fingerprint)
    if loop.stopped:
        log.info("early stop at step %d: no improvement in %d evaluations", loop.step, settings.patience)
    model.load_state_dict(best)
    model.eval()
    return loop
