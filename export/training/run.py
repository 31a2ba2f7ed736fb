"""A training run: model source + captions -> a deprojector checkpoint in the published format.

Run directory layout (`out`):
  deprojector/   the checkpoint (save_deprojector: config.json + model.safetensors); this is
                 what `python -m export --deprojector` and load_deprojector take
  resume/        resumable state (training/state.py)
  stamp.json     written last: the inputs' fingerprint and the run's numbers; a matching
                 stamp lets `train_or_reuse` skip training
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from export.bundle import dir_signature
from export.captions import DEFAULT_BUILTIN_COUNT, load_captions
from export.deprojector import (
    VARIANTS,
    Deprojector,
    VicinityConfig,
    VicinityDeprojector,
    clip_constants,
    from_clip,
    save_deprojector,
)
from export.deprojector.transformer import InputKind
from export.models import DEFAULT_SEED, PRESETS, load_model
from export.progress import release_memory
from export.training.data import training_pairs
from export.training.loop import LoopSettings, run_loop
from export.training.state import STATE_DIR, has_state, state_fingerprint

log = logging.getLogger(__name__)

TRAINABLE = (*VARIANTS, "vicinity")
CHECKPOINT_DIR = "deprojector"
STAMP = "stamp.json"
_CODE_ROOTS = ("training", "deprojector", "captions.py")


@dataclass(frozen=True)
class TrainOptions:
    model: str  # preset name (tiny, sd15) or a local diffusers SD 1.x folder
    out: Path  # run directory
    captions: str = "builtin"  # "builtin" or a file with one caption per line
    variant: str = "v3"
    steps: int = 5000
    batch: int = 100
    lr: float = 1e-3
    seed: int = 0  # augmentation plan, batch order, Vicinity init
    model_seed: int = DEFAULT_SEED  # weight seed of a preset
    projection: Path | None = None  # folder with CLIP's text_projection (W_P)
    builtin_count: int = DEFAULT_BUILTIN_COUNT
    holdout: int = 100
    eval_every: int | None = None  # default: once per epoch
    patience: int = 5
    cache_dir: Path | None = None  # default: ~/.cache/sdrt/clip_pairs
    encode_batch: int = 64
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads during the run (default: torch's choice)
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.variant not in TRAINABLE:
            raise ValueError(f"variant must be one of {', '.join(TRAINABLE)}; got {self.variant!r}")
        for name in ("steps", "batch", "holdout", "patience", "encode_batch", "builtin_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("eval_every", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")


@dataclass
class TrainResult:
    checkpoint: Path
    model: Deprojector  # the saved (best) weights, in eval mode on the CPU
    summary: dict[str, Any]  # what stamp.json records besides the fingerprint


def _code_digest() -> str:
    """sha256 over the sources that decide what training produces."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for name in _CODE_ROOTS:
        target = root / name
        for file in sorted(target.rglob("*.py")) if target.is_dir() else [target]:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def model_signature(opts: TrainOptions) -> dict[str, Any]:
    """Identity of the CLIP text model (what the encodings depend on)."""
    if opts.model in PRESETS:
        return {"preset": opts.model, "seed": opts.model_seed}
    path = Path(opts.model).resolve()
    return {
        "path": str(path),
        "text_encoder": dir_signature(path / "text_encoder"),
        "tokenizer": dir_signature(path / "tokenizer"),
    }


def _captions_digest(captions: list[str]) -> str:
    return hashlib.sha256("\n".join(captions).encode()).hexdigest()


def resume_fingerprint(opts: TrainOptions, captions: list[str]) -> dict[str, Any]:
    """What a run's trajectory depends on; resuming requires it unchanged (steps may grow)."""
    return {
        "model": model_signature(opts),
        "projection": dir_signature(opts.projection.resolve()) if opts.projection else None,
        "captions": _captions_digest(captions),
        "variant": opts.variant,
        "batch": opts.batch,
        "lr": opts.lr,
        "seed": opts.seed,
        "holdout": opts.holdout,
    }


def stamp_fingerprint(opts: TrainOptions, captions: list[str]) -> dict[str, Any]:
    """Everything the finished checkpoint depends on."""
    return {
        **resume_fingerprint(opts, captions),
        "steps": opts.steps,
        "eval_every": opts.eval_every,
        "patience": opts.patience,
        "code": _code_digest(),
    }


def _empty_ids(tokenizer: Any) -> Tensor:
    """ "" tokenized and padded to the context: [bos, eos, eos, ...]."""
    ids: Tensor = tokenizer("", padding="max_length", max_length=77, return_tensors="pt")["input_ids"][0]
    return ids


def initial_model(
    variant: str, text_encoder: nn.Module, text_projection: Tensor | None, tokenizer: Any, seed: int
) -> Deprojector:
    """The untrained deprojector: transformer variants copy CLIP's last layer (from_clip); the
    Vicinity model starts from a seeded random init with CLIP's sos/null constants."""
    empty = _empty_ids(tokenizer)
    if variant != "vicinity":
        return from_clip(text_encoder, text_projection, variant=variant, empty_ids=empty, input_kind="pooled")
    cfg: Any = text_encoder.config
    hidden = int(cfg.hidden_size)
    config = VicinityConfig(
        embed_dim=hidden,
        projection_dim=hidden if text_projection is None else int(text_projection.shape[0]),
        activation=str(cfg.hidden_act),
        first_embed_layer_dim=hidden,
        first_layer_dim=hidden,
        mlp_layer_dim=int(cfg.intermediate_size),
        layer_norm_eps=float(cfg.layer_norm_eps),
        seq_len=int(cfg.max_position_embeddings),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VicinityDeprojector(config)
    model.set_clip_constants(clip_constants(text_encoder, text_projection, empty))
    return model.eval()


def saved_input_kind(variant: str) -> InputKind:
    """The input kind the checkpoint declares: the variant's own (v1: text_embeds). Training
    always runs on pooled vectors, which is the same network (v1 = inv(W_P) + v2)."""
    kind: InputKind = VARIANTS.get(variant, {}).get("input_kind", "pooled")
    return kind


def _prepare_run_dir(opts: TrainOptions) -> bool:
    """Returns whether to resume. Refuses to clobber an existing run unless told to."""
    run = opts.out
    if opts.overwrite:
        shutil.rmtree(run / STATE_DIR, ignore_errors=True)
        shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)
        (run / STAMP).unlink(missing_ok=True)
        return False
    if has_state(run):
        if not opts.resume:
            raise FileExistsError(
                f"{run} holds a training run: pass --resume to continue it, --overwrite to start over, "
                "or choose another --out"
            )
        return True
    if opts.resume:
        log.info("%s: no saved state, starting a new run", run)
    return False


def train(opts: TrainOptions) -> TrainResult:
    """Train a deprojector and save it to `<out>/deprojector`; see the module docstring."""
    threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        return _train(opts)
    finally:
        torch.set_num_threads(threads)


def _train(opts: TrainOptions) -> TrainResult:
    start = time.perf_counter()
    captions = load_captions(opts.captions, opts.builtin_count)
    fingerprint = resume_fingerprint(opts, captions)
    resume = _prepare_run_dir(opts)
    components = load_model(opts.model, opts.model_seed, opts.projection)
    text_encoder, text_projection, tokenizer = (
        components.text_encoder,
        components.text_projection,
        components.tokenizer(),
    )
    del components  # the UNet and VAE are not needed
    release_memory()
    if saved_input_kind(opts.variant) == "text_embeds" and text_projection is None:
        raise ValueError(
            f"{opts.variant} takes text_embeds and needs CLIP's text_projection: pass --projection, "
            "or train v2 (the same network, taking pooled input)"
        )
    data = training_pairs(
        captions,
        holdout=opts.holdout,
        seed=opts.seed,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        model_signature=model_signature(opts),
        cache_dir=opts.cache_dir or Path.home() / ".cache" / "sdrt" / "clip_pairs",
        encode_batch=opts.encode_batch,
        device=opts.device,
    )
    model = initial_model(opts.variant, text_encoder.cpu(), text_projection, tokenizer, opts.seed)
    del text_encoder
    settings = LoopSettings(
        steps=opts.steps,
        batch=opts.batch,
        lr=opts.lr,
        seed=opts.seed,
        eval_every=opts.eval_every or max(1, len(data.train) // opts.batch),
        patience=opts.patience,
        device=opts.device,
    )
    loop = run_loop(model, data.train, data.held_out, settings, opts.out, fingerprint, resume)
    model = model.cpu().eval()
    if saved_input_kind(opts.variant) != "pooled":
        model = model.with_input_kind(saved_input_kind(opts.variant))
    checkpoint = save_deprojector(model, opts.out / CHECKPOINT_DIR, overwrite=True)
    best = next(m for m in loop.history if m["step"] == loop.best_step)
    summary = {
        "variant": opts.variant,
        "train_pairs": len(data.train),
        "held_out_pairs": len(data.held_out),
        "augmentation": data.kinds,
        "clip_cache_hit": data.cache_hit,
        "steps_run": loop.step,
        "early_stopped": loop.stopped,
        "best_step": loop.best_step,
        "initial": loop.history[0],
        "best": best,
        "seconds": round(time.perf_counter() - start, 3),
    }
    stamp = {"fingerprint": stamp_fingerprint(opts, captions), "summary": summary}
    (opts.out / STAMP).write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    return TrainResult(checkpoint=checkpoint, model=model, summary=summary)


def train_or_reuse(model_source: str, out_dir: Path, **options: Any) -> Path:
    """The checkpoint directory for these inputs: reused when `out_dir` holds a finished run of
    the same fingerprint, resumed when it holds an interrupted one, trained afresh otherwise.

    `options` are TrainOptions fields (captions, variant, steps, ...).
    """
    opts = TrainOptions(model=model_source, out=Path(out_dir), **options)
    captions = load_captions(opts.captions, opts.builtin_count)
    stamp_path = opts.out / STAMP
    checkpoint = opts.out / CHECKPOINT_DIR
    if stamp_path.is_file() and (checkpoint / "config.json").is_file():
        stamp = json.loads(stamp_path.read_text())
        if stamp.get("fingerprint") == stamp_fingerprint(opts, captions):
            log.info("reusing trained deprojector %s", checkpoint)
            return checkpoint
    resume = has_state(opts.out) and state_fingerprint(opts.out) == resume_fingerprint(opts, captions)
    return train(dataclasses.replace(opts, resume=resume, overwrite=not resume)).checkpoint
