"""CLIP's image tower in the bundle (`clip_vision.onnx`, for CLIP scores): where it comes from (a
preset's own, a diffusers folder's `image_encoder/` or `safety_checker/`, or none at all), the
preprocessing recorded with it, and that adding it to the presets changed none of their weights.

The tiny preset's tower itself (fp32/fp16 parity, manifest entry) is checked with the other models
in tests/test_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.build import ExportOptions, export_bundle, fingerprint
from export.bundle import reusable
from export.models import (
    build_preset,
    has_vision_tower,
    load_model,
    load_vision_tower,
    save_diffusers_folder,
)
from runtime.bundle import Bundle
from runtime.manifest import VisionManifest
from runtime.specs import CLIP_VISION, clip_vision_spec

pytestmark = pytest.mark.integration  # builds and exports torch models

SIDE = 48  # the safety checker's image size here: not the tiny preset's 32
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.26, 0.27)


def _state_dicts_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("preset", ["tiny", "tiny-inpaint", pytest.param("sd15", marks=pytest.mark.slow)])
def test_the_tower_leaves_the_presets_other_weights_unchanged(preset: str, tmp_path: Path) -> None:
    """The tower is seeded on its own (seed + 2) after the rest: text encoder, UNet, VAE and text
    projection are bit-identical to a build without it, so old bundles' weights stay reproducible."""
    with_tower = build_preset(preset, cache_dir=tmp_path)
    without = build_preset(preset, cache_dir=tmp_path, with_vision=False)
    assert with_tower.vision is not None and without.vision is None
    for name in ("text_encoder", "unet", "vae"):
        assert _state_dicts_equal(getattr(with_tower, name), getattr(without, name)), name
    assert with_tower.text_projection is not None and without.text_projection is not None
    assert torch.equal(with_tower.text_projection, without.text_projection)
    tower = with_tower.vision
    assert tower.source == "preset" and tower.projection_dim == with_tower.text_projection.shape[0]
    assert (tower.mean, tower.std) == (
        (0.48145466, 0.4578275, 0.40821073),
        (0.26862954, 0.26130258, 0.27577711),
    )


def _safety_checker(seed: int = 0) -> Any:
    """diffusers' StableDiffusionSafetyChecker around a small CLIP (SD 1.x ships ViT-L/14 in one)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    config = CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        vision_config={
            "image_size": SIDE,
            "patch_size": 16,
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "hidden_act": "quick_gelu",
        },
        projection_dim=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return StableDiffusionSafetyChecker(config).eval()


def _write_feature_extractor(folder: Path, crop: object) -> None:
    (folder / "feature_extractor").mkdir(parents=True, exist_ok=True)
    config = {
        "crop_size": crop,
        "image_mean": list(MEAN),
        "image_std": list(STD),
        "size": {"shortest_edge": SIDE},
    }
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(config))


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return float(((a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))).min())


def test_a_folder_without_a_tower_then_with_a_safety_checker(tmp_path: Path) -> None:
    """No image_encoder/ or safety_checker/: a bundle without clip_vision that opens. Add diffusers'
    safety checker: the bundle is no longer reusable, and the re-export's clip_vision is the
    checker's vision_model + visual_projection, preprocessed as its feature_extractor/ says."""
    folder = save_diffusers_folder(
        build_preset("tiny", cache_dir=tmp_path / "cache", with_vision=False), tmp_path / "sd"
    )
    assert not has_vision_tower(str(folder)) and load_vision_tower(folder) is None
    out = tmp_path / "bundle"
    opts = ExportOptions(model=str(folder), out=out, precision="fp32", deprojector="none")
    result = export_bundle(opts)
    assert CLIP_VISION not in result.manifest.models and result.manifest.vision is None
    bundle = Bundle.open(out)
    assert CLIP_VISION not in bundle.models and "vision" not in json.loads(
        (out / "manifest.json").read_text()
    )
    assert not any(r.name.endswith(CLIP_VISION) for r in result.stages)

    checker = _safety_checker()
    checker.save_pretrained(folder / "safety_checker")
    _write_feature_extractor(folder, {"height": SIDE, "width": SIDE})
    assert has_vision_tower(str(folder))
    assert reusable(out, fingerprint(opts))[0] is None  # the folder changed: export again
    result = export_bundle(opts)
    assert not result.reused
    bundle = Bundle.open(out)
    assert bundle.manifest.vision == VisionManifest(SIDE, MEAN, STD, "safety_checker")
    entry = bundle.models[CLIP_VISION]
    spec = clip_vision_spec(SIDE, 64)
    assert entry.spec.inputs == spec.inputs and entry.spec.outputs == spec.outputs
    assert "trace clip_vision" in {r.name for r in result.stages}
    session = ort.InferenceSession(str(out / entry.files["fp32"].file), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        pixels = torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = checker.visual_projection(checker.vision_model(pixels).pooler_output).numpy()
        (got,) = session.run(None, {"pixel_values": pixels.numpy()})
        assert got.shape == (batch, 64) and got.dtype == np.float32
        assert float(np.abs(got - want).max()) <= 1e-4 and _min_cosine(got, want) >= 0.99999
    assert reusable(out, fingerprint(opts))[0] is not None  # and now it is up to date
    # saved again as a folder (peers' copies), the tower stays a safety checker with its preprocessing
    copy = load_vision_tower(save_diffusers_folder(load_model(str(folder)), tmp_path / "copy"))
    assert copy is not None and (copy.source, copy.image_size, copy.mean, copy.std) == (
        "safety_checker",
        SIDE,
        MEAN,
        STD,
    )


def test_image_encoder_is_preferred_and_preprocessing_is_read(tmp_path: Path) -> None:
    """image_encoder/ (CLIPVisionModelWithProjection) before safety_checker/; crop_size as a plain
    int (older preprocessor configs) is read too; without feature_extractor/, OpenAI's constants."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    _safety_checker().save_pretrained(tmp_path / "safety_checker")
    tower = load_vision_tower(tmp_path)
    assert tower is not None and tower.source == "safety_checker" and tower.image_size == SIDE
    assert tower.mean == (0.48145466, 0.4578275, 0.40821073)
    config = CLIPVisionConfig(image_size=SIDE, patch_size=16, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, projection_dim=16)  # fmt: skip
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "image_encoder")
    _write_feature_extractor(tmp_path, SIDE)
    tower = load_vision_tower(tmp_path)
    assert tower is not None and tower.source == "image_encoder" and tower.projection_dim == 16
    assert (tower.image_size, tower.mean, tower.std) == (SIDE, MEAN, STD)
