"""The PyTorch reference pipeline: deterministic, and it really produces images."""

from __future__ import annotations

import numpy as np
import pytest

from export.models import build_preset
from export.reference import ReferencePipeline, diffusers_scheduler, to_pil

pytestmark = pytest.mark.integration  # runs the PyTorch reference


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return ReferencePipeline(build_preset("tiny", cache_dir=tmp_path_factory.mktemp("cache")))


def test_writes_a_png_and_is_deterministic(reference, tmp_path):
    kwargs = dict(steps=4, guidance=7.5, seed=1, height=128, width=128, scheduler="ddim")
    a = reference.generate("a photo of a cat", "blurry", **kwargs)
    b = reference.generate("a photo of a cat", "blurry", **kwargs)
    c = reference.generate("a photo of a cat", "blurry", **{**kwargs, "seed": 2})
    assert a.shape == (1, 128, 128, 3)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.01
    path = tmp_path / "ref.png"
    to_pil(a)[0].save(path)
    assert path.stat().st_size > 1000


def test_negative_prompt_changes_the_image(reference):
    kwargs = dict(steps=3, guidance=7.5, seed=0, height=128, width=128, scheduler="euler")
    a = reference.generate("a photo of a cat", "", **kwargs)
    b = reference.generate("a photo of a cat", "dog", **kwargs)
    assert np.abs(a - b).max() > 1e-3


def test_encode_gives_projection_of_pooled(reference):
    enc = reference.encode(["a cat", ""])
    assert enc.last_hidden_state.shape == (2, 77, 64) and enc.pooled.shape == (2, 64)
    assert enc.text_embeds is not None
    expected = enc.pooled @ reference.components.text_projection.T
    assert np.allclose(enc.text_embeds.numpy(), expected.numpy())


def test_deprojector_modes_need_a_deprojector(reference):
    with pytest.raises(ValueError, match="needs a deprojector"):
        reference.prompt_states("cat, maid", mode="compose")


def test_unknown_scheduler_names_choices():
    with pytest.raises(ValueError, match="scheduler must be one of ddim, pndm"):
        diffusers_scheduler("lms", {})
