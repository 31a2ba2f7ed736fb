"""`python -m export`: parity of every ONNX model with its PyTorch module, the manifest, reuse,
atomic writes, CLI errors, and the lean/external-data and fp16 machinery.

fp16 parity uses onnx's ReferenceEvaluator, which really computes in fp16: ONNX Runtime's CPU
provider runs fp16 MatMul/Conv in fp32 behind casts and under-reports the error.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from export import build, fp16, graph, onnx_io
from export.__main__ import main
from export.build import (
    DEEPCACHE_MODELS,
    MODEL_NAMES,
    ExportOptions,
    deprojector_module,
    export_bundle,
    fingerprint,
    torch_module,
)
from export.bundle import MANIFEST, Staging, reusable
from export.deprojector import load_deprojector, save_deprojector
from export.models import load_model, save_diffusers_folder
from export.onnx_export import example_ids
from runtime.bundle import Bundle
from runtime.files import sha256_file
from runtime.integrity import STAMP_NAME
from runtime.manifest import FORMAT_VERSION, DimRange, Manifest, VisionManifest
from runtime.specs import (
    CLIP_GUIDANCE,
    CLIP_VISION,
    clip_spec,
    clip_vision_spec,
    deprojector_spec,
    unet_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)

pytestmark = pytest.mark.integration  # exports with torch

HIDDEN = 64  # tiny preset
VISION_SIZE = 32  # the tiny preset's CLIP image tower: 32x32 pixels, embeds of the text projection's width
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# export without --deepcache or --clip-guidance (both opt-in)
DEFAULT_MODELS = tuple(n for n in MODEL_NAMES if n not in (*DEEPCACHE_MODELS, CLIP_GUIDANCE))
# What the runtime writes into a bundle it runs: backends' derived graphs, the integrity stamp.
CACHES = (".ort_cache", ".ov_cache", STAMP_NAME)


@pytest.fixture(scope="module")
def tiny_modules() -> dict[str, torch.nn.Module]:
    """The PyTorch modules the tiny bundle was exported from (same preset and seed)."""
    components = load_model("tiny")
    built = deprojector_module(components, None)
    assert built is not None
    return {name: torch_module(name, components, built[0]) for name in MODEL_NAMES}


@functools.cache
def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@functools.cache
def _reference(path: Path) -> ReferenceEvaluator:
    return ReferenceEvaluator(onnx.load(str(path)))


def _evaluate(model: ReferenceEvaluator | onnx.ModelProto | str, feeds: dict[str, np.ndarray]) -> list[Any]:
    """Run onnx's reference evaluator (true fp16 arithmetic)."""
    evaluator = model if isinstance(model, ReferenceEvaluator) else ReferenceEvaluator(model)
    outputs: list[Any] = list(evaluator.run(None, feeds))
    return outputs


def _inputs(name: str, case: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if name == "clip":
        batch, tokens = case
        return [example_ids(batch, tokens, seed)]
    if name == "deprojector":
        return [torch.randn(case[0], HIDDEN, generator=gen)]
    if name == "vae_encoder":  # (batch, image height, image width) in pixels, values in [0, 1]
        return [torch.rand(*case[:1], 3, *case[1:], generator=gen)]
    if name == CLIP_VISION:  # (batch,): CLIP-normalized pixels
        return [torch.randn(case[0], 3, VISION_SIZE, VISION_SIZE, generator=gen)]
    batch, height, width, *rest = case
    latent = torch.randn(batch, 4, height, width, generator=gen)
    if name == "vae_decoder":
        return [latent]
    tokens, timestep = rest
    return [latent, torch.tensor([float(timestep)]), torch.randn(batch, tokens, HIDDEN, generator=gen)]


def _torch_outputs(module: torch.nn.Module, inputs: list[torch.Tensor]) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*inputs)
    return [t.numpy() for t in (out if isinstance(out, tuple) else (out,))]


def _feeds(path: Path, inputs: list[torch.Tensor]) -> dict[str, np.ndarray]:
    names = [i.name for i in _session(path).get_inputs()]
    return {n: t.numpy() for n, t in zip(names, inputs, strict=True)}


def _min_cosine(a: np.ndarray, b: np.ndarray, per_position: bool) -> float:
    """Smallest cosine over batch rows (flattened), or over every [b, position] vector."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    if not per_position:
        a64, b64 = a64.reshape(a.shape[0], -1), b64.reshape(b.shape[0], -1)
    dot = (a64 * b64).sum(-1)
    return float((dot / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))).min())


# (model, case): clip (batch, tokens); deprojector (batch,); unet (batch, h, w, tokens, t);
# vae_decoder (batch, h, w); vae_encoder (batch, H, W) in pixels; clip_vision (batch,). Batches 1-3,
# latents 16x16 and 24x32, tokens 77 and 154.
FP32_CASES = [
    ("clip", (1, 77)),
    ("clip", (2, 154)),
    ("clip", (3, 77)),
    ("deprojector", (1,)),
    ("deprojector", (3,)),
    ("unet", (1, 16, 16, 77, 999)),
    ("unet", (2, 24, 32, 154, 500)),
    ("unet", (3, 16, 16, 154, 1)),
    ("vae_decoder", (1, 16, 16)),
    ("vae_decoder", (2, 24, 32)),
    ("vae_decoder", (3, 16, 16)),
    ("vae_encoder", (1, 128, 128)),
    ("vae_encoder", (2, 192, 256)),
    ("vae_encoder", (3, 128, 128)),
    (CLIP_VISION, (1,)),
    (CLIP_VISION, (3,)),
]


@pytest.mark.parametrize(("name", "case"), FP32_CASES, ids=[f"{n}-{c}" for n, c in FP32_CASES])
def test_fp32_matches_pytorch(
    tiny_bundle: Path, tiny_modules: dict[str, Any], name: str, case: tuple
) -> None:
    inputs = _inputs(name, case)
    path = tiny_bundle / f"{name}.onnx"
    got = _session(path).run(None, _feeds(path, inputs))
    want = _torch_outputs(tiny_modules[name], inputs)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == np.float32
        assert float(np.abs(g - w).max()) <= 1e-4
        assert _min_cosine(g, w, per_position=name == "deprojector") >= 0.99999


FUSED_CASES = [(n, c) for n, c in FP32_CASES if n in ("unet", "vae_decoder", "vae_encoder")]


@pytest.mark.parametrize(("name", "case"), FUSED_CASES, ids=[f"{n}-{c}" for n, c in FUSED_CASES])
def test_ort_fused_graph_equals_the_standard_one(tiny_bundle: Path, name: str, case: tuple) -> None:
    """The MultiHeadAttention rewrite changes no result beyond float reordering."""
    inputs = _inputs(name, case)
    standard, fused = tiny_bundle / f"{name}.onnx", tiny_bundle / f"{name}.ort.onnx"
    want = _session(standard).run(None, _feeds(standard, inputs))[0]
    got = _session(fused).run(None, _feeds(fused, inputs))[0]
    assert float(np.abs(got - want).max()) <= 1e-5
    assert _min_cosine(got, want, per_position=False) >= 0.999999


def test_onnx_deprojector_equals_the_77_pass_reference(tiny_bundle: Path) -> None:
    """The single-graph KV-cached chain against the original re-run-everything inference,
    run by the checkpoint the bundle carries."""
    (x,) = _inputs("deprojector", (2,), seed=4)
    path = tiny_bundle / "deprojector.onnx"
    (got,) = _session(path).run(None, {"pooled": x.numpy()})
    checkpoint: Any = load_deprojector(tiny_bundle / "deprojector_checkpoint")
    with torch.no_grad():
        want = checkpoint.forward_reference(x).numpy()
    assert float(np.abs(got - want).max()) <= 1e-4
    assert _min_cosine(got, want, per_position=True) >= 0.99999


FP16_CASES = [
    ("clip", (2, 154)),
    ("deprojector", (2,)),
    ("unet", (1, 16, 16, 77, 999)),
    ("unet", (2, 8, 8, 154, 1)),
    ("vae_decoder", (1, 8, 8)),
    ("vae_encoder", (1, 64, 64)),
    (CLIP_VISION, (1,)),
    (CLIP_VISION, (3,)),
]


@pytest.mark.parametrize(("name", "case"), FP16_CASES, ids=[f"{n}-{c}" for n, c in FP16_CASES])
def test_fp16_true_fp16_evaluation_close(
    tiny_bundle: Path, tiny_modules: dict[str, Any], name: str, case: tuple
) -> None:
    inputs = _inputs(name, case, seed=1)
    path = tiny_bundle / f"{name}.fp16.onnx"
    got = _evaluate(_reference(path), _feeds(path, inputs))
    want = _torch_outputs(tiny_modules[name], inputs)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == np.float32 and g.shape == w.shape  # keep_io_types
        assert np.isfinite(g).all()
        assert _min_cosine(g, w, per_position=name == "deprojector") >= 0.999


FP16_ORT_CASES = [(n, c) for n, c in FP32_CASES if c[0] == 3]  # batch 3, the larger shapes


@pytest.mark.parametrize(("name", "case"), FP16_ORT_CASES, ids=[f"{n}-{c}" for n, c in FP16_ORT_CASES])
def test_fp16_dynamic_shapes_on_onnxruntime(
    tiny_bundle: Path, tiny_modules: dict[str, Any], name: str, case: tuple
) -> None:
    inputs = _inputs(name, case, seed=2)
    path = tiny_bundle / f"{name}.fp16.onnx"
    got = _session(path).run(None, _feeds(path, inputs))
    for g, w in zip(got, _torch_outputs(tiny_modules[name], inputs), strict=True):
        assert g.shape == w.shape and _min_cosine(g, w, per_position=name == "deprojector") >= 0.999


def _value_types(model: onnx.ModelProto) -> dict[str, int]:
    g = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def test_fp16_graphs_keep_sensitive_parts_in_fp32(tiny_bundle: Path) -> None:
    for name in DEFAULT_MODELS:
        model = onnx.load(str(tiny_bundle / f"{name}.fp16.onnx"))
        types = _value_types(model)
        assert {types[i.name] for i in (*model.graph.input, *model.graph.output)} <= {
            TensorProto.FLOAT,
            TensorProto.INT32,
        }
        weights = [
            t for t in model.graph.initializer if t.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16)
        ]
        half = sum(onnx_io.tensor_nbytes(t) for t in weights if t.data_type == TensorProto.FLOAT16)
        assert half > 0.4 * sum(onnx_io.tensor_nbytes(t) for t in weights), name  # most weights are fp16
        producer = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.op_type in ("LayerNormalization", "InstanceNormalization", "Softmax", "Sin", "Cos"):
                assert types[node.input[0]] == TensorProto.FLOAT, (name, node.name)
            mask_add = producer.get(node.input[0]) if node.op_type == "Softmax" else None
            if mask_add is not None and mask_add.op_type == "Add":  # scores + causal mask
                assert {types[i] for i in mask_add.input} == {TensorProto.FLOAT}, (name, mask_add.name)
        if name == "unet":
            time_path = [n for n in model.graph.node if "/time_embedding/" in n.name and n.op_type == "Gemm"]
            assert time_path and all(types[n.input[0]] == TensorProto.FLOAT for n in time_path)


def test_manifest_describes_the_files(tiny_bundle: Path) -> None:
    manifest = json.loads((tiny_bundle / MANIFEST).read_text())
    bundle = Bundle.open(tiny_bundle)
    assert set(bundle.models) == set(DEFAULT_MODELS) and bundle.has_deprojector
    specs = {
        "clip": clip_spec(HIDDEN, HIDDEN),
        "deprojector": deprojector_spec(HIDDEN),
        "unet": unet_spec(HIDDEN),
        "vae_decoder": vae_decoder_spec(),
        "vae_encoder": vae_encoder_spec(),
        CLIP_VISION: clip_vision_spec(VISION_SIZE, HIDDEN),
    }
    for name, entry in bundle.models.items():
        assert entry.spec.inputs == specs[name].inputs and entry.spec.outputs == specs[name].outputs
        assert entry.dims["batch"].min == 1 and entry.dims["batch"].max == 8
        assert set(entry.files) == {"fp32", "fp16"}
        for precision, record in manifest["models"][name]["files"].items():
            path = tiny_bundle / record["file"]
            assert record == entry.files[precision].to_json()  # written through the typed schema
            assert sha256_file(path) == record["sha256"] and path.stat().st_size == record["bytes"]
            assert record["external_data"] is None and "trt_unsupported_ops" not in record  # none
            model = onnx.load(str(path), load_external_data=False)
            assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} == {18}
            assert [i.name for i in model.graph.input] == specs[name].input_names
            assert [o.name for o in model.graph.output] == specs[name].output_names
    # attention fused for ONNX Runtime where the pattern exists; CLIP's and the deprojector's
    # causal attention (mask added before Softmax) is left alone, and so is CLIP's image tower's
    # (transformers' layout: heads reshaped as -1, the weighted values' shape read back)
    expected_fused = {"unet": 8, "vae_decoder": 1, "vae_encoder": 1}  # tiny: 4 blocks x 2, VAE mid-blocks
    for name, entry in bundle.models.items():
        ort_files = manifest["models"][name].get("ort_files", {})
        if name not in expected_fused:
            assert ort_files == {} and entry.ort_files == {}
            assert bundle.graph(name, "fp32", fused=True) == entry.files["fp32"]
            continue
        record = ort_files["fp32"]
        assert record["fused"] == {"MultiHeadAttention": expected_fused[name]}
        fused = bundle.graph(name, "fp32", fused=True)
        assert fused.file == record["file"] == f"{name}.ort.onnx"
        assert sha256_file(tiny_bundle / record["file"]) == record["sha256"]
        # no fused fp16: ORT's CPU MHA is fp32
        assert bundle.graph(name, "fp16", fused=True) == entry.files["fp16"]
        fused_ops = {n.op_type for n in onnx.load(str(tiny_bundle / fused.file)).graph.node}
        assert "MultiHeadAttention" in fused_ops and "Softmax" not in fused_ops
    unet = bundle.models["unet"].dims
    assert (unet["height"].min, unet["height"].opt, unet["height"].max) == (8, 16, 128)
    assert (unet["tokens"].min, unet["tokens"].opt, unet["tokens"].max) == (77, 77, 231)
    assert bundle.models[CLIP_VISION].dims == {"batch": DimRange(1, 1, 8)}  # the image side is static
    vision = {
        "image_size": VISION_SIZE,
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "source": "preset",
    }
    assert manifest["vision"] == vision
    assert bundle.manifest.vision == VisionManifest(VISION_SIZE, OPENAI_MEAN, OPENAI_STD, "preset")
    stages = {s["name"] for s in manifest["export"]["stages"]}
    assert {f"{verb} {CLIP_VISION}" for verb in ("trace", "clean", "fp16")} <= stages
    assert {f"write {CLIP_VISION} {p}" for p in ("fp32", "fp16")} <= stages
    assert bundle.vae_scale_factor == 8 and bundle.hidden_size == HIDDEN
    assert manifest["projection_dim"] == HIDDEN and manifest["vae_scaling"] == pytest.approx(0.18215)
    assert manifest["source"] == {"kind": "preset", "preset": "tiny", "seed": 0, "projection": None}
    deprojector = {k: v for k, v in manifest["deprojector"].items() if k != "files"}
    assert deprojector == {
        "variant": "v1",
        "checkpoint": "init-from-clip",
        "input": "pooled",
        "dir": "deprojector_checkpoint",
    }
    for file, digest in manifest["deprojector"]["files"].items():
        assert sha256_file(tiny_bundle / "deprojector_checkpoint" / file) == digest
    assert manifest["scheduler"]["_class_name"] == "PNDMScheduler"
    assert manifest["packages"]["torch"].startswith("2.")
    assert (bundle.tokenizer_dir / "tokenizer.json").is_file()
    for file, digest in manifest["tokenizer"]["files"].items():
        assert sha256_file(bundle.tokenizer_dir / file) == digest
    assert manifest["warnings"] == []
    assert manifest["format_version"] == FORMAT_VERSION
    assert Manifest.from_json(manifest).to_json() == manifest  # the schema round-trips what was written
    # no staging or temp files left (runtime tests may add their backends' caches)
    assert [p.name for p in tiny_bundle.iterdir() if p.name.startswith(".") and p.name not in CACHES] == []


def test_rerun_reuses_the_bundle(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_mtime = (tiny_bundle / MANIFEST).stat().st_mtime_ns
    assert main(["--model", "tiny", "--out", str(tiny_bundle)]) == 0
    assert "reused" in capsys.readouterr().out
    assert (tiny_bundle / MANIFEST).stat().st_mtime_ns == manifest_mtime


def test_changed_or_corrupt_bundle_is_not_reused(tiny_bundle: Path, tmp_path: Path) -> None:
    opts = ExportOptions(model="tiny", out=tiny_bundle)
    assert reusable(tiny_bundle, fingerprint(opts))[0] is not None
    for changed in (ExportOptions(model="tiny", out=tiny_bundle, seed=1),
                    ExportOptions(model="tiny", out=tiny_bundle, precision="fp32"),
                    ExportOptions(model="tiny", out=tiny_bundle, deprojector="none")):  # fmt: skip
        assert reusable(tiny_bundle, fingerprint(changed))[0] is None
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "unet.onnx", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    manifest, reason = reusable(copy, fingerprint(ExportOptions(model="tiny", out=copy)))
    assert manifest is None and "unet.onnx" in reason


def test_bundle_from_before_latent_multiple_is_re_exported(tiny_bundle: Path, tmp_path: Path) -> None:
    """Same inputs and intact files, but the runtime cannot read the manifest: export again."""
    copy = tmp_path / "old"
    shutil.copytree(tiny_bundle, copy, ignore=shutil.ignore_patterns(*CACHES))
    old = json.loads((copy / MANIFEST).read_text())
    del old["latent_multiple"]
    (copy / MANIFEST).write_text(json.dumps(old, indent=2) + "\n")
    manifest, reason = reusable(copy, fingerprint(ExportOptions(model="tiny", out=copy)))
    assert manifest is None and "lacks latent_multiple" in reason


def test_failed_export_leaves_old_bundle_and_no_temp_files(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, out, ignore=shutil.ignore_patterns(*CACHES))
    before = {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()}

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("simulated crash in the middle of the export")

    monkeypatch.setattr(fp16, "to_fp16", crash)  # after clip.onnx was written to staging
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(ExportOptions(model="tiny", out=out, deprojector="none", force=True))
    assert {p.name: sha256_file(p) for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    Bundle.open(out)

    monkeypatch.setattr(build, "load_model", crash)
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="simulated"):
        export_bundle(ExportOptions(model="tiny", out=fresh))
    assert list(fresh.iterdir()) == []


def test_staging_left_by_a_killed_export_is_removed(tmp_path: Path) -> None:
    orphan = tmp_path / ".export-staging-999999999-x"  # no such process
    orphan.mkdir()
    (orphan / "unet.onnx").write_bytes(b"half written")
    with Staging(tmp_path) as staging:
        assert not orphan.exists() and staging.dir.is_dir()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--model", "nope", "--out", "{tmp}/b"], "--model"),
        (["--model", "{tmp}", "--out", "{tmp}/b"], "--model"),  # a folder, but not a diffusers one
        (["--model", "tiny", "--seed", "-1", "--out", "{tmp}/b"], "--seed"),
        (["--model", "tiny", "--projection", "{tmp}/missing", "--out", "{tmp}/b"], "--projection"),
        (["--model", "tiny", "--deprojector", "{tmp}", "--out", "{tmp}/b"], "--deprojector"),
        (["--model", "tiny", "--precision", "fp8", "--out", "{tmp}/b"], "--precision"),
        (["--model", "tiny", "--out", "{tmp}/file.txt"], "--out"),
        (["--model", "tiny"], "--out"),
    ],
)
def test_bad_arguments_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], flag: str
) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(tmp=tmp_path) for a in argv])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err.splitlines()[-1]


def test_seed_is_refused_for_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for part in ("text_encoder", "tokenizer", "unet", "vae", "scheduler"):
        (tmp_path / part).mkdir()
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--seed", "3", "--out", str(tmp_path / "b")])
    assert "--seed" in capsys.readouterr().err


def test_checkpoint_deprojector_is_loaded_and_recorded(tmp_path: Path) -> None:
    components = load_model("tiny")
    built = deprojector_module(components, None)
    assert built is not None
    ckpt = save_deprojector(built[0], tmp_path / "ckpt")
    loaded = deprojector_module(components, str(ckpt))
    assert loaded is not None
    module, entry = loaded
    assert entry == {"variant": "v2", "checkpoint": str(ckpt.resolve()), "input": "pooled"}
    x = torch.randn(2, HIDDEN)
    with torch.no_grad():
        assert torch.equal(module(x), built[0](x))
    assert deprojector_module(components, "none") is None


def test_diffusers_folder_exports_like_the_preset(tiny_bundle: Path, tmp_path: Path) -> None:
    folder = save_diffusers_folder(load_model("tiny"), tmp_path / "sd")
    out = tmp_path / "bundle"
    assert (
        main(["--model", str(folder), "--out", str(out), "--precision", "fp32", "--deprojector", "none"]) == 0
    )
    bundle = Bundle.open(out)
    assert bundle.manifest.source["kind"] == "diffusers_folder" and not bundle.has_deprojector
    assert bundle.manifest.projection_dim is None  # SD folders carry no text_projection
    assert [o.name for o in bundle.models["clip"].spec.outputs] == ["last_hidden_state", "pooled"]
    feeds = {"input_ids": example_ids(2, 154).numpy()}
    got = _session(out / "unet.onnx").run(
        None, _feeds(out / "unet.onnx", _inputs("unet", (2, 16, 16, 77, 5)))
    )
    want = _session(tiny_bundle / "unet.onnx").run(
        None, _feeds(tiny_bundle / "unet.onnx", _inputs("unet", (2, 16, 16, 77, 5)))
    )
    np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    clip = _session(out / "clip.onnx").run(None, feeds)
    np.testing.assert_allclose(clip[1], _session(tiny_bundle / "clip.onnx").run(None, feeds)[1], atol=1e-6)
    # the preset's image tower was saved to image_encoder/ (with its feature_extractor/) and came back
    preset_vision = Bundle.open(tiny_bundle).manifest.vision
    assert preset_vision is not None and bundle.manifest.vision == replace(
        preset_vision, source="image_encoder"
    )
    pixels = {"pixel_values": _inputs(CLIP_VISION, (2,))[0].numpy()}
    vision = _session(out / f"{CLIP_VISION}.onnx").run(None, pixels)[0]
    np.testing.assert_allclose(
        vision, _session(tiny_bundle / f"{CLIP_VISION}.onnx").run(None, pixels)[0], atol=1e-6
    )


def _tiny_graph() -> onnx.ModelProto:
    """x [N, 8] -> two Softmax consumers of one MatMul; weights duplicated; one big weight."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    big = rng.standard_normal((8, 512)).astype(np.float32)
    inits = [
        numpy_helper.from_array(w, "w1"),
        numpy_helper.from_array(w.copy(), "w2"),  # duplicate of w1
        numpy_helper.from_array(big, "big"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("MatMul", ["h", "w2"], ["h2"], name="mm2"),
        helper.make_node("Softmax", ["h2"], ["s1"], name="sm1", axis=-1),
        helper.make_node("Softmax", ["h2"], ["s2"], name="sm2", axis=-1),
        helper.make_node("Add", ["s1", "s2"], ["a"], name="add"),
        helper.make_node("MatMul", ["a", "big"], ["y"], name="mm3"),
    ]
    g = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 512])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_dedupe_merges_equal_initializers() -> None:
    model = _tiny_graph()
    assert graph.dedupe_initializers(model) == 1
    assert sorted(t.name for t in model.graph.initializer) == ["big", "w1"]
    assert [n.input[1] for n in model.graph.node if n.name == "mm2"] == ["w1"]


def test_fp16_repairs_give_a_valid_sorted_graph() -> None:
    model = onnx.shape_inference.infer_shapes(_tiny_graph())
    half = fp16.to_fp16(model)  # two blocked Softmax share one fp16 input: duplicate Casts
    onnx.checker.check_model(half, full_check=True)
    names = [n.name for n in half.graph.node]
    assert len(names) == len(set(names))
    assert fp16.toposort(half, list(half.graph.node)) is not None
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    want = _evaluate(model, {"x": x})[0]
    got = _evaluate(half, {"x": x})[0]
    assert got.dtype == np.float32 and _min_cosine(got, want, per_position=False) >= 0.999


def test_lean_external_data_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The >2 GB path at small scale: one .data file, lean reload, fp16 converted while streaming."""
    monkeypatch.setattr(onnx_io, "EXTERNAL_ABOVE", 1024)
    monkeypatch.setattr(onnx_io, "INLINE_LIMIT", 1024)
    monkeypatch.setattr(onnx_io, "_EXTERNAL_MIN", 0)  # every initializer goes to the data file
    model = onnx.shape_inference.infer_shapes(_tiny_graph())
    path = tmp_path / "m.onnx"
    assert onnx_io.save(model, path) == "m.onnx.data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    graph.check(path)
    lean = onnx_io.load_lean(path)
    external = [t.name for t in lean.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert external == ["big"]  # small tensors were inlined
    half = fp16.to_fp16(lean)
    assert [t.data_type for t in half.graph.initializer if t.name == "big"] == [TensorProto.FLOAT16]
    out = tmp_path / "half"
    out.mkdir()
    assert onnx_io.save(half, out / "m.fp16.onnx") == "m.fp16.onnx.data"
    graph.check(out / "m.fp16.onnx")
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    want = _session(path).run(None, {"x": x})[0]
    got = _evaluate(str(out / "m.fp16.onnx"), {"x": x})[0]
    assert _min_cosine(got, want, per_position=False) >= 0.999


def test_lean_spills_large_inline_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace under 2 GB (weights inline) loads lean too: big tensors go to a side file once, the
    cleaned and saved model computes what the original does."""
    monkeypatch.setattr(onnx_io, "SPILL_ABOVE", 1024)
    path = tmp_path / "m.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(_tiny_graph()), str(path))  # every tensor inline
    lean = onnx_io.load_lean(path)
    spilled = [t.name for t in lean.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert spilled == ["big"] and (tmp_path / "m.onnx.lean.data").is_file()
    out = tmp_path / "out"
    out.mkdir()
    assert onnx_io.save(graph.cleanup(lean), out / "m.onnx") is None  # small: one self-contained file
    graph.check(out / "m.onnx")
    x = np.random.default_rng(4).standard_normal((2, 8)).astype(np.float32)
    want, got = (_session(p).run(None, {"x": x})[0] for p in (path, out / "m.onnx"))
    np.testing.assert_array_equal(got, want)


def test_fast_fp16_clamping_equals_the_converters() -> None:
    from onnxruntime.transformers.float16 import convert_np_to_float16

    rng = np.random.default_rng(3)
    edge = [0.0, -0.0, 1e-9, -1e-9, 5.96e-08, 7e4, -7e4, 65504.0, np.inf, -np.inf, np.nan, 1e-5, 3.3]
    x = np.concatenate([rng.standard_normal(5000) * 10.0 ** rng.integers(-10, 6, 5000), edge])
    x = x.astype(np.float32)
    want = convert_np_to_float16(x)
    got = onnx_io.to_float16(x)
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_trt_op_check_reports_unsupported_ops() -> None:
    assert {"Conv", "MatMul", "LayerNormalization", "InstanceNormalization"} <= graph.trt_supported_ops()
    model = _tiny_graph()
    model.graph.node.append(helper.make_node("Unique", ["y"], ["u"], name="u"))
    model.graph.node.append(helper.make_node("Foo", ["y"], ["f"], name="f", domain="custom"))
    assert graph.unsupported_trt_ops(model) == ["Unique", "custom::Foo"]


@pytest.mark.slow
def test_sd15_export_within_targets_and_matches_pytorch(tmp_path: Path) -> None:
    """The full SD 1.5-shaped export: <= 10 min, <= 12 GB peak RSS, fp32 parity on small inputs."""
    out = tmp_path / "sd15"
    result = export_bundle(ExportOptions(model="sd15", out=out, precision="both"))
    assert result.seconds <= 600 and result.peak_rss_bytes <= 12e9
    bundle = Bundle.open(out)
    assert bundle.models["unet"].files["fp32"].external_data == "unet.onnx.data"
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".data")) == [
        "clip_vision.onnx.data",  # ViT-L/14: 1.2 GB of fp32 weights
        "unet.fp16.onnx.data",
        "unet.onnx.data",
    ]
    assert bundle.manifest.vision is not None and bundle.manifest.vision.image_size == 224
    components = load_model("sd15")
    built = deprojector_module(components, None)
    assert built is not None
    hidden = components.hidden_size
    gen = torch.Generator().manual_seed(0)
    cases: dict[str, list[torch.Tensor]] = {
        "clip": [example_ids(1, 154)],
        "deprojector": [torch.randn(1, hidden, generator=gen)],
        "unet": [torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([999.0]),
                 torch.randn(1, 77, hidden, generator=gen)],
        "vae_decoder": [torch.randn(1, 4, 8, 8, generator=gen)],
        "vae_encoder": [torch.rand(1, 3, 64, 64, generator=gen)],
        CLIP_VISION: [torch.randn(1, 3, 224, 224, generator=gen)],  # ViT-L/14
    }  # fmt: skip
    wants = {name: _torch_outputs(torch_module(name, components, built[0]), x) for name, x in cases.items()}
    del components, built  # torch and an ORT UNet session together would need ~12 GB
    for name, inputs in cases.items():
        for precision, floor in (("fp32", 0.99999), ("fp16", 0.999)):
            path = out / bundle.models[name].files[precision].file
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
            for g, w in zip(session.run(None, feeds), wants[name], strict=True):
                cosine = _min_cosine(g, w, per_position=name == "deprojector")
                relative = float(np.abs(g - w).max() / np.abs(w).max())
                print(f"sd15 {name} {precision}: min cosine {cosine:.7f}, max error / max abs {relative:.2e}")
                assert cosine >= floor, (name, precision)
                if precision == "fp32":
                    assert relative <= 1e-4, name
            del session
