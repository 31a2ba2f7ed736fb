"""sdrt export: PyTorch models, the reference pipeline, and ONNX bundles (the torch side)."""
