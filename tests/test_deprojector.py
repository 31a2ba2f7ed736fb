"""export.deprojector: every published layout on a small random CLIP.

Checks the two inference paths against each other, the input layouts against the spec (with
transformers' own CLIPEncoderLayer), the Vicinity model against a transcription of upstream's
deque loop, BatchNorm folding, the projection inverse, and the checkpoint format.
"""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from collections import deque
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from export.deprojector import (
    VARIANTS,
    CheckpointError,
    DeprojectorConfig,
    TransformerDeprojector,
    VicinityConfig,
    VicinityDeprojector,
    clip_constants,
    from_clip,
    load_deprojector,
    published_state_dict,
    save_deprojector,
    variant_config,
)
from export.deprojector.layers import EncoderLayer, causal_mask

pytestmark = pytest.mark.integration  # imports torch

HIDDEN = 64
BOS, EOS = 49406, 49407
EMPTY_IDS = torch.tensor([BOS] + [EOS] * 76)  # "" tokenized and padded to 77
CLIP_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "pad_token_id": EOS,
}
TRANSFORMER_LAYOUTS = ["v1", "v2", "v3", "v4", "v5", "null_first_absolute"]
VICINITY_CONFIGS = {
    "v_combined": VicinityConfig(
        embed_dim=HIDDEN, projection_dim=HIDDEN, first_layer_dim=96, mlp_layer_dim=128
    ),
    "v_individual_side": VicinityConfig(
        embed_dim=HIDDEN,
        projection_dim=HIDDEN,
        use_individual_first_layer=True,
        first_embed_layer_dim=48,
        first_layer_dim=40,
        mlp_layer_dim=96,
        num_mlp_layers=2,
        use_side_input=True,
    ),
    "v_individual_sum_residual_ensemble": VicinityConfig(
        embed_dim=HIDDEN,
        projection_dim=HIDDEN,
        use_individual_first_layer=True,
        sum_after_first_activation=True,
        first_embed_layer_dim=32,
        first_layer_dim=48,
        mlp_layer_dim=96,
        use_residual_connection=True,
        vicinity=2,
        ensemble_size=2,
    ),
    "v_no_mlp_absolute": VicinityConfig(
        embed_dim=HIDDEN,
        projection_dim=HIDDEN,
        first_layer_dim=80,
        num_mlp_layers=0,
        relative_to_null=False,
    ),
}
ALL_LAYOUTS = TRANSFORMER_LAYOUTS + list(VICINITY_CONFIGS)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is as fast, and spinning OpenMP threads on a shared 2-core box
    can slow these 76-step chains down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip() -> CLIPTextModel:
    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG)).eval()


@pytest.fixture(scope="module")
def w_p() -> Tensor:
    """A random, well-conditioned W_P (condition number <= 4): Q diag(s) with s in [0.5, 2]."""
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(HIDDEN, HIDDEN, generator=gen))
    s = 0.5 + 1.5 * torch.rand(HIDDEN, generator=gen)
    return q * s


def perturb(model: nn.Module, seed: int) -> None:
    """Move every trainable weight off its CLIP copy so ensemble members really differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def randomize_batchnorm(model: nn.Module, seed: int, max_weight: float) -> None:
    """Non-trivial running stats and affine parameters for every BatchNorm.

    The gain weight/sqrt(var) stays below max_weight, so the 76-step chain stays bounded.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm1d):
                n = bn.num_features
                assert bn.running_mean is not None and bn.running_var is not None
                assert bn.num_batches_tracked is not None
                bn.running_mean.copy_(0.3 * torch.randn(n, generator=gen))
                bn.running_var.copy_(1.0 + 2.0 * torch.rand(n, generator=gen))
                bn.weight.copy_(max_weight * (0.5 + 0.5 * torch.rand(n, generator=gen)))
                bn.bias.copy_(0.2 * torch.randn(n, generator=gen))
                bn.num_batches_tracked.fill_(7)


def make_model(name: str, clip: CLIPTextModel, w_p: Tensor) -> Any:
    """A deprojector of layout `name` (same seed -> same weights), in eval mode."""
    if name in VICINITY_CONFIGS:
        torch.manual_seed(2)
        v = VicinityDeprojector(VICINITY_CONFIGS[name])
        v.set_clip_constants(clip_constants(clip, w_p, EMPTY_IDS))
        # two residual adds per step roughly double the gain: damp those chains more
        randomize_batchnorm(v, 3, max_weight=0.6 if v.config.use_residual_connection else 1.0)
        return v.eval()
    if name == "null_first_absolute":  # upstream's current code with relative_to_null=False
        v3 = make_model("v3", clip, w_p)
        model = TransformerDeprojector(dataclasses.replace(v3.config, relative_to_null=False))
        model.load_state_dict(v3.state_dict())
        return model.eval()
    model = from_clip(clip, w_p, variant=name, empty_ids=EMPTY_IDS)
    perturb(model, 4)
    return model


def model_input(model: nn.Module, batch: int = 2, seed: int = 5) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, HIDDEN, generator=gen)


# -- references written from the spec / upstream, independent of the module's forward --


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


def spec_states(model: Any, e: Tensor, steps: int) -> Tensor:
    """s_1..s_steps (B, steps, D) built from the spec's input layout with HF CLIPEncoderLayer."""
    c = model.config
    hf_config = CLIPTextConfig(**{**CLIP_CONFIG, "intermediate_size": c.intermediate_size})
    hf_config._attn_implementation = "eager"
    members = []
    for k in range(c.ensemble_size):
        layer = CLIPEncoderLayer(hf_config).eval()
        layer.load_state_dict(model.encoder_layer[k].state_dict())
        positions = model.position_embedding[k].weight
        norm = model.final_layer_norm[k]
        if c.layout == "embed_first":
            tokens = [e, model.sos_embed.expand_as(e)]
        else:
            n = model.null_embed
            base = e - n if c.relative_to_null else e
            if c.apply_mlp_to_input:
                assert model.mlp_to_input is not None
                mlp = model.mlp_to_input[k]
                first = nn.functional.linear(
                    quick_gelu(nn.functional.linear(base, *mlp.fc1.parameters())), *mlp.fc2.parameters()
                )
            else:
                first = n.expand_as(e)
            tokens = [first, base]
        states = []
        for t in range(1, steps + 1):
            x = torch.stack(tokens, dim=1) + positions[: t + 1]
            mask = causal_mask(t + 1, x.dtype)[None, None]
            s = norm(layer(x, mask)[:, t])
            states.append(s)
            tokens.append(s - model.null_embed if c.relative_to_null else s)
        members.append(torch.stack(states, dim=1))
    return sum(members[1:], members[0]) / len(members)


def upstream_vicinity(model: Any, embeds: Tensor) -> Tensor:
    """Transcription of upstream CLIPTextDeprojectorV.Inference (deque window, appendleft)."""
    c = model.config
    act = quick_gelu
    e = embeds - model.null_embed if c.relative_to_null else embeds

    def member(k: int, states: list[Tensor]) -> Tensor:
        residual = states[0]
        if c.use_individual_first_layer:
            assert model.linear1_embeds is not None and model.linear1_states is not None
            s0 = act(model.linear1_embeds[k](e))
            ss = [act(model.linear1_states[k](s)) for s in states]
            if c.sum_after_first_activation:
                ss = [sum(ss[1:], ss[0])]
            h = torch.cat([s0, *ss], dim=1)
        else:
            assert model.linear1 is not None
            h = act(model.linear1[k](torch.cat([e, *states], dim=1)))
        h = model.linear2[k](h)
        if c.use_residual_connection:
            h = h + residual
        for layer in model.mlp_layers[k]:
            r = h
            x = layer.norm(h)
            if c.use_side_input:
                x = torch.cat([e, x], dim=1)
            x = layer.linear2(act(layer.linear1(x)))
            h = x + r if c.use_residual_connection else x
        return model.final_norm[k](h)

    zero = torch.zeros_like(e)
    windows = [deque([zero] * c.vicinity, c.vicinity) for _ in range(c.ensemble_size)]
    out = [model.sos_embed.reshape(1, 1, -1).repeat(e.shape[0], 1, 1)]
    for _ in range(1, c.seq_len):
        outs = [member(k, list(windows[k])) for k in range(c.ensemble_size)]
        out.append((sum(outs[1:], outs[0]) / len(outs)).unsqueeze(1))
        for k in range(c.ensemble_size):
            windows[k].appendleft(outs[k] - model.null_embed if c.relative_to_null else outs[k])
    return torch.cat(out, dim=1)


# -- inference --


@pytest.mark.parametrize("name", ALL_LAYOUTS)
@torch.no_grad()
def test_output_shape_and_sos(name: str, clip: CLIPTextModel, w_p: Tensor) -> None:
    model = make_model(name, clip, w_p)
    out = model(model_input(model, batch=3))
    assert out.shape == (3, 77, HIDDEN)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 0], model.sos_embed.expand(3, -1))
    assert (out[:, 2:6] - out[:, 1:2]).abs().max() > 1e-4  # the chain moves


@pytest.mark.parametrize("name", TRANSFORMER_LAYOUTS)
@torch.no_grad()
def test_kv_cache_matches_full_reference(name: str, clip: CLIPTextModel, w_p: Tensor) -> None:
    model = make_model(name, clip, w_p)
    assert isinstance(model, TransformerDeprojector)
    x = model_input(model)
    cached, reference = model(x), model.forward_reference(x)
    assert (cached - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", TRANSFORMER_LAYOUTS)
@torch.no_grad()
def test_input_layout_matches_spec(name: str, clip: CLIPTextModel, w_p: Tensor) -> None:
    model = make_model(name, clip, w_p)
    assert isinstance(model, TransformerDeprojector)
    x = model_input(model)
    expected = spec_states(model, model.pooled_input(x), steps=3)
    assert (model(x)[:, 1:4] - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", list(VICINITY_CONFIGS))
@torch.no_grad()
def test_vicinity_matches_upstream_loop(name: str, clip: CLIPTextModel, w_p: Tensor) -> None:
    model = make_model(name, clip, w_p)
    assert isinstance(model, VicinityDeprojector)
    x = model_input(model)
    assert (model(x) - upstream_vicinity(model, x)).abs().max().item() <= 1e-5


@torch.no_grad()
def test_encoder_layer_matches_transformers(clip: CLIPTextModel) -> None:
    hf = clip.encoder.layers[-1]
    ours = EncoderLayer(HIDDEN, 128, 4, 1e-5, "quick_gelu")
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 77, HIDDEN)
    mask = causal_mask(77, x.dtype)
    assert (ours.full(x, mask) - hf(x, mask[None, None])).abs().max().item() <= 1e-6


@torch.no_grad()
def test_relative_layout_differs_from_absolute(clip: CLIPTextModel, w_p: Tensor) -> None:
    """v3 (relative), v1/v2 (embed first) and null-first absolute: same weights, other outputs."""
    v3 = make_model("v3", clip, w_p)
    v1 = TransformerDeprojector(dataclasses.replace(v3.config, layout="embed_first", relative_to_null=False))
    state = {k: v for k, v in v3.state_dict().items() if k != "null_embed"}
    v1.load_state_dict(state)
    absolute = make_model("null_first_absolute", clip, w_p)
    x = model_input(v3)
    out3, out1, out_abs = v3(x), v1.eval()(x), absolute(x)
    assert (out3 - out1).abs().max() > 1e-2
    assert (out3 - out_abs).abs().max() > 1e-2
    assert (out1 - out_abs).abs().max() > 1e-2


# -- CLIP constants and the projection --


@torch.no_grad()
def test_from_clip_copies_clip(clip: CLIPTextModel, w_p: Tensor) -> None:
    model: Any = from_clip(clip, w_p, variant="v5", empty_ids=EMPTY_IDS)
    empty = clip(input_ids=EMPTY_IDS[None])
    assert torch.equal(model.null_embed, empty.pooler_output[0])
    # BOS state is the same for every prompt (causal attention)
    other = torch.tensor([[BOS, 320, 1929, 539] + [EOS] * 73])
    assert (model.sos_embed - clip(input_ids=other).last_hidden_state[0, 0]).abs().max() <= 1e-6
    last = clip.encoder.layers[-1].state_dict()
    for k in range(4):
        for key, value in model.encoder_layer[k].state_dict().items():
            assert torch.equal(value, last[key])
        assert torch.equal(model.position_embedding[k].weight, clip.embeddings.position_embedding.weight)
        assert torch.equal(model.final_layer_norm[k].weight, clip.final_layer_norm.weight)
    assert not model.training


@torch.no_grad()
def test_projection_inverts_text_projection(clip: CLIPTextModel, w_p: Tensor) -> None:
    v2 = make_model("v2", clip, w_p)
    assert isinstance(v2, TransformerDeprojector)
    pooled = clip(input_ids=torch.tensor([[BOS, 320, 1929] + [EOS] * 74])).pooler_output  # (1, D)
    pooled = torch.cat([pooled, model_input(v2)])  # (3, D)
    text_embeds = pooled @ w_p.T  # what HF's text_projection computes
    assert (v2.projection(text_embeds) - pooled).abs().max().item() <= 1e-5
    # a text_embeds model on text_embeds == the pooled model on pooled, same weights
    v1 = v2.with_input_kind("text_embeds")
    assert v1.config.input_kind == "text_embeds"
    assert (v1(text_embeds) - v2(pooled)).abs().max().item() <= 1e-5


def test_v1_defaults_to_text_embeds_and_needs_projection(clip: CLIPTextModel, w_p: Tensor) -> None:
    assert from_clip(clip, w_p, variant="v1", empty_ids=EMPTY_IDS).config.input_kind == "text_embeds"
    with pytest.raises(ValueError, match="text_projection"):
        from_clip(clip, None, variant="v1", empty_ids=EMPTY_IDS)
    pooled_only = from_clip(clip, None, variant="v1", empty_ids=EMPTY_IDS, input_kind="pooled")
    assert torch.isnan(pooled_only.projection.weight).all()
    assert torch.isfinite(pooled_only(model_input(pooled_only))).all()
    with pytest.raises(ValueError, match="projection"):
        pooled_only.with_input_kind("text_embeds")


def test_from_clip_rejects_bad_arguments(clip: CLIPTextModel, w_p: Tensor) -> None:
    with pytest.raises(ValueError, match="unknown deprojector variant"):
        from_clip(clip, w_p, variant="v9", empty_ids=EMPTY_IDS)
    with pytest.raises(ValueError, match="77"):
        from_clip(clip, w_p, variant="v3", empty_ids=EMPTY_IDS[:10])
    with pytest.raises(ValueError, match="EOS"):
        from_clip(clip, w_p, variant="v3", empty_ids=torch.full((77,), BOS))
    with pytest.raises(ValueError, match="square"):
        from_clip(clip, w_p[:32], variant="v3", empty_ids=EMPTY_IDS)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="embed_first"):
        DeprojectorConfig(layout="embed_first", relative_to_null=True)
    with pytest.raises(ValueError, match="input_kind"):
        DeprojectorConfig(input_kind="image")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="divisible"):
        DeprojectorConfig(hidden_size=64, num_attention_heads=5)
    assert set(VARIANTS) == {"v1", "v2", "v3", "v4", "v5"}


# -- BatchNorm folding --


@pytest.mark.parametrize("name", list(VICINITY_CONFIGS))
@torch.no_grad()
def test_batchnorm_folding_is_exact(name: str, clip: CLIPTextModel, w_p: Tensor) -> None:
    model = make_model(name, clip, w_p)
    assert isinstance(model, VicinityDeprojector)
    folded = model.fold_batchnorm()
    assert not any(isinstance(m, nn.BatchNorm1d) for m in folded.modules())
    x = model_input(model, batch=3)
    assert (folded(x) - model(x)).abs().max().item() <= 1e-5
    # the running stats matter: with fresh BatchNorms the output is different
    fresh = VicinityDeprojector(model.config)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "norm" not in k}, strict=False)
    assert (fresh.eval()(x) - model(x)).abs().max() > 1e-2
    with pytest.raises(ValueError, match="folded"):
        published_state_dict(folded)


# -- checkpoints --


@pytest.mark.parametrize("safetensors", [True, False], ids=["safetensors", "bin"])
@pytest.mark.parametrize("name", ALL_LAYOUTS)
@torch.no_grad()
def test_checkpoint_round_trip(
    name: str, safetensors: bool, clip: CLIPTextModel, w_p: Tensor, tmp_path: Path
) -> None:
    model = make_model(name, clip, w_p)
    path = save_deprojector(model, tmp_path / "ckpt", safetensors=safetensors)
    weights = {"model.safetensors"} if safetensors else {"pytorch_model.bin"}
    assert {p.name for p in path.iterdir()} == {"config.json"} | weights
    loaded = load_deprojector(path)
    assert type(loaded) is type(model) and loaded.config == model.config
    assert not loaded.training
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = model_input(model)
    assert torch.equal(loaded(x), model(x))


def test_published_key_names(clip: CLIPTextModel, w_p: Tensor, tmp_path: Path) -> None:
    def saved(name: str) -> tuple[dict, set[str]]:
        path = save_deprojector(make_model(name, clip, w_p), tmp_path / name)
        return json.loads((path / "config.json").read_text()), set(load_file(path / "model.safetensors"))

    config, keys = saved("v1")
    assert config["model_type"] == "clip_text_model" and "null_embed" not in keys
    assert {"projection.weight", "position_ids", "sos_embed", "position_embedding.weight"} <= keys
    assert {"encoder_layer.self_attn.q_proj.weight", "encoder_layer.layer_norm1.bias"} <= keys
    assert {"encoder_layer.mlp.fc2.weight", "final_layer_norm.bias"} <= keys
    config, keys = saved("v3")
    assert config["model_type"] == "clip_text_model" and "null_embed" in keys
    assert "encoder_layer.0.self_attn.q_proj.weight" not in keys
    config, keys = saved("v4")
    assert config["model_type"] == "clip_text_deprojector_model" and config["ensemble_size"] == 4
    assert {
        "encoder_layer.3.mlp.fc2.bias",
        "position_embedding.2.weight",
        "final_layer_norm.1.weight",
    } <= keys
    assert not any(k.startswith("mlp_to_input") for k in keys)
    config, keys = saved("v5")
    assert config["apply_mlp_to_input"] is True and config["relative_to_null"] is True
    assert {"mlp_to_input.0.fc1.weight", "mlp_to_input.3.fc2.bias"} <= keys
    config, keys = saved("v_combined")
    assert config["model_type"] == "clip_text_deprojector_v_model"
    assert {
        "deprojection",
        "linear1.0.weight",
        "mlp_layers.0.0.norm.running_var",
        "final_norm.0.bias",
    } <= keys


def _rewrite(path: Path, edit_config=None, edit_state=None) -> None:
    if edit_config is not None:
        config = json.loads((path / "config.json").read_text())
        edit_config(config)
        (path / "config.json").write_text(json.dumps(config))
    if edit_state is not None:
        state = load_file(path / "model.safetensors")
        edit_state(state)
        save_file(state, path / "model.safetensors")


@torch.no_grad()
def test_v4_config_without_relative_flag_loads_relative(
    clip: CLIPTextModel, w_p: Tensor, tmp_path: Path
) -> None:
    model = make_model("v4", clip, w_p)
    path = save_deprojector(model, tmp_path / "v4")
    _rewrite(
        path,
        edit_config=lambda c: [
            c.pop(k) for k in ("relative_to_null", "apply_mlp_to_input", "sdrt_input_kind")
        ],
    )
    loaded = load_deprojector(path)
    assert loaded.config == model.config
    x = model_input(model)
    assert torch.equal(loaded(x), model(x))
    assert load_deprojector(path, input_kind="text_embeds").config.input_kind == "text_embeds"


@pytest.mark.parametrize(
    ("edit_config", "edit_state", "match"),
    [
        (
            None,
            lambda s: s.pop("encoder_layer.self_attn.k_proj.bias"),
            "missing keys: encoder_layer.self_attn.k_proj.bias",
        ),
        (None, lambda s: s.update(extra=torch.zeros(1)), "unexpected keys: extra"),
        (None, lambda s: s.update(sos_embed=torch.zeros(HIDDEN + 1)), r"wrong shapes: sos_embed: \(65,\)"),
        (lambda c: c.update(hidden_size=32), None, "wrong shapes"),
        (None, lambda s: s.update(position_ids=torch.zeros(1, 77, dtype=torch.long)), "position_ids"),
        (lambda c: c.update(model_type="clip_vision_model"), None, "unknown deprojector layout"),
        (lambda c: c.update(model_type="clip_text_deprojector_vt_model"), None, "unknown deprojector layout"),
        (
            lambda c: c.update(model_type="clip_text_deprojector_model", state_projection=True),
            None,
            "unsupported",
        ),
        (lambda c: c.update(sdrt_input_kind="image"), None, "input_kind"),
    ],
)
def test_strict_loading_errors(
    edit_config, edit_state, match: str, clip: CLIPTextModel, w_p: Tensor, tmp_path: Path
) -> None:
    path = save_deprojector(make_model("v3", clip, w_p), tmp_path / "v3")
    _rewrite(path, edit_config, edit_state)
    with pytest.raises(CheckpointError, match=match):
        load_deprojector(path)


def test_v3_weights_under_v4_config_fail(clip: CLIPTextModel, w_p: Tensor, tmp_path: Path) -> None:
    path = save_deprojector(make_model("v3", clip, w_p), tmp_path / "v3")
    _rewrite(path, edit_config=lambda c: c.update(model_type="clip_text_deprojector_model", ensemble_size=4))
    with pytest.raises(CheckpointError, match=r"missing keys: .*encoder_layer\.0\.") as err:
        load_deprojector(path)
    assert "unexpected keys: encoder_layer.layer_norm1.bias" in str(err.value)


class _NotATensor:
    pass


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    torch.save({"sos_embed": _NotATensor()}, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="plain tensor"):
        load_deprojector(path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.json"):
        load_deprojector(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    (tmp_path / "epoch.pt").write_bytes(b"training state, never read")
    with pytest.raises(CheckpointError, match="model.safetensors or pytorch_model.bin"):
        load_deprojector(tmp_path)


def test_epoch_pt_is_ignored(clip: CLIPTextModel, w_p: Tensor, tmp_path: Path) -> None:
    path = save_deprojector(make_model("v2", clip, w_p), tmp_path / "v2", safetensors=False)
    (path / "epoch.pt").write_bytes(b"\x80not a loadable pickle")
    assert isinstance(load_deprojector(path), TransformerDeprojector)


def test_save_is_atomic(
    clip: CLIPTextModel, w_p: Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model("v3", clip, w_p)
    target = tmp_path / "ckpt"
    save_deprojector(model, target)
    with pytest.raises(FileExistsError):
        save_deprojector(model, target)
    v2 = make_model("v2", clip, w_p)
    save_deprojector(v2, target, safetensors=False, overwrite=True)
    assert load_deprojector(target).config == v2.config
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]

    import safetensors.torch

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_deprojector(model, tmp_path / "new")
    with pytest.raises(OSError, match="disk full"):
        save_deprojector(model, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing half-written
    assert load_deprojector(target).config == v2.config  # the old checkpoint is intact


# -- ONNX (legacy tracer) --


def short_model(kind: str) -> Any:
    """A 12-token model: tracing unrolls every step, so short chains keep the test fast."""
    torch.manual_seed(6)
    model: Any
    if kind == "v5":
        model = TransformerDeprojector(
            variant_config(
                "v5",
                hidden_size=HIDDEN,
                intermediate_size=128,
                num_attention_heads=4,
                max_position_embeddings=12,
            )
        )
    else:
        model = VicinityDeprojector(dataclasses.replace(VICINITY_CONFIGS["v_individual_side"], seq_len=12))
        randomize_batchnorm(model, 7, max_weight=1.0)
    with torch.no_grad():
        model.sos_embed.normal_()
        model.null_embed.normal_()
    model.eval()
    return model.fold_batchnorm() if isinstance(model, VicinityDeprojector) else model


@pytest.mark.parametrize("kind", ["v5", "vicinity"])
@torch.no_grad()
def test_forward_traces_to_onnx(kind: str) -> None:
    """forward survives the legacy exporter with a dynamic batch and matches PyTorch."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = short_model(kind)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (model_input(model),),
            buf,  # type: ignore[arg-type]
            dynamo=False,
            input_names=["pooled"],
            output_names=["hidden_states"],
            dynamic_axes={"pooled": {0: "batch"}, "hidden_states": {0: "batch"}},
            opset_version=18,
        )
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = model_input(model, batch=3, seed=9)
    (got,) = session.run(None, {"pooled": x.numpy()})
    assert got.shape == (3, 12, HIDDEN)
    assert abs(got - model(x).numpy()).max() <= 1e-5
