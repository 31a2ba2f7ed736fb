"""Deprojector checkpoints in the published format: a directory with `config.json` plus
`model.safetensors` or `pytorch_model.bin` (`epoch.pt` training state is ignored).

Dispatch (config `model_type` plus the state-dict keys present):
  clip_text_model              v1/v2 (embed_first) or, with a `null_embed` key, v3 (relative)
  clip_text_deprojector_model  null_first; ensemble_size / apply_mlp_to_input from the config,
                               relative_to_null defaulting to True when absent ([inferred]: the
                               v4 config lacks the key but was trained relative to null)
  clip_text_deprojector_v_model  the Vicinity model
Missing config keys take the defaults `save_pretrained` omitted (CLIPTextConfig's, or
upstream CLIPTextDeprojectorVConfig's). Loading is strict: the exact key set and every shape
must match (BatchNorm `num_batches_tracked` may be absent: it does not affect inference).
Weights are read with safetensors or `torch.load(weights_only=True)`, never unpickled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from export.deprojector.transformer import INPUT_KINDS, DeprojectorConfig, TransformerDeprojector
from export.deprojector.vicinity import VicinityConfig, VicinityDeprojector
from runtime.files import write_dir_atomic

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
INPUT_KIND_KEY = "sdrt_input_kind"  # ours: upstream passed from_projected per call
MODEL_TYPES = ("clip_text_model", "clip_text_deprojector_model", "clip_text_deprojector_v_model")

# CLIPTextConfig defaults, which save_pretrained leaves out of config.json.
_CLIP_TEXT_DEFAULTS: dict[str, Any] = {
    "hidden_size": 512,
    "intermediate_size": 2048,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
    "projection_dim": 512,
}
_V_FIELDS = tuple(f for f in VicinityConfig.__dataclass_fields__ if f != "input_kind")
# Upstream experiments this runtime does not implement; a checkpoint using one is refused.
_UNSUPPORTED_FLAGS = (
    "relative_to_prev",
    "state_projection",
    "state_weited_sum",
    "residual_wrt_prev",
    "residual_wrt_hidden",
)
_ENSEMBLE_PREFIXES = ("position_embedding", "encoder_layer", "final_layer_norm", "mlp_to_input")
_OPTIONAL_SUFFIX = ".num_batches_tracked"

Deprojector = TransformerDeprojector | VicinityDeprojector


class CheckpointError(ValueError):
    """The directory is not a deprojector checkpoint this code can load exactly."""


# -- key names --


def _published_name(model: nn.Module, name: str) -> str:
    """Internal state-dict name -> published name (ensemble_size 1 drops the member index)."""
    if isinstance(model, TransformerDeprojector) and model.config.ensemble_size == 1:
        return re.sub(rf"^({'|'.join(_ENSEMBLE_PREFIXES)})\.0\.", r"\1.", name)
    return name


def published_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state dict under the published key names (contiguous CPU tensors)."""
    if getattr(model, "folded", False):
        raise ValueError("a BatchNorm-folded module is inference-only; save the unfolded model")
    if not isinstance(model, TransformerDeprojector | VicinityDeprojector):
        raise TypeError(f"not a deprojector: {type(model).__name__}")
    return {
        _published_name(model, k): v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()
    }


# -- config --


def _transformer_config(raw: dict[str, Any], keys: set[str], input_kind: str) -> DeprojectorConfig:
    flags = [f for f in _UNSUPPORTED_FLAGS if raw.get(f)]
    if flags:
        raise CheckpointError(f"unsupported deprojector layout: config.json sets {flags}")
    dims = {k: raw.get(k, v) for k, v in _CLIP_TEXT_DEFAULTS.items()}
    if raw["model_type"] == "clip_text_model":
        if "null_embed" in keys:  # v3: trained relative to null, before the config had the flag
            layout: dict[str, Any] = {"layout": "null_first", "relative_to_null": True}
        else:  # v1/v2
            layout = {"layout": "embed_first"}
    else:
        layout = {
            "layout": "null_first",
            "ensemble_size": int(raw.get("ensemble_size", 1)),
            "apply_mlp_to_input": bool(raw.get("apply_mlp_to_input", False)),
            "relative_to_null": bool(raw.get("relative_to_null", True)),
        }
    try:
        return DeprojectorConfig(**dims, **layout, input_kind=input_kind)  # type: ignore[arg-type]
    except ValueError as err:
        raise CheckpointError(f"invalid deprojector config: {err}") from err


def _vicinity_config(raw: dict[str, Any], input_kind: str) -> VicinityConfig:
    fields = {k: raw[k] for k in _V_FIELDS if k in raw}
    try:
        return VicinityConfig(**fields, input_kind=input_kind)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"invalid Vicinity deprojector config: {err}") from err


def _config_json(model: nn.Module) -> dict[str, Any]:
    if isinstance(model, VicinityDeprojector):
        v = model.config
        body = {k: getattr(v, k) for k in _V_FIELDS}
        return {
            "architectures": ["CLIPTextDeprojectorV"],
            "model_type": MODEL_TYPES[2],
            **body,
            INPUT_KIND_KEY: v.input_kind,
            "torch_dtype": "float32",
        }
    assert isinstance(model, TransformerDeprojector)
    c = model.config
    body = {k: getattr(c, k) for k in _CLIP_TEXT_DEFAULTS}
    legacy = c.layout == "embed_first" or (
        c.relative_to_null and c.ensemble_size == 1 and not c.apply_mlp_to_input
    )
    if legacy:  # v1/v2/v3 were saved as plain CLIPTextConfig; the keys tell them apart
        head: dict[str, Any] = {"architectures": ["CLIPTextDeprojector"], "model_type": MODEL_TYPES[0]}
    else:
        head = {
            "architectures": ["CLIPTextDeprojector"],
            "model_type": MODEL_TYPES[1],
            "ensemble_size": c.ensemble_size,
            "apply_mlp_to_input": c.apply_mlp_to_input,
            "relative_to_null": c.relative_to_null,
        }
    return {**head, **body, INPUT_KIND_KEY: c.input_kind, "torch_dtype": "float32"}


# -- load --


def _read_weights(path: Path) -> dict[str, Tensor]:
    st, pt = path / SAFETENSORS_NAME, path / BIN_NAME
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st), device="cpu")
    if pt.is_file():
        try:
            state = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only refuses anything but plain tensors/containers
            raise CheckpointError(f"{pt}: not a plain tensor state dict ({err})") from err
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{pt}: expected a flat dict of tensors")
        return state
    raise CheckpointError(f"{path}: no {SAFETENSORS_NAME} or {BIN_NAME}")


def _names(names: set[str]) -> str:
    shown = sorted(names)
    more = f" (+{len(shown) - 12} more)" if len(shown) > 12 else ""
    return ", ".join(shown[:12]) + more


def _load_strict(model: nn.Module, state: dict[str, Tensor], where: Path) -> None:
    internal = model.state_dict()
    expected = {_published_name(model, k): k for k in internal}
    present = set(state)
    missing = {k for k in set(expected) - present if not k.endswith(_OPTIONAL_SUFFIX)}
    unexpected = present - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        raise CheckpointError(
            f"{where}: state dict does not match {type(model).__name__}: " + "; ".join(parts)
        )
    wrong = [
        f"{k}: {tuple(state[k].shape)} (expected {tuple(internal[v].shape)})"
        for k, v in expected.items()
        if k in state and state[k].shape != internal[v].shape
    ]
    if wrong:
        raise CheckpointError(f"{where}: wrong shapes: " + "; ".join(wrong))
    if "position_ids" in state and not torch.equal(
        state["position_ids"].to(torch.long), torch.arange(state["position_ids"].shape[1]).unsqueeze(0)
    ):
        raise CheckpointError(f"{where}: position_ids is not 0..L-1")
    full = {v: state[k] if k in state else internal[v] for k, v in expected.items()}
    model.load_state_dict(full, strict=True)


def load_deprojector(path: str | os.PathLike[str], *, input_kind: str | None = None) -> Deprojector:
    """Load a deprojector directory (eval mode). `input_kind` overrides the stored/default kind.

    Without our `sdrt_input_kind` key the model takes pooled input: the network computes on
    pooled vectors in every version, so this only decides whether `forward` applies inv(W_P).
    """
    path = Path(path)
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (not a deprojector checkpoint directory)")
    raw = json.loads(config_path.read_text())
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(
            f"{config_path}: unknown deprojector layout model_type={model_type!r}; known: {list(MODEL_TYPES)}"
        )
    kind = input_kind if input_kind is not None else raw.get(INPUT_KIND_KEY, "pooled")
    if kind not in INPUT_KINDS:
        raise CheckpointError(f"input_kind must be one of {INPUT_KINDS}, got {kind!r}")
    state = _read_weights(path)
    model: Deprojector
    if model_type == "clip_text_deprojector_v_model":
        model = VicinityDeprojector(_vicinity_config(raw, kind))
    else:
        model = TransformerDeprojector(_transformer_config(raw, set(state), kind))
    _load_strict(model, state, path)
    return model.eval()


# -- save --


def save_deprojector(
    model: nn.Module, path: str | os.PathLike[str], safetensors: bool = True, *, overwrite: bool = False
) -> Path:
    """Write `model` as a checkpoint directory; load_deprojector(path) gives it back exactly.

    Everything is written into a temporary sibling directory first and renamed into place, so
    an interrupted save never leaves a half-written checkpoint at `path`.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
    state = published_state_dict(model)
    config = _config_json(model)
    with write_dir_atomic(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if safetensors:
            from safetensors.torch import save_file

            save_file(state, str(tmp / SAFETENSORS_NAME), metadata={"format": "pt"})
        else:
            torch.save(state, tmp / BIN_NAME)
    return path
