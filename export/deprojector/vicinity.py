"""The Vicinity (V) deprojector: an MLP over the last V outputs instead of attention.

Each new state s_t comes from the embedding and a window of the V previous outputs (newest
first, zero-padded at the left edge), all relative to n = pooled("") when relative_to_null:
  combined first layer:   z = W2 act(W1 [e'; w_1; ...; w_V])
  individual first layer: z = W2 [act(A e'); act(B w_1); ...; act(B w_V)]   (B shared;
                          sum_after_first_activation sums the B terms instead)
  (+ w_1 when use_residual_connection), then MLP layers BatchNorm1d -> Linear -> act -> Linear
  (optionally residual, optionally with e' concatenated before the first Linear), and a
  final BatchNorm1d. s_t is output as is; s_t - n (or s_t) is pushed into the window.
Key names follow upstream's CLIPTextDeprojectorV (ModuleLists indexed even for one member).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from export.deprojector.layers import Affine, activation
from export.deprojector.transformer import INPUT_KINDS, InputKind

if TYPE_CHECKING:
    from export.deprojector.transformer import ClipConstants


@dataclass(frozen=True)
class VicinityConfig:
    """Upstream CLIPTextDeprojectorVConfig fields and defaults, plus our input kind."""

    embed_dim: int = 768
    projection_dim: int = 768
    seq_len: int = 77
    activation: str = "quick_gelu"
    vicinity: int = 3
    use_individual_first_layer: bool = False
    sum_after_first_activation: bool = False
    first_embed_layer_dim: int = 768
    first_layer_dim: int = 768
    num_mlp_layers: int = 1
    mlp_layer_dim: int = 3072
    use_residual_connection: bool = False
    use_side_input: bool = False
    layer_norm_eps: float = 1e-5
    relative_to_null: bool = True
    ensemble_size: int = 1
    input_kind: InputKind = "pooled"

    def __post_init__(self) -> None:
        if self.input_kind not in INPUT_KINDS:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        for name in ("vicinity", "ensemble_size", "seq_len", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_mlp_layers < 0:
            raise ValueError(f"num_mlp_layers must be >= 0, got {self.num_mlp_layers}")


def _bn_affine(bn: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift (float64)."""
    assert bn.running_mean is not None and bn.running_var is not None, "BatchNorm without running stats"
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _fold_into_next(linear: nn.Linear, columns: slice, scale: Tensor, shift: Tensor) -> None:
    """linear(... BN(x) ...) where BN(x) feeds `columns` of the input -> BN folded into linear."""
    with torch.no_grad():
        w = linear.weight.detach().double()
        b = linear.bias.detach().double() if linear.bias is not None else torch.zeros(w.shape[0]).double()
        part = w[:, columns]
        new_b = b + part @ shift
        w[:, columns] = part * scale
        linear.weight.copy_(w)
        if linear.bias is None:
            linear.bias = nn.Parameter(new_b.to(linear.weight.dtype))
        else:
            linear.bias.copy_(new_b)


def _fold_into_previous(linear: nn.Linear, scale: Tensor, shift: Tensor) -> None:
    """BN(linear(x)) -> one linear."""
    with torch.no_grad():
        w = linear.weight.detach().double()
        b = linear.bias.detach().double() if linear.bias is not None else torch.zeros(w.shape[0]).double()
        linear.weight.copy_(w * scale[:, None])
        new_b = b * scale + shift
        if linear.bias is None:
            linear.bias = nn.Parameter(new_b.to(linear.weight.dtype))
        else:
            linear.bias.copy_(new_b)


class VicinityMLPLayer(nn.Module):
    """norm -> [e';] linear1 -> act -> linear2 (+ input), upstream CLIPTextDeprojectorMLPLayer."""

    def __init__(self, config: VicinityConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.use_side_input = config.use_side_input
        self.use_residual_connection = config.use_residual_connection
        self.activation_fn = activation(config.activation)
        self.norm: nn.Module = nn.BatchNorm1d(dim, eps=config.layer_norm_eps)
        self.linear1 = nn.Linear(dim * 2 if config.use_side_input else dim, config.mlp_layer_dim)
        self.linear2 = nn.Linear(config.mlp_layer_dim, dim)

    def forward(self, states: Tensor, embeds: Tensor) -> Tensor:
        """states, embeds (B, D) -> (B, D)."""
        h = self.norm(states)
        if self.use_side_input:
            h = torch.cat([embeds, h], dim=1)  # (B, 2D)
        h = self.linear2(self.activation_fn(self.linear1(h)))
        return h + states if self.use_residual_connection else h

    def fold_norm(self) -> None:
        """Merge the (eval-mode) BatchNorm into linear1; it becomes Identity."""
        if not isinstance(self.norm, nn.BatchNorm1d):
            return
        dim = self.norm.num_features
        scale, shift = _bn_affine(self.norm)
        columns = slice(dim, 2 * dim) if self.use_side_input else slice(0, dim)
        _fold_into_next(self.linear1, columns, scale, shift)
        self.norm = nn.Identity()


class VicinityDeprojector(nn.Module):
    """Pooled CLIP embedding (B, D) -> 77 hidden states (B, 77, D), one MLP step per token."""

    deprojection: Tensor
    sos_embed: Tensor
    null_embed: Tensor

    def __init__(self, config: VicinityConfig) -> None:
        super().__init__()
        self.config = config
        self.folded = False
        dim, members, window = config.embed_dim, config.ensemble_size, config.vicinity
        self.register_buffer("deprojection", torch.zeros(dim, config.projection_dim))  # inv(W_P)
        self.register_buffer("sos_embed", torch.zeros(dim))
        self.register_buffer("null_embed", torch.zeros(dim))
        self.activation_fn = activation(config.activation)
        self.linear1: nn.ModuleList | None = None
        self.linear1_embeds: nn.ModuleList | None = None
        self.linear1_states: nn.ModuleList | None = None
        if config.use_individual_first_layer:
            self.linear1_embeds = nn.ModuleList(
                nn.Linear(dim, config.first_embed_layer_dim) for _ in range(members)
            )
            self.linear1_states = nn.ModuleList(
                nn.Linear(dim, config.first_layer_dim) for _ in range(members)
            )
            state_terms = 1 if config.sum_after_first_activation else window
            first_dim = config.first_embed_layer_dim + config.first_layer_dim * state_terms
        else:
            self.linear1 = nn.ModuleList(
                nn.Linear(dim * (1 + window), config.first_layer_dim) for _ in range(members)
            )
            first_dim = config.first_layer_dim
        self.linear2 = nn.ModuleList(nn.Linear(first_dim, dim) for _ in range(members))
        self.mlp_layers = nn.ModuleList(
            nn.ModuleList(VicinityMLPLayer(config) for _ in range(config.num_mlp_layers))
            for _ in range(members)
        )
        self.final_norm = nn.ModuleList(
            nn.BatchNorm1d(dim, eps=config.layer_norm_eps) for _ in range(members)
        )

    def pooled_input(self, embeds: Tensor) -> Tensor:
        """The model input (B, P or D) as a pooled embedding (B, D)."""
        if self.config.input_kind == "text_embeds":
            return nn.functional.linear(embeds, self.deprojection)
        return embeds

    def _first_layer(self, k: int, e: Tensor, window: list[Tensor]) -> Tensor:
        """e (B, D) and window V x (B, D) -> first-layer activations (B, F)."""
        if self.linear1_embeds is not None and self.linear1_states is not None:
            head = self.activation_fn(self.linear1_embeds[k](e))
            terms = [self.activation_fn(self.linear1_states[k](w)) for w in window]
            if self.config.sum_after_first_activation:
                total = terms[0]
                for t in terms[1:]:
                    total = total + t
                terms = [total]
            return torch.cat([head, *terms], dim=1)
        assert self.linear1 is not None
        return self.activation_fn(self.linear1[k](torch.cat([e, *window], dim=1)))

    def _step(self, k: int, e: Tensor, window: list[Tensor]) -> Tensor:
        """Member k's next state (B, D) from e' (B, D) and the window (newest first)."""
        h = self.linear2[k](self._first_layer(k, e, window))
        if self.config.use_residual_connection:
            h = h + window[0]
        for layer in cast(nn.ModuleList, self.mlp_layers[k]):
            h = layer(h, e)
        return self.final_norm[k](h)

    def forward(self, embeds: Tensor) -> Tensor:
        """(B, D_in) -> (B, L, D) absolute hidden states; traceable (fixed Python loop).

        BatchNorm layers use their running statistics only in eval mode: call .eval() first.
        """
        e = self.pooled_input(embeds)  # (B, D)
        relative = self.config.relative_to_null
        if relative:
            e = e - self.null_embed
        zero = torch.zeros_like(e)
        members = self.config.ensemble_size
        windows = [[zero] * self.config.vicinity for _ in range(members)]
        states = []
        for _ in range(1, self.config.seq_len):
            outs = [self._step(k, e, windows[k]) for k in range(members)]
            mean = outs[0]
            for o in outs[1:]:
                mean = mean + o
            states.append(mean / members if members > 1 else mean)
            for k in range(members):
                pushed = outs[k] - self.null_embed if relative else outs[k]
                windows[k] = [pushed, *windows[k][:-1]]
        body = torch.stack(states, dim=1)  # (B, L-1, D)
        sos = self.sos_embed.expand(body.shape[0], 1, body.shape[2])
        return torch.cat([sos, body], dim=1)

    def fold_batchnorm(self) -> VicinityDeprojector:
        """An equivalent inference-only copy (eval mode) with every BatchNorm folded away.

        An MLP layer's norm goes into its own linear1 (only the columns it feeds when the side
        input is concatenated). The final norm goes into the last linear2 unless a residual
        add sits in between; then it stays as a per-channel Affine. Folding is done in float64.
        """
        folded = copy.deepcopy(self).eval()
        for k in range(self.config.ensemble_size):
            layers = cast(nn.ModuleList, folded.mlp_layers[k])
            for layer in layers:
                cast(VicinityMLPLayer, layer).fold_norm()
            norm = folded.final_norm[k]
            if not isinstance(norm, nn.BatchNorm1d):
                continue
            scale, shift = _bn_affine(norm)
            if self.config.use_residual_connection:
                dtype = cast(nn.Linear, folded.linear2[k]).weight.dtype
                folded.final_norm[k] = Affine(scale.to(dtype), shift.to(dtype))
            else:
                last = cast(VicinityMLPLayer, layers[-1]).linear2 if len(layers) else folded.linear2[k]
                _fold_into_previous(cast(nn.Linear, last), scale, shift)
                folded.final_norm[k] = nn.Identity()
        folded.folded = True
        return folded

    def set_clip_constants(self, constants: ClipConstants) -> None:
        """Write sos/null embeddings and inv(W_P) (NaN when unknown) into the buffers."""
        with torch.no_grad():
            self.sos_embed.copy_(constants.sos_embed)
            self.null_embed.copy_(constants.null_embed)
            if constants.projection is None:
                self.deprojection.fill_(math.nan)
            else:
                self.deprojection.copy_(constants.projection)

    def with_input_kind(self, input_kind: InputKind) -> VicinityDeprojector:
        """A copy (same weights) taking `input_kind` input."""
        if input_kind == "text_embeds" and not bool(torch.isfinite(self.deprojection).all()):
            raise ValueError("this deprojector has no deprojection (inv(W_P)); it cannot take text_embeds")
        clone = copy.deepcopy(self)
        clone.config = dataclasses.replace(self.config, input_kind=input_kind)
        return clone
