"""The transformer deprojector: one causal CLIP layer that regrows 77 hidden states.

One class covers every published layout (v1..v5); a frozen `DeprojectorConfig` says which.

Input layouts (X = the 77 input tokens, e = pooled embedding, n = pooled(""), s_i = outputs):
  embed_first (v1, v2):     X = [e, sos, s_1, ..., s_75]
  null_first (v3, v4, v5):  X = [x_0, e', s_1', ..., s_75'] with
      relative_to_null:     e' = e - n, s_i' = s_i - n;  otherwise e' = e, s_i' = s_i
      apply_mlp_to_input:   x_0 = MLP_k(e');             otherwise x_0 = n (absolute)
Output Y = final_layer_norm(layer(X + position_embedding)); Y[0] is replaced by sos, Y[t] = s_t.
Output t depends on inputs 0..t only, so s_1..s_76 are generated one at a time. Ensembles run
one chain per member and average the members' [77, D] results.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

import torch
from torch import Tensor, nn

from export.deprojector.layers import MLP, EncoderLayer, causal_mask

InputKind = Literal["pooled", "text_embeds"]
Layout = Literal["embed_first", "null_first"]
INPUT_KINDS: tuple[str, ...] = get_args(InputKind)
LAYOUTS: tuple[str, ...] = get_args(Layout)

# The published checkpoints. v1's input kind follows the spec (trained on text_embeds); the
# network itself always works on pooled vectors, so the kind only decides whether `forward`
# first maps its input through `projection` (= inv(W_P)).
VARIANTS: dict[str, dict[str, Any]] = {
    "v1": {"layout": "embed_first", "input_kind": "text_embeds"},
    "v2": {"layout": "embed_first"},
    "v3": {"layout": "null_first", "relative_to_null": True},
    "v4": {"layout": "null_first", "relative_to_null": True, "ensemble_size": 4},
    "v5": {"layout": "null_first", "relative_to_null": True, "ensemble_size": 4, "apply_mlp_to_input": True},
}


@dataclass(frozen=True)
class DeprojectorConfig:
    """Shape and layout of a transformer deprojector (defaults: SD 1.x / ViT-L/14 sizes)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    projection_dim: int = 768
    ensemble_size: int = 1
    apply_mlp_to_input: bool = False
    relative_to_null: bool = False
    layout: Layout = "null_first"
    input_kind: InputKind = "pooled"

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        if self.ensemble_size < 1:
            raise ValueError(f"ensemble_size must be >= 1, got {self.ensemble_size}")
        if self.max_position_embeddings < 2:
            raise ValueError(f"max_position_embeddings must be >= 2, got {self.max_position_embeddings}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}"
            )
        if self.layout == "embed_first" and (
            self.relative_to_null or self.apply_mlp_to_input or self.ensemble_size != 1
        ):
            raise ValueError(
                "the embed_first (v1/v2) layout has no null embedding, input MLP or ensemble: "
                "relative_to_null/apply_mlp_to_input must be False and ensemble_size 1"
            )

    @property
    def has_null_embed(self) -> bool:
        """Only the null_first layouts carry the `null_embed` buffer."""
        return self.layout == "null_first"


def variant_config(variant: str, **fields: Any) -> DeprojectorConfig:
    """The config of a published variant ("v1".."v5"); `fields` set sizes or override."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown deprojector variant {variant!r}; known: {sorted(VARIANTS)}")
    return DeprojectorConfig(**{**VARIANTS[variant], **fields})


class TransformerDeprojector(nn.Module):
    """Pooled CLIP embedding (B, D) -> 77 CLIP hidden states (B, 77, D).

    Member modules are always ModuleLists here; the checkpoint code maps ensemble_size 1 to
    the published un-indexed key names.
    """

    position_ids: Tensor
    sos_embed: Tensor
    null_embed: Tensor

    def __init__(self, config: DeprojectorConfig) -> None:
        super().__init__()
        self.config = config
        dim, length, members = config.hidden_size, config.max_position_embeddings, config.ensemble_size
        # position_ids only exists for the checkpoint format; forward indexes positions directly.
        self.register_buffer("position_ids", torch.arange(length).unsqueeze(0))  # (1, L)
        self.register_buffer("sos_embed", torch.zeros(dim))  # BOS state, the same for every prompt
        if config.has_null_embed:
            self.register_buffer("null_embed", torch.zeros(dim))  # pooled("")
        self.projection = nn.Linear(config.projection_dim, dim, bias=False)  # inv(W_P), frozen
        self.projection.requires_grad_(False)
        self.position_embedding = nn.ModuleList(nn.Embedding(length, dim) for _ in range(members))
        self.encoder_layer = nn.ModuleList(
            EncoderLayer(
                dim,
                config.intermediate_size,
                config.num_attention_heads,
                config.layer_norm_eps,
                config.hidden_act,
            )
            for _ in range(members)
        )
        self.final_layer_norm = nn.ModuleList(
            nn.LayerNorm(dim, eps=config.layer_norm_eps) for _ in range(members)
        )
        self.mlp_to_input: nn.ModuleList | None = None
        if config.apply_mlp_to_input:
            self.mlp_to_input = nn.ModuleList(
                MLP(dim, config.intermediate_size, config.hidden_act) for _ in range(members)
            )

    # -- pieces shared by both inference paths --

    def pooled_input(self, embeds: Tensor) -> Tensor:
        """The model input (B, P or D) as a pooled embedding (B, D)."""
        if self.config.input_kind == "text_embeds":
            return self.projection(embeds)
        return embeds

    def _first_inputs(self, k: int, e: Tensor) -> tuple[Tensor, Tensor]:
        """Input tokens 0 and 1 of member k for pooled e (B, D), each (B, D)."""
        if self.config.layout == "embed_first":
            return e, self.sos_embed.expand_as(e)
        base = e - self.null_embed if self.config.relative_to_null else e
        if self.mlp_to_input is not None:
            return self.mlp_to_input[k](base), base
        return self.null_embed.expand_as(e), base

    def _feedback(self, s: Tensor) -> Tensor:
        """How output s_t (B, D) is fed back as input token t+1."""
        return s - self.null_embed if self.config.relative_to_null else s

    def _with_sos(self, states: Tensor) -> Tensor:
        """(B, L-1, D) generated states -> (B, L, D) with the BOS state in front."""
        sos = self.sos_embed.expand(states.shape[0], 1, states.shape[2])
        return torch.cat([sos, states], dim=1)

    def _average(self, members: list[Tensor]) -> Tensor:
        if len(members) == 1:
            return members[0]
        total = members[0]
        for m in members[1:]:
            total = total + m
        return total / len(members)

    # -- the reference: full 77-token passes, as upstream --

    def forward_reference(self, embeds: Tensor) -> Tensor:
        """(B, D_in) -> (B, L, D) by re-running the full causal pass once per new token.

        Mirrors upstream Inference: 76 passes per member over a zero-padded 77-token input,
        the result being the last pass's outputs. Slow; the ground truth for `forward`.
        """
        e = self.pooled_input(embeds)  # (B, D)
        length = self.config.max_position_embeddings
        mask = causal_mask(length, e.dtype, e.device)  # (L, L)
        members = []
        for k in range(self.config.ensemble_size):
            layer = cast(EncoderLayer, self.encoder_layer[k])
            positions = cast(nn.Embedding, self.position_embedding[k]).weight  # (L, D)
            x0, x1 = self._first_inputs(k, e)
            known = [x0, x1]  # input tokens 0..t, each (B, D)
            y = e.new_zeros(0)
            for t in range(1, length):
                x = torch.stack(known, dim=1)  # (B, t+1, D)
                pad = e.new_zeros(e.shape[0], length - x.shape[1], e.shape[1])
                x = torch.cat([x, pad], dim=1)  # (B, L, D)
                y = self.final_layer_norm[k](layer.full(x + positions, mask))  # (B, L, D)
                known.append(self._feedback(y[:, t]))
            members.append(y[:, 1:])
        return self._with_sos(self._average(members))

    # -- the deployed path: KV-cached single-token steps --

    def _generate(self, k: int, e: Tensor) -> Tensor:
        """Member k's chain s_1..s_{L-1} (B, L-1, D) with a K/V cache: L-1 one-token steps."""
        layer = cast(EncoderLayer, self.encoder_layer[k])
        positions = cast(nn.Embedding, self.position_embedding[k]).weight  # (L, D)
        norm = self.final_layer_norm[k]
        x0, x = self._first_inputs(k, e)
        k_cache, v_cache = layer.prefill((x0 + positions[0]).unsqueeze(1))  # (B, H, 1, d)
        outputs = []
        for t in range(1, self.config.max_position_embeddings):
            y, k_cache, v_cache = layer.step(x + positions[t], k_cache, v_cache)  # (B, D)
            s = norm(y)
            outputs.append(s)
            x = self._feedback(s)
        return torch.stack(outputs, dim=1)

    def forward(self, embeds: Tensor) -> Tensor:
        """(B, D_in) pooled embedding (or text_embeds) -> (B, L, D) absolute hidden states.

        Traceable by the legacy ONNX exporter: a fixed Python loop, no data-dependent control
        flow, no in-place ops on inputs.
        """
        e = self.pooled_input(embeds)  # (B, D)
        members = [self._generate(k, e) for k in range(self.config.ensemble_size)]
        return self._with_sos(self._average(members))

    def set_clip_constants(self, constants: ClipConstants) -> None:
        """Write sos/null embeddings and inv(W_P) (NaN when unknown) into the buffers."""
        with torch.no_grad():
            self.sos_embed.copy_(constants.sos_embed)
            if self.config.has_null_embed:
                self.null_embed.copy_(constants.null_embed)
            if constants.projection is None:
                self.projection.weight.fill_(math.nan)
            else:
                self.projection.weight.copy_(constants.projection)

    def with_input_kind(self, input_kind: InputKind) -> TransformerDeprojector:
        """A copy (same weights) taking `input_kind` input, e.g. pooled for ONNX export."""
        if input_kind == "text_embeds" and not bool(torch.isfinite(self.projection.weight).all()):
            raise ValueError("this deprojector has no projection (inv(W_P)); it cannot take text_embeds")
        clone = copy.deepcopy(self)
        clone.config = dataclasses.replace(self.config, input_kind=input_kind)
        return clone


# -- initialisation from a CLIP text model --


@dataclass(frozen=True)
class ClipConstants:
    """Fixed vectors every deprojector takes from CLIP (float32)."""

    sos_embed: Tensor  # (D,) last_hidden_state[0, 0], the BOS state
    null_embed: Tensor  # (D,) pooled output of ""
    projection: Tensor | None  # (D, P) inv(W_P), None when W_P is not known


def inverse_projection(text_projection: Tensor) -> Tensor:
    """inv(W_P) computed in float64, returned as float32 (ONNX has no matrix inverse)."""
    w = text_projection.detach()
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"text_projection must be a square (P, D) matrix, got shape {tuple(w.shape)}")
    inv = torch.linalg.inv(w.to(device="cpu", dtype=torch.float64))
    if not bool(torch.isfinite(inv).all()):
        raise ValueError("text_projection is singular: inv(W_P) is not finite")
    return inv.to(torch.float32)


def _text_core(text_model: nn.Module) -> Any:
    """The module holding embeddings/encoder/final_layer_norm (unwraps `.text_model`)."""
    core: Any = text_model
    while hasattr(core, "text_model"):
        core = core.text_model
    for name in ("embeddings", "encoder", "final_layer_norm"):
        if not hasattr(core, name):
            raise ValueError(f"{type(text_model).__name__} is not a CLIP text model (no `{name}`)")
    return core


def clip_constants(
    text_model: nn.Module, text_projection: Tensor | nn.Linear | None, empty_ids: Tensor
) -> ClipConstants:
    """sos/null embeddings from one CLIP pass over the tokenized "" and inv(W_P) if given.

    `empty_ids` is "" tokenized and padded to 77 ([bos, eos, eos, ...]); CLIP pools the first
    EOS, so null = last_hidden_state[0, 1] after the final LayerNorm.
    """
    core = _text_core(text_model)
    ids = empty_ids.reshape(1, -1)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"empty_ids must be integer token ids, got dtype {ids.dtype}")
    length = core.embeddings.position_embedding.weight.shape[0]
    if ids.shape[1] != length:
        raise ValueError(f"empty_ids must be padded to {length} tokens, got {ids.shape[1]}")
    eos = getattr(getattr(text_model, "config", None), "eos_token_id", None)
    if isinstance(eos, int) and eos != 2 and not bool((ids == eos).any()):
        raise ValueError(f"empty_ids holds no EOS token ({eos}); expected [bos, eos, eos, ...]")
    device = core.final_layer_norm.weight.device
    with torch.no_grad():
        out = core(input_ids=ids.to(device=device, dtype=torch.long))
    sos = out.last_hidden_state[0, 0].detach().to("cpu", torch.float32)
    null = out.pooler_output[0].detach().to("cpu", torch.float32)
    if isinstance(text_projection, nn.Linear):
        text_projection = text_projection.weight
    projection = None if text_projection is None else inverse_projection(text_projection)
    return ClipConstants(sos_embed=sos, null_embed=null, projection=projection)


def from_clip(
    text_model: nn.Module,
    text_projection: Tensor | nn.Linear | None,
    *,
    variant: str,
    empty_ids: Tensor,
    input_kind: InputKind | None = None,
) -> TransformerDeprojector:
    """A deprojector of `variant` initialised from CLIP, in eval mode.

    Every member gets copies of the LAST encoder layer, the position embedding and the final
    LayerNorm; v5's input MLPs start as copies of that layer's MLP. `projection` = inv(W_P)
    (float64 inverse); without `text_projection` it is NaN, which only a text_embeds model
    would use, so that combination is refused.
    """
    kind = input_kind if input_kind is not None else VARIANTS.get(variant, {}).get("input_kind", "pooled")
    if kind == "text_embeds" and text_projection is None:
        raise ValueError(
            f"deprojector {variant!r} with input_kind='text_embeds' needs `text_projection` "
            "(W_P, CLIP's text_projection.weight, e.g. from openai/clip-vit-large-patch14) to "
            "compute inv(W_P); pass it, or use input_kind='pooled'"
        )
    clip_config: Any = text_model.config
    hidden = int(clip_config.hidden_size)
    if isinstance(text_projection, nn.Linear):
        text_projection = text_projection.weight
    projection_dim = hidden if text_projection is None else int(text_projection.shape[0])
    config = variant_config(
        variant,
        hidden_size=hidden,
        intermediate_size=int(clip_config.intermediate_size),
        num_attention_heads=int(clip_config.num_attention_heads),
        max_position_embeddings=int(clip_config.max_position_embeddings),
        layer_norm_eps=float(clip_config.layer_norm_eps),
        hidden_act=str(clip_config.hidden_act),
        projection_dim=projection_dim,
        input_kind=kind,
    )
    core = _text_core(text_model)
    constants = clip_constants(text_model, text_projection, empty_ids)
    model = TransformerDeprojector(config)
    last_layer = {k: v.detach().cpu() for k, v in core.encoder.layers[-1].state_dict().items()}
    positions = core.embeddings.position_embedding.weight.detach().cpu()
    final_norm = {k: v.detach().cpu() for k, v in core.final_layer_norm.state_dict().items()}
    with torch.no_grad():
        model.set_clip_constants(constants)
        for k in range(config.ensemble_size):
            model.encoder_layer[k].load_state_dict(last_layer)
            cast(nn.Embedding, model.position_embedding[k]).weight.copy_(positions)
            model.final_layer_norm[k].load_state_dict(final_norm)
            if model.mlp_to_input is not None:
                mlp = {n[len("mlp.") :]: v for n, v in last_layer.items() if n.startswith("mlp.")}
                model.mlp_to_input[k].load_state_dict(mlp)
    return model.eval()
