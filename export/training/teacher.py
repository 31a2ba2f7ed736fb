"""Teacher forcing: every position computed in one pass, fed the TRUE previous hidden states.

Training cannot afford the 76-step free-running chain (`model.forward`) per batch; with the
true states s_1..s_75 as the fed-back inputs, all 76 outputs come from one causal pass, as
upstream trained (`model(embeds, target)` / `RunForTraining`). The input layouts here mirror
`TransformerDeprojector` and `VicinityDeprojector` through their public modules only; a test
checks that feeding a model its own free-running outputs reproduces `forward` exactly.
Inputs are pooled embeddings (the deprojectors' internal space), never text_embeds.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from export.deprojector import Deprojector, TransformerDeprojector, VicinityDeprojector
from export.deprojector.layers import EncoderLayer, causal_mask


def _transformer_member(model: TransformerDeprojector, k: int, e: Tensor, states: Tensor) -> Tensor:
    """Member k's outputs for positions 1..L-1 (B, L-1, D)."""
    c = model.config
    fed = states[:, 1:-1]  # s_1..s_{L-2}, the inputs at positions 2..L-1
    if c.layout == "embed_first":  # X = [e, sos, s_1, ...]
        x0, x1 = e, model.sos_embed.expand_as(e)
    else:  # X = [n or MLP(e'), e', s_1', ...]
        n = model.null_embed
        x1 = e - n if c.relative_to_null else e
        x0 = model.mlp_to_input[k](x1) if model.mlp_to_input is not None else n.expand_as(e)
        if c.relative_to_null:
            fed = fed - n
    x = torch.cat([x0.unsqueeze(1), x1.unsqueeze(1), fed], dim=1)  # (B, L, D)
    positions = cast(nn.Embedding, model.position_embedding[k]).weight  # (L, D)
    layer = cast(EncoderLayer, model.encoder_layer[k])
    y = layer.full(x + positions, causal_mask(x.shape[1], x.dtype, x.device))
    return model.final_layer_norm[k](y)[:, 1:]


def _vicinity_first_layer(model: VicinityDeprojector, k: int, e: Tensor, window: list[Tensor]) -> Tensor:
    """First-layer activations (N, F) from e' (N, D) and the window V x (N, D), newest first."""
    act = model.activation_fn
    if model.linear1_embeds is not None and model.linear1_states is not None:
        terms = [act(model.linear1_states[k](w)) for w in window]
        if model.config.sum_after_first_activation:
            terms = [torch.stack(terms).sum(dim=0)]
        return torch.cat([act(model.linear1_embeds[k](e)), *terms], dim=1)
    assert model.linear1 is not None
    return act(model.linear1[k](torch.cat([e, *window], dim=1)))


def _vicinity_member(model: VicinityDeprojector, k: int, e: Tensor, states: Tensor) -> Tensor:
    """Member k's outputs for positions 1..L-1 (B, L-1, D); all positions as one batch."""
    c = model.config
    batch, length, dim = states.shape
    fed = states[:, 1:-1]  # s_1..s_{L-2}
    if c.relative_to_null:
        e = e - model.null_embed
        fed = fed - model.null_embed
    v = c.vicinity
    padded = torch.cat([fed.new_zeros(batch, v, dim), fed], dim=1)  # s_j at index j-1+v
    # output t (row t-1) sees s_{t-1}, ..., s_{t-v}; s_0 (the BOS state) is never fed, like `forward`
    window = [padded[:, v - i : v - i + length - 1].reshape(-1, dim) for i in range(1, v + 1)]
    flat_e = e.unsqueeze(1).expand(batch, length - 1, dim).reshape(-1, dim)
    h = model.linear2[k](_vicinity_first_layer(model, k, flat_e, window))
    if c.use_residual_connection:
        h = h + window[0]
    for layer in cast(nn.ModuleList, model.mlp_layers[k]):
        h = layer(h, flat_e)
    return model.final_norm[k](h).reshape(batch, length - 1, dim)


def member_count(model: Deprojector) -> int:
    return model.config.ensemble_size


def teacher_forced(model: Deprojector, pooled: Tensor, states: Tensor, member: int) -> Tensor:
    """One ensemble member's prediction (B, L, D) given pooled (B, D) and true states (B, L, D).

    Position 0 is the fixed BOS state, as in `forward`.
    """
    if isinstance(model, TransformerDeprojector):
        body = _transformer_member(model, member, pooled, states)
    else:
        body = _vicinity_member(model, member, pooled, states)
    sos = model.sos_embed.expand(body.shape[0], 1, body.shape[2])
    return torch.cat([sos, body], dim=1)


def teacher_forced_mean(model: Deprojector, pooled: Tensor, states: Tensor) -> Tensor:
    """The ensemble's teacher-forced prediction: the mean over members (B, L, D)."""
    members = [teacher_forced(model, pooled, states, k) for k in range(member_count(model))]
    return torch.stack(members).mean(dim=0)
