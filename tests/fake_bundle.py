"""A torch-free bundle for runtime unit tests: tiny hand-built ONNX graphs behind a real manifest.

The graphs honour the models' I/O contracts (runtime.specs) with a few cheap ops each, so a
bundle is written in well under a second and ONNX Runtime runs a whole generation in
milliseconds. The manifest is written through runtime.manifest's classes, the same as the
exporter's, so a fake bundle passes `Bundle.open` exactly as an exported one does. The outputs
depend on every input (prompt, timestep, latents), which is all that CFG, scheduler and batching
tests need; parity with PyTorch is the integration tests' job.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

from runtime.files import sha256_file
from runtime.manifest import (
    DeprojectorManifest,
    DimRange,
    FileEntry,
    Manifest,
    ModelManifest,
    TokenizerManifest,
    VisionManifest,
)
from runtime.schedulers import SD15_SCHEDULER
from runtime.specs import (
    CONTEXT_LENGTH,
    INPAINT_CHANNELS,
    LATENT_CHANNELS,
    VAE_SCALE_FACTOR,
    ModelSpec,
    clip_spec,
    clip_vision_spec,
    deprojector_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)

HIDDEN = 32
PROJECTION = 16
VISION_SIZE = 24  # clip_vision's square input: smaller than every image, so preprocessing shrinks
VISION_POOL = 4  # its average pooling window
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as CLIPImageProcessor has them
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISION = VisionManifest(VISION_SIZE, CLIP_MEAN, CLIP_STD, "fake")
OPSET = 18
WORDS = ("a", "cat", "maid", "dog", "photo", "of", "red", "blue", "hat", "in", "the", "garden")
BOS_ID, EOS_ID = len(WORDS) + 1, len(WORDS) + 2  # 0 is <unk>
VOCAB = 64
# Pixel sides 32..128 (latent 4..16); the tiny preset's own defaults are in the same range.
SAMPLE_SIZE = 8
LATENT_DIMS = {"height": DimRange(4, 8, 16), "width": DimRange(4, 8, 16)}
BATCH = DimRange(1, 2, 8)
TOKENS = DimRange(CONTEXT_LENGTH, CONTEXT_LENGTH, 3 * CONTEXT_LENGTH)
SPECS = {
    "clip": clip_spec(HIDDEN, PROJECTION),
    "deprojector": deprojector_spec(HIDDEN),
    "unet": unet_spec(HIDDEN),
    "vae_decoder": vae_decoder_spec(),
    "vae_encoder": vae_encoder_spec(),
    "clip_vision": clip_vision_spec(VISION_SIZE, PROJECTION),
}
PIXEL_DIMS = {
    f"image_{side}": DimRange(*(v * VAE_SCALE_FACTOR for v in (r.min, r.opt, r.max)))
    for side, r in LATENT_DIMS.items()
}


def _value_infos(spec: ModelSpec, which: str) -> list[onnx.ValueInfoProto]:
    dtypes = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32}
    tensors = spec.inputs if which == "inputs" else spec.outputs
    return [helper.make_tensor_value_info(t.name, dtypes[t.dtype], list(t.shape)) for t in tensors]


def _model(spec: ModelSpec, nodes: list[onnx.NodeProto], weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        spec.name,
        _value_infos(spec, "inputs"),
        _value_infos(spec, "outputs"),
        initializer=[numpy_helper.from_array(np.asarray(v), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def clip_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """Embedding lookup + tanh; pooled is the mean over tokens, text_embeds a projection of it."""
    n = helper.make_node
    return _model(
        SPECS["clip"],
        [
            n("Gather", ["table", "input_ids"], ["embedded"]),
            n("Tanh", ["embedded"], ["last_hidden_state"]),
            n("ReduceMean", ["last_hidden_state", "axis1"], ["pooled"], keepdims=0),
            n("MatMul", ["pooled", "projection"], ["text_embeds"]),
        ],
        {
            "table": rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
            "axis1": np.array([1], np.int64),
            "projection": rng.standard_normal((HIDDEN, PROJECTION)).astype(np.float32) / HIDDEN**0.5,
        },
    )


def _without_text_embeds(model: onnx.ModelProto) -> onnx.ModelProto:
    """The clip graph of a bundle that does not know CLIP's text projection: no text_embeds."""
    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    graph = stripped.graph
    kept = [node for node in graph.node if "text_embeds" not in node.output]
    del graph.node[:]
    graph.node.extend(kept)
    outputs = [o for o in graph.output if o.name != "text_embeds"]
    del graph.output[:]
    graph.output.extend(outputs)
    initializers = [i for i in graph.initializer if i.name != "projection"]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.checker.check_model(stripped)
    return stripped


def deprojector_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """77 states: the pooled vector scaled by a per-position table."""
    n = helper.make_node
    return _model(
        SPECS["deprojector"],
        [
            n("Unsqueeze", ["pooled", "axis1"], ["row"]),
            n("Mul", ["row", "positions"], ["scaled"]),
            n("Tanh", ["scaled"], ["hidden_states"]),
        ],
        {
            "axis1": np.array([1], np.int64),
            "positions": rng.standard_normal((CONTEXT_LENGTH, HIDDEN)).astype(np.float32),
        },
    )


def unet_graph(inpaint: bool = False) -> onnx.ModelProto:
    """noise = 0.5·sample + mean(text states) + timestep/1000: depends on every input. `inpaint`:
    a 9-channel sample, whose mask and masked-image channels are averaged in too."""
    n = helper.make_node
    if inpaint:
        head = [
            n("Slice", ["sample", "zero", "four", "axis1"], ["latents"]),
            n("Slice", ["sample", "four", "nine", "axis1"], ["extra"]),
            n("ReduceMean", ["extra", "axis1"], ["extra_mean"], keepdims=1),
            n("Add", ["latents", "extra_mean"], ["mixed_sample"]),
            n("Mul", ["mixed_sample", "half"], ["scaled"]),
        ]
        slices = {
            name: np.array([v], np.int64) for name, v in (("zero", 0), ("four", 4), ("nine", 9), ("axis1", 1))
        }
        spec = unet_spec(HIDDEN, INPAINT_CHANNELS)
    else:
        head, slices, spec = [n("Mul", ["sample", "half"], ["scaled"])], {}, SPECS["unet"]
    return _model(
        spec,
        [
            *head,
            n("ReduceMean", ["encoder_hidden_states", "axes12"], ["text"], keepdims=1),
            n("Unsqueeze", ["text", "axis3"], ["text4"]),
            n("Div", ["timestep", "thousand"], ["t"]),
            n("Add", ["scaled", "text4"], ["mixed"]),
            n("Add", ["mixed", "t"], ["noise_pred"]),
        ],
        {
            "half": np.array(0.5, np.float32),
            "axes12": np.array([1, 2], np.int64),
            "axis3": np.array([3], np.int64),
            "thousand": np.array(1000.0, np.float32),
            **slices,
        },
    )


def vae_encoder_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """8x8 average pooling, a 1x1 convolution to 4 channels (mean); std = 0.05·sigmoid(mean)."""
    n = helper.make_node
    return _model(
        SPECS["vae_encoder"],
        [
            n(
                "AveragePool",
                ["image"],
                ["pooled"],
                kernel_shape=[VAE_SCALE_FACTOR] * 2,
                strides=[VAE_SCALE_FACTOR] * 2,
            ),
            n("Conv", ["pooled", "kernel"], ["latent_mean"]),
            n("Sigmoid", ["latent_mean"], ["squashed"]),
            n("Mul", ["squashed", "small"], ["latent_std"]),
        ],
        {
            "kernel": rng.standard_normal((LATENT_CHANNELS, 3, 1, 1)).astype(np.float32),
            "small": np.array(0.05, np.float32),
        },
    )


def vae_decoder_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """A 1x1 convolution to RGB, then nearest upsampling by the VAE's factor."""
    n = helper.make_node
    return _model(
        SPECS["vae_decoder"],
        [
            n("Conv", ["latent", "kernel"], ["rgb"]),
            n("Resize", ["rgb", "", "scales"], ["image"], mode="nearest"),
        ],
        {
            "kernel": rng.standard_normal((3, LATENT_CHANNELS, 1, 1)).astype(np.float32) * 0.5,
            "scales": np.array([1, 1, VAE_SCALE_FACTOR, VAE_SCALE_FACTOR], np.float32),
        },
    )


def clip_vision_graph(rng: np.random.Generator) -> onnx.ModelProto:
    """4x4 average pooling, flattened, projected to PROJECTION: image_embeds depend on every pixel."""
    n = helper.make_node
    features = 3 * (VISION_SIZE // VISION_POOL) ** 2
    return _model(
        SPECS["clip_vision"],
        [
            n(
                "AveragePool",
                ["pixel_values"],
                ["pooled"],
                kernel_shape=[VISION_POOL] * 2,
                strides=[VISION_POOL] * 2,
            ),
            n("Flatten", ["pooled"], ["flat"], axis=1),
            n("MatMul", ["flat", "projection"], ["image_embeds"]),
        ],
        {"projection": rng.standard_normal((features, PROJECTION)).astype(np.float32) / features**0.5},
    )


def _write_tokenizer(folder: Path) -> dict[str, str]:
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    vocab.update({"<|startoftext|>": BOS_ID, "<|endoftext|>": EOS_ID})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    return {"tokenizer.json": sha256_file(folder / "tokenizer.json")}


def _entry(root: Path, name: str, model: onnx.ModelProto) -> FileEntry:
    path = root / f"{name}.onnx"
    onnx.save(model, path)
    return FileEntry(file=path.name, sha256=sha256_file(path), bytes=path.stat().st_size)


def write_fake_bundle(
    root: Path,
    seed: int = 0,
    deprojector: bool = True,
    encoder: bool = True,
    inpaint: bool = False,
    vision: bool = True,
    projection: bool = True,
) -> Path:
    """A complete bundle in `root` (created): fp32 and fp16 file sets (the same graphs), a tokenizer.
    `encoder`: with the VAE encoder (img2img); `inpaint`: an inpainting (9-channel) UNet; `vision`:
    with CLIP's image tower (clip_vision, for CLIP scores); `projection`: clip has text_embeds."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    graphs = {
        "clip": (clip_graph(rng), {"batch": BATCH, "tokens": TOKENS}),
        "unet": (unet_graph(inpaint), {"batch": BATCH, "tokens": TOKENS, **LATENT_DIMS}),
        "vae_decoder": (vae_decoder_graph(rng), {"batch": BATCH, **LATENT_DIMS}),
    }
    if encoder:
        graphs["vae_encoder"] = (vae_encoder_graph(rng), {"batch": BATCH, **PIXEL_DIMS})
    if deprojector:
        graphs["deprojector"] = (deprojector_graph(rng), {"batch": BATCH})
    if vision:  # drawn last: the other graphs' weights stay those of a bundle without it
        graphs["clip_vision"] = (clip_vision_graph(rng), {"batch": BATCH})
    if not projection:
        graphs["clip"] = (_without_text_embeds(graphs["clip"][0]), graphs["clip"][1])
    entries: dict[str, ModelManifest] = {}
    for name, (graph, dims) in graphs.items():
        files = {"fp32": _entry(root, name, graph), "fp16": _entry(root, f"{name}.fp16", graph)}
        spec = unet_spec(HIDDEN, INPAINT_CHANNELS) if name == "unet" and inpaint else SPECS[name]
        spec = clip_spec(HIDDEN, None) if name == "clip" and not projection else spec
        entries[name] = ModelManifest(spec=spec, dims=dims, opset=OPSET, files=files)
    checkpoint = None
    if deprojector:
        (root / "deprojector_checkpoint").mkdir()
        config = root / "deprojector_checkpoint" / "config.json"
        config.write_text(json.dumps({"variant": "fake"}))
        checkpoint = DeprojectorManifest(
            "fake", "fake", "pooled", "deprojector_checkpoint", {"config.json": sha256_file(config)}
        )
    manifest = Manifest(
        hidden_size=HIDDEN,
        projection_dim=PROJECTION if projection else None,
        latent_channels=LATENT_CHANNELS,
        vae_scale_factor=VAE_SCALE_FACTOR,
        vae_scaling=0.18215,
        sample_size=SAMPLE_SIZE,
        latent_multiple=1,
        scheduler=SD15_SCHEDULER,
        tokenizer=TokenizerManifest(
            "tokenizer", CONTEXT_LENGTH, BOS_ID, EOS_ID, EOS_ID, _write_tokenizer(root / "tokenizer")
        ),
        deprojector=checkpoint,
        models=entries,
        source={"kind": "fake", "seed": seed},
        vision=VISION if vision else None,
    )
    (root / "manifest.json").write_text(manifest.dumps())
    return root


def add_ir_file_set(root: Path, model: str = "unet", file_set: str = "int8") -> Path:
    """Give `model` a file set as OpenVINO IR, the way `export --int8` stores its int8 UNet: here the
    fp32 graph converted as is (nothing quantized), to test the runtime's handling of IR file sets
    without NNCF. Needs openvino. Returns the IR's path."""
    from dataclasses import replace

    import openvino as ov

    manifest = Manifest.loads((root / "manifest.json").read_bytes())
    entry = manifest.models[model]
    xml = root / f"{model}.{file_set}.xml"
    ov.save_model(ov.convert_model(str(root / entry.files["fp32"].file)), str(xml), compress_to_fp16=False)
    bin_ = xml.with_suffix(".bin")
    ir = FileEntry(
        xml.name, sha256_file(xml), xml.stat().st_size, bin_.name, sha256_file(bin_), bin_.stat().st_size
    )
    models = {**manifest.models, model: replace(entry, files={**entry.files, file_set: ir})}
    (root / "manifest.json").write_text(replace(manifest, models=models).dumps())
    return xml
