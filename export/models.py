"""Model sources: a local diffusers SD 1.x folder, or a seeded random-weight preset.

No model hub is reachable, so presets stand in for real checkpoints in tests, demos and
benchmarks: `tiny` (seconds) and `sd15` (the real SD 1.5 shapes). The same seed always gives
bit-identical weights, so two processes build the same model without sharing files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from export.tokenizer_files import write_clip_tokenizer_files
from runtime.schedulers import SD15_SCHEDULER
from runtime.specs import INPAINT_CHANNELS

PRESETS = ("tiny", "sd15", "tiny-inpaint", "sd15-inpaint")
DEFAULT_SEED = 0
INPAINT_SUFFIX = "-inpaint"  # the same model with an inpainting UNet (SD 1.5 inpainting's 9 inputs)

_CLIP_IDS = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "clip": {
            **_CLIP_IDS,
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "projection_dim": 64,
        },
        "unet": {
            "sample_size": 16,
            "block_out_channels": (32, 64),
            "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
            "cross_attention_dim": 64,
            "attention_head_dim": 8,
            "norm_num_groups": 32,
        },
        "vae": {
            "sample_size": 128,
            "block_out_channels": (32, 32, 64, 64),
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
        },
    },
    "sd15": {
        "clip": {
            **_CLIP_IDS,
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "projection_dim": 768,
        },
        "unet": {"sample_size": 64, "cross_attention_dim": 768},
        "vae": {
            "sample_size": 512,
            "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2,
            "latent_channels": 4,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
        },
    },
}


@dataclass
class SDComponents:
    """Everything the reference pipeline and the exporter need, in eval mode, fp32."""

    text_encoder: CLIPTextModel
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    tokenizer_dir: Path
    scheduler_config: dict[str, Any]
    # (projection_dim, hidden) like HF's text_projection.weight; SD folders do not carry it.
    text_projection: torch.Tensor | None
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return int(self.text_encoder.config.hidden_size)

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_pretrained(self.tokenizer_dir)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global RNG for module init without disturbing the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _random_projection(dim: int, seed: int) -> torch.Tensor:
    """A well-conditioned random projection (scaled orthogonal), so its inverse is exact."""
    gen = torch.Generator().manual_seed(seed + 1)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return (q * dim**-0.5 * 8.0).to(torch.float32)


def build_preset(name: str, seed: int = DEFAULT_SEED, cache_dir: Path | None = None) -> SDComponents:
    """A preset model with seeded random weights (identical for the same name and seed).

    `<base>-inpaint` is `<base>` with an inpainting UNet: 9 input channels, as in SD 1.5 inpainting."""
    if name not in PRESETS:
        raise ValueError(f"model preset must be one of {', '.join(PRESETS)}; got {name!r}")
    base = name.removesuffix(INPAINT_SUFFIX)
    cfg = _CONFIGS[base]
    unet_config = {**cfg["unet"], **({"in_channels": INPAINT_CHANNELS} if name != base else {})}
    with _seeded(seed):
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["clip"]))
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**cfg["vae"])
    tokenizer_dir = write_clip_tokenizer_files((cache_dir or _default_cache()) / "clip_tokenizer")
    return SDComponents(
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        tokenizer_dir=tokenizer_dir,
        scheduler_config=dict(SD15_SCHEDULER),
        text_projection=_random_projection(cfg["clip"]["hidden_size"], seed),
        source={"kind": "preset", "preset": name, "seed": seed},
    )


def _default_cache() -> Path:
    return Path.home() / ".cache" / "sdrt"


def load_text_projection(path: Path) -> torch.Tensor:
    """W_P from a CLIPTextModelWithProjection folder or a deprojector checkpoint (inv of its projection)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in (path / "model.safetensors", path / "pytorch_model.bin"):
        if file.is_file():
            tensors = (
                load_file(file)
                if file.suffix == ".safetensors"
                else torch.load(file, map_location="cpu", weights_only=True)
            )
            break
    else:
        raise FileNotFoundError(f"--projection {path}: no model.safetensors or pytorch_model.bin there")
    if "text_projection.weight" in tensors:
        return tensors["text_projection.weight"].float()
    if "projection.weight" in tensors:  # deprojector checkpoints store inv(W_P)
        inverse = tensors["projection.weight"].double()
        if not torch.isfinite(inverse).all():
            raise ValueError(f"--projection {path}: this deprojector was built without a text_projection")
        return torch.linalg.inv(inverse).float()
    raise KeyError(
        f"--projection {path}: found neither 'text_projection.weight' (CLIPTextModelWithProjection) "
        "nor 'projection.weight' (a deprojector checkpoint)"
    )


def load_diffusers_folder(path: Path, projection: Path | None = None) -> SDComponents:
    """An SD 1.x diffusers folder (text_encoder, tokenizer, unet, vae, scheduler), offline."""
    path = Path(path)
    missing = [
        d for d in ("text_encoder", "tokenizer", "unet", "vae", "scheduler") if not (path / d).is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a diffusers SD 1.x folder: missing {', '.join(d + '/' for d in missing)}"
        )
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    return SDComponents(
        text_encoder=CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True).eval(),
        unet=UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True).eval(),
        vae=AutoencoderKL.from_pretrained(path / "vae", local_files_only=True).eval(),
        tokenizer_dir=path / "tokenizer",
        scheduler_config=scheduler_config,
        text_projection=load_text_projection(projection) if projection else None,
        source={
            "kind": "diffusers_folder",
            "path": str(path.resolve()),
            "projection": str(projection) if projection else None,
        },
    )


def load_model(model: str, seed: int = DEFAULT_SEED, projection: Path | None = None) -> SDComponents:
    """`tiny` / `sd15` preset, or a path to a local diffusers folder."""
    if model in PRESETS:
        components = build_preset(model, seed)
        if projection is not None:
            components.text_projection = load_text_projection(projection)
        return components
    if not Path(model).is_dir():
        raise ValueError(f"--model must be one of {', '.join(PRESETS)} or a diffusers folder; got {model!r}")
    return load_diffusers_folder(Path(model), projection)


def load_bundle_model(bundle: Path) -> SDComponents:
    """The PyTorch model a bundle was exported from (its manifest's `source`: preset + seed, or a
    diffusers folder), for peers and references that must start from exactly the bundle's weights."""
    from runtime.bundle import Bundle

    source = Bundle.open(bundle).manifest.source
    if source.get("kind") == "preset":
        return load_model(str(source["preset"]), seed=int(source.get("seed") or 0))
    if source.get("kind") == "diffusers_folder":
        return load_model(str(source["path"]))
    raise ValueError(f"{bundle}/manifest.json does not name the model it was exported from")


def save_diffusers_folder(components: SDComponents, path: Path) -> Path:
    """Write components as a standard diffusers SD folder (with model_index.json), so the same
    random weights can be fed to other tools (Optimum's exporter) and to the folder loader."""
    import diffusers

    config = components.scheduler_config
    scheduler = getattr(diffusers, config.get("_class_name", "PNDMScheduler")).from_config(config)
    diffusers.StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer(),
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)
    for name in ("vocab.json", "merges.txt"):  # slow-tokenizer files, for tools on transformers 4
        source = components.tokenizer_dir / name
        if source.is_file():
            (path / "tokenizer" / name).write_bytes(source.read_bytes())
    return path
