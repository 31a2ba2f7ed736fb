"""LoRA core without torch: the ONNX reader/rewriter, the name map, the file readers, the merge,
the refusals, the LRU and the weight gate. Graphs are built by hand with `onnx`, scoped as the
exporter scopes them; parity with diffusers is tests/test_lora_parity.py's job."""

from __future__ import annotations

import json
import struct
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from runtime.bundle import Bundle
from runtime.errors import RequestError
from runtime.lora import LoraRef, LoraSettings, WeightSet, check_refs
from runtime.lora.apply import LoraState
from runtime.lora.files import read_lora
from runtime.lora.graph import read_graph
from runtime.lora.merge import merge
from runtime.lora.prepare import WeightGate, lora_key
from runtime.lora.targets import Targets
from runtime.lora.variant import lora_graph
from tests.fake_bundle import add_ir_file_set

D_IN, D_OUT, CH = 6, 5, 3


def _graph(rng: np.random.Generator, shared: bool = False) -> onnx.ModelProto:
    """x (1, D_IN) -> to_q (MatMul, transposed weight) -> proj (Gemm transB=1) -> y; and an image
    path: img (1, CH, 4, 4) -> conv (3x3 Conv) -> z. `shared`: a second MatMul reads to_q's weight."""
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "onnx::MatMul_1"], ["h"], name="/unet/down_blocks.0/attn1/to_q/MatMul"),
        n("Gemm", ["h", "unet.down_blocks.0.proj.weight", "unet.down_blocks.0.proj.bias"], ["y"], transB=1,
          name="/unet/down_blocks.0/proj/Gemm"),
        n("Conv", ["img", "unet.conv_in.weight"], ["z"], pads=[1, 1, 1, 1], name="/unet/conv_in/Conv"),
    ]  # fmt: skip
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D_OUT]),
        helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, CH, 4, 4]),
    ]
    if shared:
        nodes.append(
            n("MatMul", ["x", "onnx::MatMul_1"], ["k"], name="/unet/down_blocks.0/attn1/to_k/MatMul")
        )
        outputs.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, D_IN]))
    weights = {
        "onnx::MatMul_1": rng.standard_normal((D_IN, D_IN)).astype(np.float32),  # stored (in, out)
        "unet.down_blocks.0.proj.weight": rng.standard_normal((D_OUT, D_IN)).astype(np.float32),  # (out, in)
        "unet.down_blocks.0.proj.bias": rng.standard_normal(D_OUT).astype(np.float32),
        "unet.conv_in.weight": rng.standard_normal((CH, CH, 3, 3)).astype(np.float32),
    }
    graph = helper.make_graph(
        nodes,
        "unet",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D_IN]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, CH, 4, 4]),
        ],
        outputs,
        initializer=[numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _save(model: onnx.ModelProto, path: Path, external: bool) -> Path:
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)  # fmt: skip
    return path


def _inputs(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "x": rng.standard_normal((1, D_IN)).astype(np.float32),
        "img": rng.standard_normal((1, CH, 4, 4)).astype(np.float32),
    }


@pytest.mark.parametrize("external", [False, True])
def test_reader_finds_nodes_and_weights(tmp_path: Path, external: bool) -> None:
    rng = np.random.default_rng(0)
    model = _graph(rng)
    stored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    path = _save(model, tmp_path / "unet.onnx", external)  # (moves the arrays out of `model`)
    graph = read_graph(path)
    assert [node.name for node in graph.nodes] == [node.name for node in model.graph.node]
    assert graph.nodes[1].attributes == {"transB": 1}
    for name, array in stored.items():
        np.testing.assert_array_equal(graph.array(name), array)
    targets = Targets.of(graph, "unet").by_module
    assert sorted(targets) == ["conv_in", "down_blocks.0.attn1.to_q", "down_blocks.0.proj"]
    assert targets["down_blocks.0.attn1.to_q"].transposed and not targets["down_blocks.0.proj"].transposed
    assert targets["conv_in"].weight_shape == (CH, CH, 3, 3)


@pytest.mark.parametrize("external", [False, True])
def test_variant_fed_base_weights_is_the_same_model(tmp_path: Path, external: bool) -> None:
    """Weights as inputs, fed the bundle's arrays: the same outputs; fed changed arrays: the outputs
    of a graph storing those arrays. To float rounding, not bit for bit: ONNX Runtime packs constant
    weights for its kernels, inputs it cannot (which is why a request without LoRA never runs this)."""
    rng = np.random.default_rng(1)
    model = _graph(rng)
    path = _save(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "unet.onnx", external)
    lora = lora_graph("unet", path)
    variant = ort.InferenceSession(lora.onnx, providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = _inputs(rng)
    base = lora.base
    assert sorted(base) == ["onnx::MatMul_1", "unet.conv_in.weight", "unet.down_blocks.0.proj.weight"]
    for ours, theirs in zip(variant.run(None, {**feeds, **base}), plain.run(None, feeds), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    changed = {name: (np.asarray(a) * 1.5).astype(np.float32) for name, a in base.items()}
    for tensor in model.graph.initializer:
        if tensor.name in changed:
            tensor.CopyFrom(numpy_helper.from_array(changed[tensor.name], tensor.name))
    edited = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for ours, theirs in zip(variant.run(None, {**feeds, **changed}), edited.run(None, feeds), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def _kohya(path: Path, rng: np.random.Generator, rank: int = 2, alpha: float | None = 1.0) -> Path:
    tensors = {
        "lora_unet_down_blocks_0_attn1_to_q.lora_down.weight": rng.standard_normal((rank, D_IN)),
        "lora_unet_down_blocks_0_attn1_to_q.lora_up.weight": rng.standard_normal((D_IN, rank)),
        "lora_unet_conv_in.lora_down.weight": rng.standard_normal((rank, CH, 3, 3)),
        "lora_unet_conv_in.lora_up.weight": rng.standard_normal((CH, rank, 1, 1)),
    }
    if alpha is not None:
        tensors |= {f"lora_unet_{m}.alpha": np.array(alpha) for m in ("down_blocks_0_attn1_to_q", "conv_in")}
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(path))
    return path


def _peft(path: Path, rng: np.random.Generator, metadata: dict[str, str] | None = None) -> Path:
    tensors = {
        "unet.down_blocks.0.proj.lora_A.weight": rng.standard_normal((3, D_IN)).astype(np.float16),
        "unet.down_blocks.0.proj.lora_B.weight": rng.standard_normal((D_OUT, 3)).astype(np.float16),
    }
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_merge_matches_the_formula_in_both_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    graph = read_graph(_save(_graph(rng), tmp_path / "unet.onnx", external=True))
    targets = Targets.of(graph, "unet")
    kohya = read_lora(_kohya(tmp_path / "k.safetensors", rng, rank=2, alpha=1.0))
    config = {"unet.lora_alpha": 6, "unet.r": 3}
    peft = read_lora(_peft(tmp_path / "p.safetensors", rng, {"lora_adapter_metadata": json.dumps(config)}))
    assert (kohya.layout, peft.layout) == ("kohya", "peft")
    merged = merge([(kohya, 0.7), (peft, -0.5)], "unet", targets, graph.array)
    q = next(m for m in kohya.modules if m.name.endswith("to_q"))
    conv = next(m for m in kohya.modules if m.name == "conv_in")
    (proj,) = peft.modules
    expected_q = graph.array("onnx::MatMul_1") + (0.7 * 0.5 * q.up @ q.down).T
    expected_proj = graph.array("unet.down_blocks.0.proj.weight") - 0.5 * 2.0 * proj.up @ proj.down
    conv_delta = (conv.up.reshape(CH, 2) @ conv.down.reshape(2, -1)).reshape(CH, CH, 3, 3)
    expected_conv = graph.array("unet.conv_in.weight") + 0.7 * 0.5 * conv_delta
    np.testing.assert_allclose(merged["onnx::MatMul_1"], expected_q, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged["unet.down_blocks.0.proj.weight"], expected_proj, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged["unet.conv_in.weight"], expected_conv, rtol=1e-6, atol=1e-6)
    # without alpha (kohya) or metadata (PEFT): alpha = rank, as diffusers does
    bare = read_lora(_peft(tmp_path / "bare.safetensors", rng))
    assert bare.modules[0].alpha == 3.0
    assert {m.alpha for m in read_lora(_kohya(tmp_path / "na.safetensors", rng, alpha=None)).modules} == {2.0}


def test_bf16_factors_are_read(tmp_path: Path) -> None:
    """numpy has no bfloat16: the reader widens it itself (a bf16 value is a float32's upper half)."""
    values = np.array([[1.5, -2.25], [0.125, 3.0]], np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = {
        "lora_unet_conv_in.lora_down.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]},
        "lora_unet_conv_in.lora_up.weight": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [8, 16]},
    }
    text = json.dumps(header).encode()
    path = tmp_path / "bf16.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + bf16 + bf16)
    (module,) = read_lora(path).modules
    np.testing.assert_array_equal(module.down, values)


def _refusal(tmp_path: Path, tensors: dict[str, np.ndarray], name: str = "bad.safetensors") -> str:
    rng = np.random.default_rng(3)
    graph = read_graph(_save(_graph(rng, shared=True), tmp_path / "unet.onnx", external=False))
    path = tmp_path / name
    save_file(tensors, str(path))
    with pytest.raises(RequestError) as info:
        merge([(read_lora(path), 1.0)], "unet", Targets.of(graph, "unet"), graph.array)
    assert f"lora {path.name}:" in str(info.value)  # the name only: a server's folder stays private
    return str(info.value)


def test_refusals_name_the_file_and_the_first_bad_key(tmp_path: Path) -> None:
    f = np.ones
    q = "lora_unet_down_blocks_0_attn1_to_q"
    proj = "lora_unet_down_blocks_0_proj"
    message = _refusal(tmp_path, {"model.diffusion_model.x.weight": f((2, 2), np.float32)})
    assert "no key matches" in message and "model.diffusion_model.x.weight" in message
    message = _refusal(tmp_path, {f"{proj}.lora_down.weight": f((2, D_IN + 1), np.float32),
                                  f"{proj}.lora_up.weight": f((D_OUT, 2), np.float32)})  # fmt: skip
    assert f"{proj}.lora_down.weight" in message and "(5, 6)" in message
    nan = f((2, D_IN), np.float32)
    nan[1, 1] = np.nan
    message = _refusal(
        tmp_path, {f"{proj}.lora_down.weight": nan, f"{proj}.lora_up.weight": f((D_OUT, 2), np.float32)}
    )
    assert "NaN" in message and f"{proj}.lora_down.weight" in message
    x = "lora_unet_down_blocks_9_x"
    message = _refusal(tmp_path, {f"{x}.lora_down.weight": f((2, 2), np.float32),
                                  f"{x}.lora_up.weight": f((2, 2), np.float32)})  # fmt: skip
    assert f"{x}.lora_down.weight" in message and "does not have" in message
    message = _refusal(tmp_path, {f"{q}.hada_w1_a": f((2, 2), np.float32)})
    assert f"{q}.hada_w1_a" in message and "LoHa" in message
    # to_q and to_k read one (deduplicated) initializer: a LoRA on one of them is refused
    message = _refusal(tmp_path, {f"{q}.lora_down.weight": f((2, D_IN), np.float32),
                                  f"{q}.lora_up.weight": f((D_IN, 2), np.float32)})  # fmt: skip
    assert "shares its weight" in message and "down_blocks.0.attn1.to_k" in message
    text = tmp_path / "not.safetensors"
    text.write_text("this is a pickle, honestly")
    with pytest.raises(RequestError, match="not a safetensors file"):
        read_lora(text)


def test_request_level_checks(tmp_path: Path) -> None:
    path = _kohya(tmp_path / "a.safetensors", np.random.default_rng(4))
    assert check_refs([LoraRef(path, 1)]) == (LoraRef(path, 1.0),)
    for refs, match in [
        ([LoraRef(tmp_path / "missing.safetensors")], "no such file"),
        ([LoraRef(tmp_path / "a.ckpt")], "only .safetensors"),
        ([LoraRef(tmp_path, 1.0)], "only .safetensors"),
        ([LoraRef(path, float("nan"))], "scale must be a finite number"),
        ([LoraRef(path, 11.0)], "scale must be a finite number from -10 to 10"),
        ([LoraRef(path), LoraRef(tmp_path / "." / "a.safetensors")], "given twice"),
        ("a.safetensors", "must be a list"),
    ]:
        with pytest.raises(RequestError, match=match):
            check_refs(refs)
    with pytest.raises(RequestError, match="cache size"):
        LoraSettings(cache_size=0).validate()


def test_weight_gate_runs_same_key_together_and_switches_between() -> None:
    gate = WeightGate()
    switches: list[tuple[str, ...]] = []
    inside: list[int] = []
    running = [0]
    lock = threading.Lock()

    def generation(key: tuple[tuple[str, float], ...]) -> None:
        with gate.hold(key, lambda: switches.append(tuple(k for k, _ in key))):
            with lock:
                running[0] += 1
                inside.append(running[0])
            time.sleep(0.05)
            with lock:
                running[0] -= 1

    a, b = (("a", 1.0),), (("b", 1.0),)
    threads = [threading.Thread(target=generation, args=(k,)) for k in (a, a, b, b, ())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert max(inside) == 2  # two of one key at once, never two keys at once
    assert len(switches) <= 3 and switches[0] == ("a",)


class _RecordingBackend:
    """Records set_weights calls; runs nothing."""

    precision = "fp32"
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[tuple[str, float], ...] | None]] = []

    def set_weights(self, model: str, weights: WeightSet | None) -> None:
        self.calls.append((model, None if weights is None else weights.key))


def test_switching_calls_the_backend_only_when_the_set_changes(fake_bundle, tmp_path, monkeypatch) -> None:
    """Same set again: no call at all; a request without LoRA after one with: None for each model
    that had weights; a set that touches no weight of a model: that model keeps the base."""
    bundle = Bundle.open(fake_bundle)
    backend = _RecordingBackend()
    state = LoraState(bundle, backend)  # type: ignore[arg-type]
    paths = {
        name: _kohya(tmp_path / f"{name}.safetensors", np.random.default_rng(i))
        for i, name in enumerate("ab")
    }

    def weight_sets(loras, graphs):
        key = lora_key(loras)
        touched = {"unet"} if loras[0].path == paths["a"] else {"unet", "clip"}
        return {m: WeightSet(key, {"w": np.zeros(1)} if m in touched else {}) for m in graphs}

    monkeypatch.setattr(state.weights, "weight_sets", weight_sets)
    a, b = (LoraRef(paths["a"]),), (LoraRef(paths["b"]),)
    for loras in ((), a, a, b, (), ()):
        with state.using(loras):
            pass
    key_a, key_b = lora_key(a), lora_key(b)
    assert backend.calls == [
        ("unet", key_a),
        ("clip", key_b),
        ("unet", key_b),
        ("clip", None),
        ("unet", None),
    ]


def test_an_int8_unet_refuses_lora_by_name(fake_bundle_copy, tmp_path) -> None:
    pytest.importorskip("openvino")
    add_ir_file_set(fake_bundle_copy)
    backend = _RecordingBackend()
    backend.precision = "int8"
    state = LoraState(Bundle.open(fake_bundle_copy), backend)  # type: ignore[arg-type]
    ref = (LoraRef(_kohya(tmp_path / "a.safetensors", np.random.default_rng(0))),)
    with pytest.raises(RequestError, match="int8 unet of this bundle is not an ONNX graph"), state.using(ref):
        pass
    assert backend.calls == []
