"""Model sources: presets are deterministic, sd15 has SD 1.5's exact shapes, folders load offline."""

from __future__ import annotations

import pytest
import torch

from export.models import build_preset, load_model, load_text_projection, save_diffusers_folder

pytestmark = pytest.mark.integration  # builds the torch models


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_same_seed_gives_bit_identical_weights(tmp_path):
    a, b = build_preset("tiny", seed=3, cache_dir=tmp_path), build_preset("tiny", seed=3, cache_dir=tmp_path)
    for name in ("text_encoder", "unet", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert torch.equal(a.text_projection, b.text_projection)


def test_different_seed_gives_different_weights(tmp_path):
    a, b = build_preset("tiny", seed=0, cache_dir=tmp_path), build_preset("tiny", seed=1, cache_dir=tmp_path)
    assert not torch.equal(a.unet.conv_in.weight, b.unet.conv_in.weight)


def test_preset_does_not_disturb_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_preset("tiny", cache_dir=tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="tiny, sd15"):
        load_model("sd99")


def test_diffusers_folder_round_trip(tmp_path):
    preset = build_preset("tiny", cache_dir=tmp_path / "cache")
    folder = save_diffusers_folder(preset, tmp_path / "sd")
    loaded = load_model(str(folder))
    assert loaded.text_projection is None and loaded.source["kind"] == "diffusers_folder"
    ids = torch.tensor([[49406, 320, 2368, 49407] + [49407] * 73])
    with torch.no_grad():
        assert torch.equal(
            preset.text_encoder(ids).last_hidden_state, loaded.text_encoder(ids).last_hidden_state
        )
    assert loaded.scheduler_config["beta_schedule"] == "scaled_linear"


def test_folder_missing_parts_are_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="text_encoder/, tokenizer/, vae/, scheduler/"):
        load_model(str(tmp_path))


def test_projection_from_clip_with_projection_folder_and_deprojector_checkpoint(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(8, 8, dtype=torch.float64) + 4 * torch.eye(8, dtype=torch.float64)
    (tmp_path / "clip").mkdir()
    save_file({"text_projection.weight": w.float()}, tmp_path / "clip" / "model.safetensors")
    assert torch.equal(load_text_projection(tmp_path / "clip"), w.float())
    (tmp_path / "deproj").mkdir()
    torch.save({"projection.weight": torch.linalg.inv(w).float()}, tmp_path / "deproj" / "pytorch_model.bin")
    torch.testing.assert_close(load_text_projection(tmp_path / "deproj"), w.float(), atol=1e-4, rtol=1e-4)
    (tmp_path / "other").mkdir()
    save_file({"x": torch.zeros(1)}, tmp_path / "other" / "model.safetensors")
    with pytest.raises(KeyError, match="text_projection.weight"):
        load_text_projection(tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="--projection"):
        load_text_projection(tmp_path / "missing")


@pytest.mark.slow
def test_sd15_has_the_real_parameter_counts(tmp_path):
    sd15 = build_preset("sd15", cache_dir=tmp_path)
    assert _params(sd15.unet) == 859_520_964
    assert _params(sd15.text_encoder) == 123_060_480
    assert _params(sd15.vae) == 83_653_863  # SD 1.5's AutoencoderKL (encoder + decoder)
