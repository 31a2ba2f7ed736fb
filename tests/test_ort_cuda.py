"""ONNX Runtime on CUDA (IO binding, device-resident inputs) against ORT CPU. GPU hosts only."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime.backends.onnxruntime import OrtBackend
from runtime.bundle import Bundle

pytestmark = pytest.mark.gpu


def test_cuda_io_binding_matches_cpu(tiny_bundle):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install the gpu extra on a GPU host)")
    bundle = Bundle.open(tiny_bundle)
    cpu, cuda = OrtBackend(bundle), OrtBackend(bundle, device="cuda")
    rng = np.random.default_rng(0)
    states = rng.standard_normal((2, 77, bundle.hidden_size), dtype=np.float32)
    for t in (999.0, 500.0):  # the second call reuses the device copy of `states`
        feeds = {
            "sample": rng.standard_normal((2, 4, 16, 16), dtype=np.float32),
            "timestep": np.array([t], np.float32),
            "encoder_hidden_states": states,
        }
        expected, got = cpu.run("unet", feeds)["noise_pred"], cuda.run("unet", feeds)["noise_pred"]
        np.testing.assert_allclose(got, expected, atol=1e-3, rtol=1e-3)
