"""Model sources: presets are deterministic, sd15 has SD 1.5's exact shapes, folders load offline."""

from __future__ import annotations

import json

import pytest
import torch

from export.models import build_preset, load_model, load_text_projection, save_diffusers_folder

pytestmark = pytest.mark.integration  # builds the torch models


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_same_seed_gives_bit_identical_weights(tmp_path):
    a, b = build_preset("tiny", seed=3, cache_dir=tmp_path), build_preset("tiny", seed=3, cache_dir=tmp_path)
    assert a.vision is not None and b.vision is not None
    for name, ma, mb in (
        *((n, getattr(a, n), getattr(b, n)) for n in ("text_encoder", "unet", "vae")),
        ("vision", a.vision.module, b.vision.module),
    ):
        sa, sb = ma.state_dict(), mb.state_dict()
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
    # CLIP's image tower: saved to image_encoder/ + feature_extractor/, outside model_index.json
    assert preset.vision is not None and loaded.vision is not None and loaded.vision.source == "image_encoder"
    assert (loaded.vision.image_size, loaded.vision.mean, loaded.vision.std) == (
        preset.vision.image_size,
        preset.vision.mean,
        preset.vision.std,
    )
    assert json.loads((folder / "model_index.json").read_text()).get("image_encoder") in (None, [None, None])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            preset.vision.module(pixel_values=pixels).image_embeds,
            loaded.vision.module(pixel_values=pixels).image_embeds,
        )


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
    assert sd15.vision is not None and sd15.vision.image_size == 224 and sd15.vision.projection_dim == 768
    assert _params(sd15.vision.module) == 303_966_208  # openai/clip-vit-large-patch14's vision half


def test_a_unet_with_inputs_the_graph_lacks_is_refused(tmp_path, capsys):
    """An LCM-distilled UNet's guidance embedding (timestep_cond) has no input in the exported graph:
    the export stops with the reason instead of writing a bundle that ignores it."""
    import json

    from export.__main__ import main
    from export.models import build_preset, save_diffusers_folder

    folder = save_diffusers_folder(build_preset("tiny", cache_dir=tmp_path / "cache"), tmp_path / "sd")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "time_cond_proj_dim": 32}))
    with pytest.raises(SystemExit) as stop:
        main(["--model", str(folder), "--out", str(tmp_path / "bundle")])
    assert stop.value.code == 2
    assert "guidance embedding (time_cond_proj_dim 32" in capsys.readouterr().err
    out = tmp_path / "bundle"
    assert not out.exists() or not any(out.iterdir())  # nothing staged is left behind
