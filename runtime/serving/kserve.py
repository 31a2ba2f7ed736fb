"""Triton / KServe v2 HTTP inference protocol, so `tritonclient.http` (and other v2 clients) work.

One model (default name "sdrt", version "1"). Inputs: `prompt` BYTES [1] (required), optional
one-element `negative_prompt`, `scheduler`, `mode`, `compose_mode`, `long_prompt`, `mask_mode`,
`resize_mode`, `cfg_convention` (BYTES), `steps`, `seed`, `width`, `height`, `num_images`, `cache_interval`,
`mask_blur`, `clip_guidance_skip` (any INT/UINT type), `guidance`, `strength`, `clip_guidance`
(FP16/32/64), `normalize`, `clip_score` (BOOL).
img2img / inpainting: optional `init_image` and `mask`, each either BYTES [1] holding an image
file (PNG, JPEG, WebP: raw bytes in the binary tensor extension, base64 text in JSON `data`), or
the pixels as UINT8, [H, W, 3] RGB for `init_image` and [H, W] for `mask` (white = repaint).
LoRAs: optional `loras` BYTES [N], one element per LoRA of the server's --lora-dir, `NAME` or
`NAME:SCALE` (the /v1 field `loras`; `<lora:NAME:WEIGHT>` tags in the prompt work too).
Outputs: `image` UINT8 [N, H, W, 3], `seed` INT64 [N] and `parameters` BYTES [N] (each image's
A1111 text, as in its PNG); with `clip_score` true also `clip_score` FP32 [N] (each image's CLIP
score, 0-100), which only such a request may name in its `outputs`. Request parameter `timeout`
(microseconds, Triton's unit) shortens the deadline.

Errors: a malformed request (JSON, tensor shapes, datatypes, unknown inputs) is 400, as Triton
answers; a well-formed one with a bad value (unreadable text, steps out of range, an image that
cannot be read) is 422, as /v1.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request, Response

from runtime.errors import RequestError
from runtime.image import infotext
from runtime.init_image import check_array, read_image
from runtime.options import GenerateOptions, ResolvedOptions
from runtime.pipeline import Result
from runtime.serving.dispatch import generate, prepare, request_timeout
from runtime.serving.engine import Engine
from runtime.serving.images import image_from_base64
from runtime.serving.kserve_codec import (
    HEADER_LENGTH,
    CodecError,
    InferRequest,
    InferTensor,
    Output,
    Tensor,
    decode_request,
    encode_response,
)
from runtime.serving.limits import Limits
from runtime.serving.loras import request_loras

VERSION = "1"
_STRINGS = ("prompt", "negative_prompt", "scheduler", "mode", "compose_mode", "long_prompt", "mask_mode",
            "resize_mode", "cfg_convention")  # fmt: skip
_INTS = ("steps", "seed", "width", "height", "num_images", "cache_interval", "mask_blur",
         "clip_guidance_skip")  # fmt: skip
LORAS = "loras"
IMAGES = {"init_image": [-1, -1, 3], "mask": [-1, -1]}  # name -> its shape as a UINT8 pixel tensor
INPUTS = {
    **{name: "BYTES" for name in _STRINGS},
    **{name: "INT32" for name in _INTS},
    "seed": "INT64",
    "guidance": "FP32",
    "strength": "FP32",
    "clip_guidance": "FP32",
    "normalize": "BOOL",
    "clip_score": "BOOL",
    **{name: "BYTES" for name in IMAGES},  # an image file; UINT8 pixels are accepted too
    LORAS: "BYTES",  # [N]: NAME or NAME:SCALE per element
}  # name -> the datatype the metadata advertises (other widths of the same kind are accepted)
OUTPUTS = {
    "image": ("UINT8", [-1, -1, -1, 3]),
    "seed": ("INT64", [-1]),
    "parameters": ("BYTES", [-1]),
    "clip_score": ("FP32", [-1]),  # only with the input clip_score true
}
SCORED = "clip_score"
_EXAMPLE = {
    "inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a cat maid, watercolor"]},
        {"name": "steps", "shape": [1], "datatype": "INT32", "data": [20]},
        {"name": "guidance", "shape": [1], "datatype": "FP32", "data": [7.5]},
        {"name": "seed", "shape": [1], "datatype": "INT64", "data": [1]},
    ],
    "outputs": [{"name": "image", "parameters": {"binary_data": True}}],
}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """pydantic's `$defs` refs inlined: OpenAPI resolves `#/$defs/...` against the whole document."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return dict(walk(schema))


def _one(name: str, spec: InferTensor, value: Tensor) -> Any:
    """The single element of a parameter tensor, type-checked against its kind."""
    if len(value) != 1:
        raise CodecError(f"input {name} must hold exactly one element; got shape {spec.shape}")
    kind = INPUTS[name]
    dt = spec.datatype
    ok = {
        "BYTES": dt == "BYTES",
        "INT32": dt.startswith(("INT", "UINT")),
        "INT64": dt.startswith(("INT", "UINT")),
        "FP32": dt.startswith("FP"),
        "BOOL": dt == "BOOL",
    }[kind]
    if not ok:
        want = {"INT32": "an INT or UINT type", "INT64": "an INT or UINT type", "FP32": "FP16, FP32 or FP64"}
        raise CodecError(f"input {name} must be {want.get(kind, kind)}; got {dt}")
    element = value[0]
    if kind == "BYTES":
        try:
            return bytes(element).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"input {name} must be valid UTF-8 text; byte {exc.start} is not") from None
    if kind == "FP32":
        return float(str(element))  # shortest decimal: FP32 7.3 stays 7.3 in the infotext, as the CLI's
    if kind == "BOOL":
        return bool(element)
    return int(element)


def _image(name: str, spec: InferTensor, value: Tensor) -> np.ndarray:
    """An `init_image` or `mask` input: one encoded image file (BYTES) or its pixels (UINT8)."""
    mask = name == "mask"
    pixels = "[H, W]" if mask else "[H, W, 3]"
    if spec.datatype == "BYTES":
        assert isinstance(value, list)
        if len(value) != 1:
            raise CodecError(f"input {name} as BYTES must be one image file; got shape {spec.shape}")
        if spec.parameters.get("binary_data_size") is None:  # JSON `data`: text, so base64
            return image_from_base64(value[0].decode("utf-8"), name, mask)
        return read_image(value[0], name, mask)
    if spec.datatype != "UINT8":
        raise CodecError(
            f"input {name} must be BYTES (an image file) or UINT8 {pixels} (its pixels); got {spec.datatype}"
        )
    assert isinstance(value, np.ndarray)
    if len(spec.shape) != len(IMAGES[name]) or (not mask and spec.shape[-1] != 3):
        raise CodecError(f"input {name} as UINT8 must have shape {pixels}; got {spec.shape}")
    return check_array(value.reshape(spec.shape), name, mask)


def _loras(spec: InferTensor, value: Tensor) -> list[tuple[str, float]]:
    """The `loras` input: (name, scale) per element, `NAME` or `NAME:SCALE` (scale 1.0 when left out)."""
    if spec.datatype != "BYTES" or len(spec.shape) != 1:
        raise CodecError(f"input {LORAS} must be BYTES with shape [N]; got {spec.datatype} {spec.shape}")
    assert isinstance(value, list)
    named = []
    for i, element in enumerate(value):
        try:
            text = bytes(element).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input {LORAS}[{i}] must be valid UTF-8 text") from None
        name, sep, scale = text.rpartition(":")
        if not sep:
            named.append((text, 1.0))
            continue
        try:
            named.append((name, float(scale)))
        except ValueError:
            raise RequestError(f"input {LORAS}[{i}] must be NAME or NAME:SCALE; got {text!r:.80}") from None
    return named


def options_from_inputs(
    specs: dict[str, InferTensor], values: dict[str, Tensor], lora_dir: Path | None = None
) -> GenerateOptions:
    unknown = sorted(set(values) - set(INPUTS))
    if unknown:
        raise CodecError(f"unknown input(s) {', '.join(unknown)}; this model takes {', '.join(INPUTS)}")
    if "prompt" not in values:
        raise CodecError("input prompt (BYTES, shape [1]) is required")
    named = _loras(specs[LORAS], values[LORAS]) if LORAS in values else []
    single = (name for name in values if name not in IMAGES and name != LORAS)
    args = {name: _one(name, specs[name], values[name]) for name in single}
    prompt, loras = request_loras(args.pop("prompt"), named, lora_dir, LORAS)
    # the images last: every cheap check has passed before one is decoded
    args |= {name: _image(name, specs[name], value) for name, value in values.items() if name in IMAGES}
    negative = args.pop("negative_prompt", "")
    return GenerateOptions(
        prompts=(prompt,), negative_prompts=(negative,) if negative else (), loras=loras, **args
    )


def _wanted_outputs(request: InferRequest, scored: bool) -> tuple[list[str], set[str]]:
    """(output names, names to send as binary), from the request's `outputs` and parameters;
    `scored`: the request asked for CLIP scores, the one case with a `clip_score` output."""
    default_binary = bool(request.parameters.get("binary_data_output", False))
    if request.outputs is None:
        names = [name for name in OUTPUTS if scored or name != SCORED]
        return names, set(names) if default_binary else set()
    unknown = sorted({o.name for o in request.outputs} - set(OUTPUTS))
    if unknown:
        raise CodecError(f"unknown output(s) {', '.join(unknown)}; this model has {', '.join(OUTPUTS)}")
    names = [o.name for o in request.outputs]
    if SCORED in names and not scored:
        raise CodecError(f"output {SCORED} needs the input {SCORED} (BOOL) set to true")
    binary = {o.name for o in request.outputs if o.parameters.get("binary_data", default_binary)}
    return names, binary


def build_router(
    engine: Engine,
    limits: Limits,
    model: str,
    backend: str,
    auth: Any,
    on_done: Callable[[Result, int], None] | None = None,
    lora_dir: Path | None = None,
) -> APIRouter:
    """Routes under /v2; metadata and inference need the bearer token when one is set."""
    router = APIRouter(prefix="/v2", tags=["kserve v2"])
    guarded = [Depends(auth)]

    def check_model(name: str, version: str | None = None) -> None:
        if name != model:
            raise HTTPException(404, f"unknown model {name!r}; this server serves {model!r}")
        if version not in (None, "", VERSION):
            raise HTTPException(404, f"model {model!r} has only version {VERSION}; got {version!r}")

    @router.get("", summary="server metadata")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "sdrt", "version": "0.1.0", "extensions": ["binary_tensor_data"]}

    @router.get("/health/live", summary="liveness")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready", summary="readiness: warmed up and not shutting down")
    async def ready() -> Response:
        return Response(status_code=200 if engine.ready else 503)

    @router.get("/models/{name}/ready", dependencies=guarded)
    @router.get("/models/{name}/versions/{version}/ready", dependencies=guarded)
    async def model_ready(name: str, version: str | None = None) -> Response:
        check_model(name, version)
        return Response(status_code=200 if engine.ready else 503)

    @router.get("/models/{name}", dependencies=guarded, summary="model metadata: inputs and outputs")
    @router.get("/models/{name}/versions/{version}", dependencies=guarded)
    async def model_metadata(name: str, version: str | None = None) -> dict[str, Any]:
        check_model(name, version)
        return {
            "name": model,
            "versions": [VERSION],
            "platform": f"sdrt_{backend}",
            "inputs": [
                {"name": n, "datatype": d, "shape": [-1] if n == LORAS else [1]} for n, d in INPUTS.items()
            ],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in OUTPUTS.items()],
        }

    infer_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": _inline_refs(InferRequest.model_json_schema()),
                    "example": _EXAMPLE,
                },
                "application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"},
                    "description": f"JSON header ({HEADER_LENGTH} bytes), then binary tensors",
                },
            },
        }
    }

    @router.post("/models/{name}/infer", dependencies=guarded, openapi_extra=infer_doc, summary="generate")
    @router.post("/models/{name}/versions/{version}/infer", dependencies=guarded, openapi_extra=infer_doc)
    async def infer(name: str, request: Request, version: str | None = None) -> Response:
        check_model(name, version)
        if request.headers.get("content-encoding", "identity") != "identity":
            raise HTTPException(
                415, "compressed inference requests are not supported; send them uncompressed"
            )
        body = await request.body()

        def parse() -> tuple[InferRequest, list[str], set[str], ResolvedOptions]:
            try:
                parsed, specs, values = decode_request(body, request.headers.get(HEADER_LENGTH))
                scored = SCORED in values and _one(SCORED, specs[SCORED], values[SCORED]) is True
                names, binary = _wanted_outputs(parsed, scored)
                options = options_from_inputs(specs, values, lora_dir)
                return parsed, names, binary, prepare(options, engine, limits)
            except CodecError as exc:  # not a well-formed v2 request; bad values (RequestError) are 422
                raise HTTPException(400, str(exc)) from None

        # Parsing a large body and decoding and resizing images take CPU time: not on the event loop.
        parsed, names, binary, options = await asyncio.to_thread(parse)
        asked = parsed.parameters.get("timeout")
        timeout = request_timeout(
            asked / 1e6 if isinstance(asked, (int, float)) and asked > 0 else None, limits
        )
        result = await generate(request, engine, options, timeout, on_done)
        precision = engine.pipeline.backend.precision
        produced: dict[str, Tensor] = {
            "image": result.images,
            "seed": np.asarray(result.seeds, dtype=np.int64),
            "parameters": [
                infotext(result, i, backend, precision, engine.bundle.root.resolve().name).encode()
                for i in range(len(result.images))
            ],
        }
        if result.clip_scores is not None:
            produced[SCORED] = np.asarray(result.clip_scores, dtype=np.float32)
        outputs = [Output(n, OUTPUTS[n][0], tuple(np.shape(produced[n])), produced[n]) for n in names]
        content, media_type, headers = encode_response(model, VERSION, parsed.id, outputs, binary)
        return Response(content=content, headers=headers, media_type=media_type)

    return router
