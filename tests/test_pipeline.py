"""The pipeline's own contracts on the torch-free fake bundle: seeds, batching, CFG shortcut,
progress callbacks and cancellation, for each CPU backend. Parity with PyTorch: test_runtime_e2e.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.backends import BackendConfig
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline

SIZE = 64


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def runtime_pipeline(request, fake_bundle: Path):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    pipeline = Pipeline(fake_bundle, BackendConfig(request.param, cache_graphs=False))
    yield pipeline
    pipeline.close()


def test_same_seed_same_image_and_batch_consistency(runtime_pipeline):
    base = dict(steps=3, height=SIZE, width=SIZE, scheduler="euler_a")
    single = runtime_pipeline.generate(GenerateOptions(prompts=("cat",), seed=11, **base))
    again = runtime_pipeline.generate(GenerateOptions(prompts=("cat",), seed=11, **base))
    batch = runtime_pipeline.generate(GenerateOptions(prompts=("cat", "dog"), num_images=2, seed=10, **base))
    np.testing.assert_array_equal(single.images, again.images)
    assert batch.images.shape == (4, SIZE, SIZE, 3) and batch.seeds == [10, 11, 12, 13]
    # image 1 of the batch (prompt "cat", seed 11) is the single run with seed 11
    assert np.abs(batch.images[1].astype(int) - single.images[0]).max() <= 1
    assert np.abs(batch.images[2].astype(int) - single.images[0]).max() > 10


def test_guidance_one_skips_uncond_and_callbacks_and_cancel(runtime_pipeline):
    from runtime.pipeline import Cancelled

    seen: list[int] = []
    options = GenerateOptions(
        prompts=("cat",), steps=4, guidance=1.0, height=SIZE, width=SIZE, scheduler="ddim"
    )
    result = runtime_pipeline.generate(options, on_step=lambda i, t, x: seen.append(i))
    assert seen == [0, 1, 2, 3] and result.images.shape == (1, SIZE, SIZE, 3)
    with pytest.raises(Cancelled, match="after step 2 of 4"):
        runtime_pipeline.generate(
            options, on_step=lambda i, t, x: seen.append(i), cancel=lambda: len(seen) >= 6
        )
