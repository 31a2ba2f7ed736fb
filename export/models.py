"""Model sources: a local diffusers SD 1.x folder, or a seeded random-weight preset.

No model hub is reachable, so presets stand in for real checkpoints in tests, demos and
benchmarks: `tiny` (seconds) and `sd15` (the real SD 1.5 shapes). The same seed always gives
bit-identical weights, so two processes build the same model without sharing files.

Both may bring CLIP's image tower (for CLIP scores): presets build one of the real shapes (sd15:
ViT-L/14, as in openai/clip-vit-large-patch14); a folder's comes from `image_encoder/` or, as SD 1.x
ships it, from the vision half of `safety_checker/`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from export.tokenizer_files import write_clip_tokenizer_files
from runtime.schedulers import SD15_SCHEDULER
from runtime.specs import INPAINT_CHANNELS

log = logging.getLogger(__name__)

PRESETS = ("tiny", "sd15", "tiny-inpaint", "sd15-inpaint")
DEFAULT_SEED = 0
INPAINT_SUFFIX = "-inpaint"  # the same model with an inpainting UNet (SD 1.5 inpainting's 9 inputs)
# OpenAI CLIP's pixel normalization (CLIPImageProcessor's defaults), for towers without a feature_extractor/
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_ENCODER_DIR, SAFETY_CHECKER_DIR, FEATURE_EXTRACTOR_DIR = (
    "image_encoder",
    "safety_checker",
    "feature_extractor",
)
VISION_SOURCES = ("preset", IMAGE_ENCODER_DIR, SAFETY_CHECKER_DIR)

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
        "vision": {  # projection_dim: the tiny text projection's width, so CLIP scores can be taken
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "projection_dim": 64,
            "hidden_act": "quick_gelu",
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
        "vision": {  # ViT-L/14 as in openai/clip-vit-large-patch14 (SD 1.5's safety checker's tower)
            "image_size": 224,
            "patch_size": 14,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "projection_dim": 768,
            "hidden_act": "quick_gelu",
        },
    },
}


@dataclass
class VisionTower:
    """CLIP's image tower: pixel_values -> `vision_model`'s pooled output (the class token after
    post_layernorm) -> `visual_projection` = image_embeds, and the pixel preprocessing it expects
    (CLIPImageProcessor's: shortest side to `image_size`, centre crop, `mean`/`std`)."""

    vision_model: nn.Module  # CLIPVisionTransformer or CLIPVisionModel: called with pixel_values=
    visual_projection: nn.Linear
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # one of VISION_SOURCES: where it came from
    # What was loaded (CLIPVisionModelWithProjection or StableDiffusionSafetyChecker), to save it again.
    module: nn.Module

    @property
    def projection_dim(self) -> int:
        return int(self.visual_projection.out_features)


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
    vision: VisionTower | None = None  # CLIP's image tower, when the source has one

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


def build_preset(
    name: str, seed: int = DEFAULT_SEED, cache_dir: Path | None = None, with_vision: bool = True
) -> SDComponents:
    """A preset model with seeded random weights (identical for the same name and seed).

    `<base>-inpaint` is `<base>` with an inpainting UNet: 9 input channels, as in SD 1.5 inpainting.
    `with_vision`: also CLIP's image tower (seeded with seed + 2, built after the rest)."""
    if name not in PRESETS:
        raise ValueError(f"model preset must be one of {', '.join(PRESETS)}; got {name!r}")
    base = name.removesuffix(INPAINT_SUFFIX)
    cfg = _CONFIGS[base]
    unet_config = {**cfg["unet"], **({"in_channels": INPAINT_CHANNELS} if name != base else {})}
    with _seeded(seed):
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["clip"]))
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**cfg["vae"])
    vision = None
    if with_vision:  # its own seed, after the others: their weights are the same with or without it
        with _seeded(seed + 2):
            vision = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg["vision"])).eval()
    tokenizer_dir = write_clip_tokenizer_files((cache_dir or _default_cache()) / "clip_tokenizer")
    return SDComponents(
        text_encoder=text_encoder.eval(),
        unet=unet.eval(),
        vae=vae.eval(),
        tokenizer_dir=tokenizer_dir,
        scheduler_config=dict(SD15_SCHEDULER),
        text_projection=_random_projection(cfg["clip"]["hidden_size"], seed),
        source={"kind": "preset", "preset": name, "seed": seed},
        vision=None if vision is None else _tower(vision, "preset", None),
    )


def _default_cache() -> Path:
    return Path.home() / ".cache" / "sdrt"


def _tower(module: nn.Module, source: str, folder: Path | None) -> VisionTower:
    """A VisionTower from a CLIPVisionModelWithProjection or a StableDiffusionSafetyChecker (both
    have `.vision_model` and `.visual_projection`), preprocessing from the folder's feature_extractor/."""
    vision_model: Any = module.vision_model
    size = int(vision_model.config.image_size)
    mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    config_file = None if folder is None else folder / FEATURE_EXTRACTOR_DIR / "preprocessor_config.json"
    if config_file is not None and config_file.is_file():
        config = json.loads(config_file.read_text())
        mean = _triple(config.get("image_mean", mean), config_file, "image_mean")
        std = _triple(config.get("image_std", std), config_file, "image_std")
        crop = config.get("crop_size", size)
        crop_sides = {int(crop["height"]), int(crop["width"])} if isinstance(crop, dict) else {int(crop)}
        if crop_sides != {size}:  # the tower's position embeddings fix its input size
            log.warning("%s: crop_size %s is not the %s/ tower's input side %d; using %d", config_file,
                        crop, source, size, size)  # fmt: skip
    projection: Any = module.visual_projection
    return VisionTower(vision_model, projection, size, mean, std, source, module)


def _triple(values: Any, where: Path, key: str) -> tuple[float, float, float]:
    if isinstance(values, (int, float)):
        values = [values] * 3
    if not isinstance(values, (list, tuple)) or len(values) != 3:
        raise ValueError(f"{where}: {key} must be 3 numbers; got {values!r}")
    return (float(values[0]), float(values[1]), float(values[2]))


def vision_tower_dir(path: Path) -> str | None:
    """Which folder of a diffusers SD folder holds CLIP's image tower: `image_encoder` (preferred),
    `safety_checker`, or None."""
    for name in (IMAGE_ENCODER_DIR, SAFETY_CHECKER_DIR):
        if (Path(path) / name / "config.json").is_file():
            return name
    return None


def has_vision_tower(model: str) -> bool:
    """Whether `load_model(model)` brings CLIP's image tower (presets always do)."""
    return model in PRESETS or (Path(model).is_dir() and vision_tower_dir(Path(model)) is not None)


def load_vision_tower(path: Path) -> VisionTower | None:
    """CLIP's image tower of a diffusers SD folder (see vision_tower_dir), offline, fp32; or None."""
    found = vision_tower_dir(path)
    if found is None:
        return None
    module: nn.Module
    if found == IMAGE_ENCODER_DIR:
        module = CLIPVisionModelWithProjection.from_pretrained(path / found, local_files_only=True)
    else:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

        module = StableDiffusionSafetyChecker.from_pretrained(path / found, local_files_only=True)
    return _tower(module.float().eval(), found, path)


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


class UnsupportedModel(ValueError):
    """A model folder this exporter cannot turn into a bundle that behaves like the original."""


def _check_unet_config(path: Path) -> None:
    """Refuse UNets whose extra inputs the bundle's UNet graph does not carry."""
    config = json.loads((path / "unet" / "config.json").read_text())
    if config.get("time_cond_proj_dim") is not None:
        raise UnsupportedModel(
            f"{path}: its UNet takes a guidance embedding (time_cond_proj_dim "
            f"{config['time_cond_proj_dim']}, an LCM-distilled UNet), which the exported UNet graph has "
            "no input for; use a standard SD 1.x UNet (LCM-LoRA) with --scheduler lcm instead"
        )
    if config.get("addition_embed_type") is not None or config.get("class_embed_type") is not None:
        raise UnsupportedModel(f"{path}: its UNet takes extra class/addition embeddings; SD 1.x UNets do not")


def load_diffusers_folder(path: Path, projection: Path | None = None) -> SDComponents:
    """An SD 1.x diffusers folder (text_encoder, tokenizer, unet, vae, scheduler; optionally CLIP's
    image tower: load_vision_tower), offline."""
    path = Path(path)
    missing = [
        d for d in ("text_encoder", "tokenizer", "unet", "vae", "scheduler") if not (path / d).is_dir()
    ]
    if missing:
        raise FileNotFoundError(
            f"{path} is not a diffusers SD 1.x folder: missing {', '.join(d + '/' for d in missing)}"
        )
    _check_unet_config(path)
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
        vision=load_vision_tower(path),
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
    random weights can be fed to other tools (Optimum's exporter) and to the folder loader.

    CLIP's image tower goes back where it came from (`image_encoder/` or `safety_checker/`, with
    its preprocessing in `feature_extractor/`) but stays out of model_index.json: pipelines built
    from the folder load no tower and run no safety checker, as before."""
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
    if components.vision is not None:
        _save_vision_tower(components.vision, path)
    return path


def _save_vision_tower(tower: VisionTower, path: Path) -> None:
    module: Any = tower.module
    module.save_pretrained(
        path / (SAFETY_CHECKER_DIR if tower.source == SAFETY_CHECKER_DIR else IMAGE_ENCODER_DIR)
    )
    size = tower.image_size
    processor = {  # CLIPImageProcessor's preprocessor_config.json
        "crop_size": {"height": size, "width": size},
        "do_center_crop": True,
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": list(tower.mean),
        "image_processor_type": "CLIPImageProcessor",
        "image_std": list(tower.std),
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"shortest_edge": size},
    }
    (path / FEATURE_EXTRACTOR_DIR).mkdir(parents=True, exist_ok=True)
    (path / FEATURE_EXTRACTOR_DIR / "preprocessor_config.json").write_text(
        json.dumps(processor, indent=2) + "\n"
    )
