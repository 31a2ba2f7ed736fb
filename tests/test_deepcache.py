"""Step caching on the tiny preset: the two exported graphs against their PyTorch modules, the
runtime against the PyTorch reference with caching on (<= 2/255 per scheduler and backend, as
without caching), interval 1 unchanged, and the reference against the DeepCache package."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx.reference import ReferenceEvaluator

import export.reference as reference_module
from export import deepcache
from export.compare.cli import main as compare_main
from export.compare.metrics import image_metrics
from export.models import build_preset, load_model
from export.reference import ReferencePipeline
from runtime.backends import BackendConfig
from runtime.bundle import Bundle
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline
from runtime.specs import DEEP_FEATURE, DEEPCACHE_FULL, DEEPCACHE_SHALLOW

pytestmark = pytest.mark.integration  # exports with torch, runs the PyTorch reference

HIDDEN = 64  # tiny preset
SIZE, STEPS, SEED = 128, 6, 7
MAX_PIXEL_DIFF = 2  # out of 255, the tolerance without caching
PROMPT, NEGATIVE = "a photo of a cat", "blurry, dog"


@pytest.fixture(scope="module")
def cache_bundle(tiny_deepcache_bundle: Path) -> Path:
    return tiny_deepcache_bundle


@pytest.fixture(scope="module")
def unet() -> Any:
    return load_model("tiny").unet


@functools.cache
def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _inputs(unet: Any, batch: int, height: int, width: int, tokens: int, t: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 1000 + t)
    channels = deepcache.feature_channels(unet)
    return {
        "sample": torch.randn(batch, 4, height, width, generator=gen),
        "timestep": torch.tensor([float(t)]),
        "encoder_hidden_states": torch.randn(batch, tokens, HIDDEN, generator=gen),
        DEEP_FEATURE: torch.randn(batch, channels, height, width, generator=gen),
    }


def _torch(unet: Any, name: str, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    args = [inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]]
    with torch.no_grad():
        if name == DEEPCACHE_FULL:
            return [t.numpy() for t in deepcache.FullWrapper(unet)(*args)]
        return [deepcache.ShallowWrapper(unet)(*args, inputs[DEEP_FEATURE]).numpy()]


def _feeds(path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {i.name: inputs[i.name].numpy() for i in _session(path).get_inputs()}


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return float(((a64 * b64).sum(-1) / (np.linalg.norm(a64, axis=-1) * np.linalg.norm(b64, axis=-1))).min())


CASES = [(1, 16, 16, 77, 999), (2, 24, 32, 154, 500), (3, 16, 16, 154, 1)]
GRAPHS = [(name, case) for name in (DEEPCACHE_FULL, DEEPCACHE_SHALLOW) for case in CASES]


@pytest.mark.parametrize(("name", "case"), GRAPHS, ids=[f"{n}-{c}" for n, c in GRAPHS])
def test_fp32_graphs_match_pytorch(cache_bundle: Path, unet: Any, name: str, case: tuple) -> None:
    inputs = _inputs(unet, *case)
    path = cache_bundle / f"{name}.onnx"
    got = _session(path).run(None, _feeds(path, inputs))
    want = _torch(unet, name, inputs)
    assert len(got) == len(want) == (2 if name == DEEPCACHE_FULL else 1)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == np.float32
        assert float(np.abs(g - w).max()) <= 1e-4
        assert _min_cosine(g, w) >= 0.99999
    fused = cache_bundle / f"{name}.ort.onnx"  # the ONNX Runtime copy with fused attention
    for g, f in zip(got, _session(fused).run(None, _feeds(fused, inputs)), strict=True):
        assert float(np.abs(g - f).max()) <= 1e-5


@pytest.mark.parametrize("name", [DEEPCACHE_FULL, DEEPCACHE_SHALLOW])
def test_fp16_graphs_close_in_true_fp16(cache_bundle: Path, unet: Any, name: str) -> None:
    inputs = _inputs(unet, 1, 8, 8, 77, 999)
    path = cache_bundle / f"{name}.fp16.onnx"
    got = ReferenceEvaluator(onnx.load(str(path))).run(None, _feeds(path, inputs))
    for g, w in zip(got, _torch(unet, name, inputs), strict=True):
        assert g.dtype == np.float32 and np.isfinite(g).all()
        assert _min_cosine(g, w) >= 0.999


def test_shallow_graph_fed_the_same_steps_feature_is_the_whole_unet(cache_bundle: Path, unet: Any) -> None:
    """The pair is a split of the UNet: no approximation until the feature is reused."""
    inputs = _inputs(unet, 2, 16, 24, 77, 500)
    full, shallow, plain = (cache_bundle / f"{n}.onnx" for n in (DEEPCACHE_FULL, DEEPCACHE_SHALLOW, "unet"))
    noise, feature = _session(full).run(None, _feeds(full, inputs))
    inputs[DEEP_FEATURE] = torch.from_numpy(feature)
    (again,) = _session(shallow).run(None, _feeds(shallow, inputs))
    (want,) = _session(plain).run(None, _feeds(plain, inputs))
    assert float(np.abs(noise - want).max()) <= 1e-5
    assert float(np.abs(again - want).max()) <= 1e-4


def test_manifest_lists_the_graphs_and_the_branch(cache_bundle: Path, unet: Any) -> None:
    manifest = Bundle.open(cache_bundle).manifest
    channels = deepcache.feature_channels(unet)
    assert manifest.models[DEEPCACHE_FULL].spec.outputs[1].shape == ("batch", channels, "height", "width")
    assert manifest.models[DEEPCACHE_SHALLOW].spec.input_names[-1] == DEEP_FEATURE
    assert set(manifest.models[DEEPCACHE_SHALLOW].files) == {"fp32", "fp16"}
    assert manifest.export["deepcache"] == {"branch": deepcache.BRANCH}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> ReferencePipeline:
    return ReferencePipeline(build_preset("tiny", cache_dir=tmp_path_factory.mktemp("cache")))


def _latents() -> np.ndarray:
    return np.random.default_rng(SEED).standard_normal((1, 4, SIZE // 8, SIZE // 8), dtype=np.float32)


def _reference_image(
    reference: ReferencePipeline, monkeypatch: pytest.MonkeyPatch, scheduler: str, cache_interval: int
) -> np.ndarray:
    """The reference image with the runtime's noise for ancestral steps (its rng draws only step
    noise when latents are given)."""
    noise_rng = np.random.default_rng(SEED)

    def same_noise(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, **_: Any) -> Any:
        return torch.from_numpy(noise_rng.standard_normal(tuple(shape)[1:], dtype=np.float32)[None])

    monkeypatch.setattr(euler_a_module, "randn_tensor", same_noise)
    images = reference.generate(
        PROMPT, NEGATIVE, steps=STEPS, seed=SEED, height=SIZE, width=SIZE, scheduler=scheduler,
        latents=torch.from_numpy(_latents()), cache_interval=cache_interval,
    )  # fmt: skip
    return np.asarray((images * 255).round().astype(np.uint8))


def _options(scheduler: str, cache_interval: int) -> GenerateOptions:
    return GenerateOptions(
        prompts=(PROMPT,), negative_prompts=(NEGATIVE,), steps=STEPS, seed=SEED, height=SIZE, width=SIZE,
        scheduler=scheduler, latents=_latents(), cache_interval=cache_interval,
    )  # fmt: skip


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def cache_pipeline(request: pytest.FixtureRequest, cache_bundle: Path) -> Any:
    if request.param == "openvino":
        pytest.importorskip("openvino")
    pipeline = Pipeline(cache_bundle, BackendConfig(request.param))
    yield pipeline
    pipeline.close()


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "pndm", "dpmpp_2m"])
@pytest.mark.parametrize("cache_interval", [2, 3])
def test_runtime_matches_reference_with_caching(
    cache_pipeline: Pipeline,
    reference: ReferencePipeline,
    monkeypatch: pytest.MonkeyPatch,
    scheduler: str,
    cache_interval: int,
) -> None:
    ours = cache_pipeline.generate(_options(scheduler, cache_interval)).images
    theirs = _reference_image(reference, monkeypatch, scheduler, cache_interval)
    exact = _reference_image(reference, monkeypatch, scheduler, 1)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    assert ours.std() > 5, "degenerate image: the comparison would prove nothing"
    assert np.abs(theirs.astype(int) - exact).max() > 2 * MAX_PIXEL_DIFF, "caching changed nothing"
    assert np.abs(ours.astype(int) - theirs).max() <= MAX_PIXEL_DIFF


def test_interval_one_is_the_plain_path_bit_for_bit(cache_bundle: Path, tiny_bundle: Path) -> None:
    """--deepcache adds graphs and changes none: interval 1 on it equals a plain bundle's image."""
    assert DEEPCACHE_FULL not in Bundle.open(tiny_bundle).models  # the default export stays as it was
    images = []
    for bundle in (cache_bundle, tiny_bundle):
        pipeline = Pipeline(bundle, BackendConfig("onnxruntime"))
        images.append(pipeline.generate(_options("dpmpp_2m", 1)).images)
        pipeline.close()
    assert np.array_equal(images[0], images[1])


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a", "dpmpp_2m"])
def test_reference_equals_the_deepcache_package(
    reference: ReferencePipeline, monkeypatch: pytest.MonkeyPatch, scheduler: str
) -> None:
    """DeepCache's own helper, on the paper's SD 1.5 branch (layer 0, block 0: the helper's
    cache_branch_id 1), gives the same images. PNDM is left out: the helper finds the step by
    looking the timestep up, which PLMS's repeated warm-up timestep makes ambiguous."""
    helper_module = pytest.importorskip("DeepCache", reason="pip install DeepCache==0.1.1 --no-deps")
    interval = 3

    class HelperPipeline(reference_module.StableDiffusionPipeline):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            helper = helper_module.DeepCacheSDHelper(pipe=self)
            helper.set_params(cache_interval=interval, cache_branch_id=1)
            helper.enable()
            try:
                return super().__call__(*args, **kwargs)
            finally:
                helper.disable()

    ours = _reference_image(reference, monkeypatch, scheduler, interval)
    monkeypatch.setattr(reference_module, "StableDiffusionPipeline", HelperPipeline)
    theirs = _reference_image(reference, monkeypatch, scheduler, 1)
    assert np.array_equal(ours, theirs)


# Quality floors (PSNR dB, SSIM) of the step-caching variants against exact PyTorch fp32 on tiny
# (DDIM, 6 steps, 128x128): measured 48.2 / 45.6 / 43.8 dB and SSIM 0.9995 / 0.9992 / 0.9988 for
# intervals 2 / 3 / 5. A wrong split or schedule (a stale or misplaced feature) falls far below.
CACHE_FLOORS = {2: (42.0, 0.998), 3: (40.0, 0.997), 5: (38.0, 0.995)}


def test_compare_reports_a_row_per_cache_interval(
    cache_bundle: Path, reference: ReferencePipeline, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    args = ["--size", f"{SIZE}x{SIZE}", "--steps", str(STEPS), "--seed", str(SEED), "--prompt", PROMPT,
            "--negative", NEGATIVE, "--scheduler", "ddim", "--threads", "2", "--runs", "1",
            "--no-bf16"]  # fmt: skip
    code = compare_main(["--bundle", str(cache_bundle), "--out", str(tmp_path), *args])
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 0
    rows = {row["variant"]: row for row in report["accuracy"]["variants"]}
    assert list(rows) == ["runtime", *(f"runtime, cache interval {n}" for n in CACHE_FLOORS)]
    assert rows["runtime"]["max_pixel_diff"] <= MAX_PIXEL_DIFF
    exact = _reference_image(reference, monkeypatch, "ddim", 1)[0]
    for interval, (psnr, ssim) in CACHE_FLOORS.items():
        row = rows[f"runtime, cache interval {interval}"]
        assert row["psnr_db"] >= psnr and row["ssim"] >= ssim, row
        assert row["final_latent_rel_l2"] > 0 and row["median_s"] > 0
        # the same number from the PyTorch side alone: caching in the reference vs exact
        independent = image_metrics(_reference_image(reference, monkeypatch, "ddim", interval)[0], exact)
        assert abs(row["max_pixel_diff"] - independent["max_pixel_diff"]) <= MAX_PIXEL_DIFF
    assert "## Variants vs the exact PyTorch fp32 image" in (tmp_path / "report.md").read_text()
