"""ONNX Runtime on CUDA. The GPU test compares IO binding with device-resident inputs against ORT
CPU; the others run anywhere, with ORT's session faked, and check what a GPU host would otherwise
be the first to see: the CUDA libraries are preloaded, a session that fell back to the CPU is
refused, and TF32 is off for parity runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from runtime.backends import BackendConfig, BackendError
from runtime.backends import onnxruntime as ort_backend
from runtime.backends.onnxruntime import OrtBackend
from runtime.bundle import Bundle

CUDA = BackendConfig(device="cuda")


@pytest.mark.gpu
def test_cuda_io_binding_matches_cpu(tiny_bundle):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider here (install the gpu extra on a GPU host)")
    bundle = Bundle.open(tiny_bundle)
    cpu, cuda = OrtBackend(bundle), OrtBackend(bundle, CUDA, tf32=False)  # TF32 is ~1e-3 off fp32
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


class FakeSession:
    """An InferenceSession that reports the providers it "got" (ORT drops those that fail to load)."""

    created: list[FakeSession] = []
    running_on: list[str] = []

    def __init__(self, path: str, options: Any, providers: list[tuple[str, dict[str, str]]]) -> None:
        self.providers = providers
        FakeSession.created.append(self)

    def get_providers(self) -> list[str]:
        return list(self.running_on)


@pytest.fixture
def fake_cuda_ort(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """An onnxruntime built with CUDA; returns the log of preload_dlls calls."""
    preloads: list[str] = []
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "preload_dlls", lambda: preloads.append("preload"), raising=False)
    monkeypatch.setattr(ort, "InferenceSession", FakeSession)
    monkeypatch.setattr(FakeSession, "created", [])
    ort_backend.preload_cuda_libraries.cache_clear()
    yield preloads
    ort_backend.preload_cuda_libraries.cache_clear()


def test_a_silent_cpu_fallback_is_refused(fake_bundle: Path, fake_cuda_ort, monkeypatch):
    monkeypatch.setattr(FakeSession, "running_on", ["CPUExecutionProvider"])  # libcudnn missing, say
    backend = OrtBackend(Bundle.open(fake_bundle), CUDA)
    with pytest.raises(
        BackendError, match=r"could not start CUDAExecutionProvider .*CPUExecutionProvider"
    ) as exc:
        backend.session("unet")
    assert "onnxruntime-gpu[cuda,cudnn]" in str(exc.value)
    monkeypatch.setattr(FakeSession, "running_on", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert isinstance(OrtBackend(Bundle.open(fake_bundle), CUDA).session("unet"), FakeSession)


def test_cuda_libraries_are_preloaded_once_before_sessions(fake_bundle: Path, fake_cuda_ort, monkeypatch):
    monkeypatch.setattr(FakeSession, "running_on", ["CUDAExecutionProvider"])
    OrtBackend(Bundle.open(fake_bundle))  # cpu: nothing to preload
    assert fake_cuda_ort == []
    first = OrtBackend(Bundle.open(fake_bundle), CUDA)
    assert fake_cuda_ort == ["preload"] and not FakeSession.created
    first.session("unet")
    OrtBackend(Bundle.open(fake_bundle), CUDA).session("clip")
    assert fake_cuda_ort == ["preload"]


def test_tf32_is_ort_default_and_off_for_parity(fake_bundle: Path, fake_cuda_ort, monkeypatch):
    monkeypatch.setattr(FakeSession, "running_on", ["CUDAExecutionProvider"])
    OrtBackend(Bundle.open(fake_bundle), CUDA).session("unet")
    OrtBackend(Bundle.open(fake_bundle), CUDA, tf32=False).session("unet")
    default, parity = (dict(s.providers)["CUDAExecutionProvider"] for s in FakeSession.created)
    assert default["use_tf32"] == "1" and parity["use_tf32"] == "0"
