"""export/fusion.py on hand-built graphs: the traced SDPA form becomes one MultiHeadAttention with
the same outputs; look-alikes (a mask added to the scores, other transposes) are left alone."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

from export.fusion import fuse_attention

pytestmark = pytest.mark.integration  # exports with torch

BATCH, SEQ, KV_SEQ, HEADS, HEAD_DIM = 2, 16, 7, 4, 8


def _attention_model(mask: bool = False, k_perm: tuple[int, ...] = (0, 2, 3, 1)) -> ModelProto:
    """q, k, v projections -> the legacy exporter's scaled-dot-product attention -> out."""
    root = np.float32((1 / np.sqrt(HEAD_DIM)) ** 0.5)
    shape = [
        helper.make_node("Shape", ["q"], ["q_shape"]),
        helper.make_node("Gather", ["q_shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1", "heads", "head_dim"], ["split"], axis=0),
        helper.make_node("Concat", ["batch1", "minus1", "hidden"], ["merged"], axis=0),
    ]
    nodes = [
        *shape,
        helper.make_node("Reshape", ["q", "split"], ["q4"]),
        helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", ["qt", "root"], ["qs"]),
        helper.make_node("Reshape", ["k", "split"], ["k4"]),
        helper.make_node("Transpose", ["k4"], ["kt"], perm=list(k_perm)),
        helper.make_node("Mul", ["kt", "root"], ["ks"]),
        helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
        *([helper.make_node("Add", ["scores", "bias"], ["masked"])] if mask else []),
        helper.make_node("Softmax", ["masked" if mask else "scores"], ["probs"], axis=-1),
        helper.make_node("Reshape", ["v", "split"], ["v4"]),
        helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", ["probs", "vt"], ["o4"]),
        helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ot", "merged"], ["out"]),
    ]
    constants = {
        "zero": np.array(0, np.int64),
        "axes0": np.array([0], np.int64),
        "minus1": np.array([-1], np.int64),
        "heads": np.array([HEADS], np.int64),
        "head_dim": np.array([HEAD_DIM], np.int64),
        "hidden": np.array([HEADS * HEAD_DIM], np.int64),
        "root": np.array([root], np.float32),
        "bias": np.zeros((1, 1, SEQ, KV_SEQ), np.float32),
    }
    hidden = HEADS * HEAD_DIM
    inputs = [
        helper.make_tensor_value_info("q", TensorProto.FLOAT, ["B", SEQ, hidden]),
        helper.make_tensor_value_info("k", TensorProto.FLOAT, ["B", KV_SEQ, hidden]),
        helper.make_tensor_value_info("v", TensorProto.FLOAT, ["B", KV_SEQ, hidden]),
    ]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
    graph = helper.make_graph(
        nodes, "attention", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in constants.items()]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def _run(model: ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, feeds)[0]
    return out


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    lengths = {"q": SEQ, "k": KV_SEQ, "v": KV_SEQ}
    hidden = HEADS * HEAD_DIM
    return {n: rng.standard_normal((BATCH, rows, hidden), dtype=np.float32) for n, rows in lengths.items()}


def test_sdpa_pattern_becomes_one_multihead_attention_with_equal_output() -> None:
    model = _attention_model()
    want = _run(model, _feeds())
    assert fuse_attention(model) == {"MultiHeadAttention": 1}
    assert [n.op_type for n in model.graph.node] == ["MultiHeadAttention"]  # the shape math is dead too
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == HEADS and attrs["scale"] == pytest.approx(1 / np.sqrt(HEAD_DIM))
    assert [i.name for i in model.graph.initializer] == []
    got = _run(model, _feeds())
    assert float(np.abs(got - want).max()) <= 1e-5


@pytest.mark.parametrize(("mask", "k_perm"), [(True, (0, 2, 3, 1)), (False, (0, 2, 1, 3))])
def test_look_alikes_are_left_alone(mask: bool, k_perm: tuple[int, ...]) -> None:
    model = _attention_model(mask=mask, k_perm=k_perm)
    before = [n.op_type for n in model.graph.node]
    assert fuse_attention(model) == {}
    assert [n.op_type for n in model.graph.node] == before
