"""ONNX -> FP16 TensorRT engines (GPU hosts only; see issue 6)."""
