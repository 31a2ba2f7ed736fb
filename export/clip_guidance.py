"""CLIP guidance's gradient as an ONNX graph, so the runtime can guide without torch or autograd.

`ClipGuidanceScore` is f(x)·g(c) as a cosine: the VAE decoder, CLIP's preprocessing as the linear
map runtime/clip_guidance.py builds (PIL's bicubic resize and the centre crop as matrices, then
CLIP's mean/std), the image tower with its projection, and the cosine with the prompt's
`text_embeds`. Cosine, not the raw dot product: it is what the CLIP score measures, and it does not
reward a larger image embedding. `ClipGuidanceGradient` is its gradient by torch autograd: the
reference's oracle, and what the graph is exported from.

How it is exported (`export_gradient`); what did not work first, on torch 2.13:
1. `torch.onnx.export(dynamo=True)` of a module calling `torch.autograd.grad`: torch.export fails
   ("We found a fake tensor in the exported program constant's list ... lifted_tensor_0").
2. The same with `torch.func.grad`: torch.export fails ("Cannot access data pointer of Tensor that
   doesn't have storage").
3. What works: `make_fx` traces the autograd call into an aten graph of the forward and backward
   (symbolic shapes; the weights passed as inputs through `torch.func.functional_call`, or the
   symbolic trace meets real Parameters), with attention on the math kernel (the flash kernel's
   backward has no ONNX function) and decompositions for the backward ops the ONNX translator lacks:
   core ATen's `*_backward` decompositions, plus `convolution_backward` (the input gradient is a
   transposed convolution) and `upsample_nearest2d_backward` (a sum over each pixel's copies),
   written here. The dynamo exporter then turns that graph, weights as buffers, into ONNX.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor, nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx
from torch.nn.attention import SDPBackend, sdpa_kernel

from export.models import VisionTower
from export.onnx_export import OPSET, ClipVisionWrapper, VaeDecoderWrapper
from runtime.clip_guidance import resize_matrices
from runtime.specs import VAE_SCALE_FACTOR, ModelSpec

log = logging.getLogger(__name__)
aten = torch.ops.aten


class ClipGuidanceScore(nn.Module):
    """latent [B, 4, h, w], text_embeds [B, P], resize_rows [S, 8h], resize_cols [S, 8w] -> cos [B]."""

    def __init__(self, vae: AutoencoderKL, tower: VisionTower) -> None:
        super().__init__()
        self.decoder = VaeDecoderWrapper(vae)
        self.tower = ClipVisionWrapper(tower.vision_model, tower.visual_projection)
        self.mean: Tensor
        self.std: Tensor
        self.register_buffer("mean", torch.tensor(tower.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(tower.std).view(1, 3, 1, 1))

    def forward(
        self, latent: Tensor, text_embeds: Tensor, resize_rows: Tensor, resize_cols: Tensor
    ) -> Tensor:
        image = self.decoder(latent)  # (B, 3, 8h, 8w) in [0, 1]
        pixels = torch.einsum("sh,bchw,tw->bcst", resize_rows, image, resize_cols)  # (B, 3, S, S)
        image_embeds = self.tower((pixels - self.mean) / self.std)  # (B, P)
        dot = (image_embeds * text_embeds).sum(-1)
        cos: Tensor = dot / (image_embeds.norm(dim=-1) * text_embeds.norm(dim=-1))
        return cos


class ClipGuidanceGradient(nn.Module):
    """The same inputs -> grad [B, 4, h, w] = d cos_b / d latent_b (rows are independent)."""

    def __init__(self, vae: AutoencoderKL, tower: VisionTower) -> None:
        super().__init__()
        self.score = ClipGuidanceScore(vae, tower)

    def forward(
        self, latent: Tensor, text_embeds: Tensor, resize_rows: Tensor, resize_cols: Tensor
    ) -> Tensor:
        with torch.enable_grad():
            x = latent.detach().requires_grad_(True)
            cos = self.score(x, text_embeds, resize_rows, resize_cols)
            (grad,) = torch.autograd.grad(cos.sum(), x)
        return grad


def example_inputs(image_size: int, projection: int) -> tuple[Tensor, ...]:
    """Trace inputs: batch 2, a non-square 16x24 latent (dims > 1, as onnx_export's)."""
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, 4, 16, 24, generator=gen)
    rows, cols = resize_matrices(16 * VAE_SCALE_FACTOR, 24 * VAE_SCALE_FACTOR, image_size)
    return latent, torch.randn(2, projection, generator=gen), torch.from_numpy(rows), torch.from_numpy(cols)


def _convolution_backward(
    grad_out: Tensor, input: Tensor, weight: Tensor, bias_sizes: Any, stride: list[int],
    padding: list[int], dilation: list[int], transposed: bool, output_padding: list[int],
    groups: int, output_mask: list[bool],
) -> tuple[Tensor, None, None]:  # fmt: skip
    """The input gradient of a convolution: the transposed convolution of the output gradient (the
    weights are constants here, so no weight or bias gradient is ever asked for)."""
    if transposed or list(output_mask) != [True, False, False]:
        raise NotImplementedError(f"convolution_backward: transposed={transposed}, output_mask={output_mask}")
    extra = [
        input.shape[2 + i]
        - (
            (grad_out.shape[2 + i] - 1) * stride[i]
            - 2 * padding[i]
            + dilation[i] * (weight.shape[2 + i] - 1)
            + 1
        )
        for i in range(2)
    ]
    grad = aten.convolution.default(grad_out, weight, None, stride, padding, dilation, True, extra, groups)
    return grad, None, None


def _upsample_nearest2d_backward(
    grad_out: Tensor, output_size: list[int], input_size: list[int], *scales: float | None
) -> Tensor:
    """Nearest upsampling by an integer factor copies each pixel; its gradient sums the copies."""
    b, c, h, w = input_size
    sh, sw = grad_out.shape[2] // h, grad_out.shape[3] // w
    return grad_out.reshape(b, c, h, sh, w, sw).sum(dim=(3, 5))


def _decompositions() -> dict[Any, Any]:
    backward = {op: f for op, f in core_aten_decompositions().items() if "backward" in str(op)}
    return {
        **backward,
        aten.convolution_backward.default: _convolution_backward,
        aten.upsample_nearest2d_backward.default: _upsample_nearest2d_backward,
    }


class _Traced(nn.Module):
    """The make_fx graph with the weights it takes as inputs held as buffers again."""

    def __init__(self, graph: nn.Module, weights: list[Tensor]) -> None:
        super().__init__()
        self.graph = graph
        self.count = len(weights)
        for i, w in enumerate(weights):
            self.register_buffer(f"w{i}", w)

    def forward(
        self, latent: Tensor, text_embeds: Tensor, resize_rows: Tensor, resize_cols: Tensor
    ) -> Tensor:
        weights = [getattr(self, f"w{i}") for i in range(self.count)]
        grad: Tensor = self.graph(weights, latent, text_embeds, resize_rows, resize_cols)
        return grad


def export_gradient(
    module: ClipGuidanceGradient, args: tuple[Tensor, ...], spec: ModelSpec, path: Path
) -> None:
    """Trace the autograd call to an aten graph (make_fx), then export that to `path` (opset 18)."""
    module = module.eval()
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    names = list(state)
    weights = [v.detach() for v in state.values()]

    def gradient(values: list[Tensor], *inputs: Tensor) -> Tensor:
        grad: Tensor = torch.func.functional_call(module, dict(zip(names, values, strict=True)), inputs)
        return grad

    with torch.inference_mode(False), sdpa_kernel(SDPBackend.MATH):
        graph = make_fx(gradient, tracing_mode="symbolic", decomposition_table=_decompositions())(
            weights, *args
        )
    graph.graph.eliminate_dead_code()  # a stray shape query on a traced constant
    graph.recompile()
    dims: list[dict[int, str]] = [
        {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s with the dynamo exporter", spec.name)
    torch.onnx.export(
        _Traced(graph, weights).eval(),
        args,
        str(path),
        dynamo=True,
        opset_version=OPSET,
        input_names=spec.input_names,
        output_names=spec.output_names,
        dynamic_shapes=tuple(dims),
        verbose=False,
    )
