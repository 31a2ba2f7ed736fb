"""LoRA on TensorRT by refit, against the fake `tensorrt` / CUDA of tests/test_trt_fake.py plus a
fake `Refitter`: which weights are set, that unloading puts back the ONNX file's own values bit for
bit, that TensorRT's "missing" weights get the values they should have, that captured CUDA graphs
are dropped after a refit, that an engine loaded later gets the chosen set, and every refusal
(an engine built without --refittable, a name the engine lacks, a dtype mismatch, a failed refit).
The build side: `--refittable` is a flag of the key, recorded in the manifest, sets BuilderFlag.REFIT.

What this cannot show: that real TensorRT names refittable weights after the ONNX initializers of
the bundle's fp16 graphs, and the refitted engine's images: tests/test_engines_gpu.py, on a GPU.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engines import build as build_cli
from engines.builder import build_plan
from engines.cache import FLAGS, REFITTABLE, build_flags, plan_jobs
from engines.profiles import ProfileRequest
from runtime.backends import BackendConfig, BackendError
from runtime.backends import tensorrt as trt_backend
from runtime.backends.trt_manifest import read_manifest
from runtime.backends.trt_refit import NotRefittable, RefitFailed
from runtime.bundle import Bundle
from runtime.lora import WeightSet
from runtime.lora.graph import read_graph, read_initializers
from tests import test_trt_fake as fake
from tests.test_trt_fake import REQUEST, FakeCudart, FakeEngine, build_engines, unet

cuda, bundle = fake.cuda, fake.bundle  # its fixtures: the fake TensorRT and CUDA, a fake bundle copy

CLIP_WEIGHTS = ("table", "projection")  # the fake CLIP's two float initializers


def originals(bundle: Bundle, model: str) -> dict[str, np.ndarray]:
    """The float initializers of the fp16 graph file the engine is built from."""
    path = bundle.root / bundle.graph(model, "fp16").file
    names = list(read_graph(path).initializers)
    return {n: np.array(a) for n, a in read_initializers(path, names).items() if a.dtype.kind == "f"}


def weights_of(bundle: Bundle) -> Any:
    def extra(model: str) -> dict[str, Any]:
        return {
            "refittable": True,
            "weights": {n: [str(a.dtype), a.tolist()] for n, a in originals(bundle, model).items()},
        }

    return extra


class FakeRefitter:
    """trt.Refitter over a fake engine's `weights`; `engine.groups`: names TensorRT must get together."""

    def __init__(self, engine: FakeEngine, logger: Any) -> None:
        self.engine, self.pending = engine, {}
        engine.refitters.append(self)

    def get_all_weights(self) -> list[str]:
        return list(self.engine.weights)

    def get_weights_prototype(self, name: str) -> Any:
        value = self.engine.weights[name]
        dtype = {"float32": "FLOAT", "float16": "HALF"}[str(value.dtype)]
        return types.SimpleNamespace(dtype=sys.modules["tensorrt"].DataType[dtype], size=value.size)

    def set_named_weights(self, name: str, weights: Any) -> bool:
        self.pending[name] = weights.array.copy()
        return True

    def get_missing_weights(self) -> list[str]:
        return sorted(
            n for group in self.engine.groups if group & set(self.pending) for n in group - set(self.pending)
        )

    def refit_cuda_engine(self) -> bool:
        if self.get_missing_weights() or self.engine.fail_refit:
            return False
        for name, value in self.pending.items():
            self.engine.weights[name] = value.reshape(self.engine.weights[name].shape)
        self.engine.refits.append(sorted(self.pending))
        return True


@pytest.fixture
def refit_trt(cuda: FakeCudart, monkeypatch: pytest.MonkeyPatch) -> FakeCudart:
    """The fake TensorRT with Refitter, Weights and nptype; engines hold their plan's weights."""
    trt = sys.modules["tensorrt"]

    def engine_init(self: FakeEngine, plan: dict[str, Any], cuda: FakeCudart, trt: Any) -> None:
        original_init(self, plan, cuda, trt)
        self.refittable = bool(plan.get("refittable"))
        self.weights = {n: np.array(v, dtype) for n, (dtype, v) in plan.get("weights", {}).items()}
        self.groups, self.refitters, self.refits, self.fail_refit = [], [], [], False

    original_init = FakeEngine.__init__
    monkeypatch.setattr(FakeEngine, "__init__", engine_init)
    monkeypatch.setattr(trt, "Refitter", FakeRefitter, raising=False)
    monkeypatch.setattr(trt, "Weights", lambda a: types.SimpleNamespace(array=a), raising=False)
    nptypes = {trt.DataType.FLOAT: np.float32, trt.DataType.HALF: np.float16}
    monkeypatch.setattr(trt, "nptype", nptypes.__getitem__, raising=False)
    return cuda


@pytest.fixture
def backend(bundle: Bundle, refit_trt: FakeCudart) -> trt_backend.TrtBackend:
    build_engines(bundle, bundle.root / "engines", REQUEST, flags=REFITTABLE, extra=weights_of(bundle))
    return trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt"))


def engine_of(model_output: str) -> FakeEngine:
    (engine,) = [e for e in sys.modules["tensorrt"].engines if model_output in e.dtypes]
    return engine


def clip(backend: trt_backend.TrtBackend) -> None:
    backend.run("clip", {"input_ids": np.ones((1, 77), np.int32)})


def lora_set(bundle: Bundle, seed: int, names: tuple[str, ...] = CLIP_WEIGHTS) -> WeightSet:
    base = originals(bundle, "clip")
    rng = np.random.default_rng(seed)
    arrays = {n: (base[n] + rng.standard_normal(base[n].shape)).astype(base[n].dtype) for n in names}
    return WeightSet(key=((f"sha{seed}", 1.0),), arrays=arrays)


def test_refit_sets_the_lora_weights_and_unloading_restores_the_files_bit_for_bit(backend, bundle):
    clip(backend)
    engine = engine_of("last_hidden_state")
    first, second = lora_set(bundle, 1), lora_set(bundle, 2, ("table",))
    backend.set_weights("clip", first)
    for name in CLIP_WEIGHTS:
        np.testing.assert_array_equal(engine.weights[name], first.arrays[name])
    backend.set_weights("clip", second)  # `projection` goes back to the file's, `table` is the new one
    assert engine.refits[-1] == ["projection", "table"]
    np.testing.assert_array_equal(engine.weights["table"], second.arrays["table"])
    base = originals(bundle, "clip")
    assert engine.weights["projection"].tobytes() == base["projection"].tobytes()
    backend.set_weights("clip", None)
    assert engine.refits[-1] == ["table"]
    for name in CLIP_WEIGHTS:
        assert engine.weights[name].tobytes() == base[name].tobytes()  # bit-identical
    refits = len(engine.refits)
    backend.set_weights("clip", None)  # nothing to undo: no refit at all
    backend.set_weights("clip", WeightSet(key=()))
    assert len(engine.refits) == refits
    backend.close()


def test_missing_weights_get_the_values_they_should_have(backend, bundle):
    clip(backend)
    engine = engine_of("last_hidden_state")
    engine.groups = [set(CLIP_WEIGHTS)]  # TensorRT wants both whenever one is set
    one = lora_set(bundle, 3, ("table",))
    backend.set_weights("clip", one)
    assert engine.refits[-1] == ["projection", "table"]
    np.testing.assert_array_equal(engine.weights["table"], one.arrays["table"])
    assert engine.weights["projection"].tobytes() == originals(bundle, "clip")["projection"].tobytes()


def test_an_engine_loaded_later_gets_the_chosen_set(backend, bundle):
    chosen = lora_set(bundle, 4)
    backend.set_weights("clip", chosen)  # no engine loaded yet: nothing to refit now
    assert not sys.modules["tensorrt"].engines
    clip(backend)
    engine = engine_of("last_hidden_state")
    assert engine.refits == [sorted(CLIP_WEIGHTS)]
    np.testing.assert_array_equal(engine.weights["table"], chosen.arrays["table"])


def test_captured_graphs_are_dropped_after_a_refit(backend, bundle, refit_trt):
    unet(backend, 2)  # plain run + capture
    unet(backend, 2)  # replay
    assert len(refit_trt.execs) == 1
    base = originals(bundle, "unet")
    name = next(iter(base))
    backend.set_weights("unet", WeightSet(key=(("x", 1.0),), arrays={name: np.asarray(base[name] + 1)}))
    assert not refit_trt.execs and not refit_trt.graphs  # destroyed, not leaked
    unet(backend, 2)  # runs plainly and captures again, with the new weights
    assert len(refit_trt.execs) == 1


def test_a_plain_engine_refuses_a_lora_with_the_rebuild_command(bundle, refit_trt):
    build_engines(bundle, bundle.root / "engines", REQUEST)
    backend = trt_backend.TrtBackend(bundle, BackendConfig(backend="tensorrt"))
    with pytest.raises(
        NotRefittable, match=r"(?s)built with --refittable.*engines\.build .*--refittable --force"
    ):
        backend.set_weights("clip", lora_set(bundle, 5))
    backend.set_weights("clip", None)  # no LoRA: fine on any engine
    clip(backend)


def test_the_engine_itself_must_be_refittable(backend, bundle):
    """The manifest says refittable, the plan is not (a hand-edited manifest): refused on refit."""
    clip(backend)
    engine_of("last_hidden_state").refittable = False
    with pytest.raises(NotRefittable, match="without --refittable"):
        backend.set_weights("clip", lora_set(bundle, 6))


@pytest.mark.parametrize("fault", ["unknown name", "dtype", "refit fails"])
def test_a_failed_refit_drops_the_engine_and_the_next_run_has_the_original_weights(backend, bundle, fault):
    clip(backend)
    engine = engine_of("last_hidden_state")
    backend.set_weights("clip", lora_set(bundle, 7))
    bad = lora_set(bundle, 8)
    if fault == "unknown name":
        bad = WeightSet(key=bad.key, arrays={**bad.arrays, "onnx::MatMul_9999": np.zeros(3, np.float32)})
        expected = "not refittable weights of this engine, e.g. onnx::MatMul_9999"
    elif fault == "dtype":
        bad = WeightSet(key=bad.key, arrays={"table": bad.arrays["table"].astype(np.float64)})
        expected = "weight table is 2048 x float32 in the engine; the LoRA set gives 2048 x float64"
    else:
        engine.fail_refit = True
        expected = "could not refit"
    with pytest.raises(BackendError, match=expected) as caught:
        backend.set_weights("clip", bad)
    assert isinstance(caught.value, RefitFailed) == (fault == "refit fails")
    clip(backend)  # deserialized again: the plan's own weights
    reloaded = sys.modules["tensorrt"].engines[-1]
    assert reloaded is not engine and not reloaded.refits
    backend.set_weights("clip", None)  # the model is back to its own weights: nothing to undo
    assert not reloaded.refits


def test_refittable_is_a_flag_of_the_key_recorded_in_the_manifest(bundle, refit_trt, monkeypatch):
    env = trt_backend.probe_environment()
    plain, _ = plan_jobs(bundle, ProfileRequest(), {}, env, {}, bundle.root, rebuild_stale=False)
    refittable, _ = plan_jobs(
        bundle, ProfileRequest(), {}, env, {}, bundle.root, rebuild_stale=False, flags=build_flags(True)
    )
    assert [j.flags for j in plain] == [FLAGS] * len(plain) and build_flags(False) == FLAGS
    assert all(j.flags == {**FLAGS, "refittable": True} for j in refittable)
    assert {j.name for j in plain} == {j.name for j in refittable}
    assert not {j.key for j in plain} & {j.key for j in refittable}

    jobs: list[Any] = []
    monkeypatch.setattr(build_cli, "run_jobs", lambda j, *args: jobs.extend(j) or [])
    assert build_cli.main([str(bundle.root), "--refittable"]) == 0
    assert jobs and all(j.flags["refittable"] for j in jobs)
    # engines built plain are rebuilt when --refittable is asked for, and kept otherwise
    build_engines(bundle, bundle.root / "engines", ProfileRequest())
    jobs.clear()
    assert build_cli.main([str(bundle.root)]) == 0 and not jobs
    assert build_cli.main([str(bundle.root), "--refittable"]) == 0
    assert {j.reason for j in jobs} == {"profiles or flags changed"}
    # --rebuild-stale keeps each engine's own flags
    build_engines(bundle, bundle.root / "engines", ProfileRequest(), flags=REFITTABLE)
    entries = read_manifest(bundle.root / "engines")
    assert all(e.flags == REFITTABLE for e in entries.values())
    jobs_stale, current = plan_jobs(bundle, None, {}, env, entries, bundle.root / "engines", True, force=True)
    assert jobs_stale and all(j.flags == REFITTABLE for j in jobs_stale)


def test_build_plan_sets_the_refit_builder_flag(bundle, refit_trt, monkeypatch):
    """build_plan against a recording fake Builder: REFIT only for refittable jobs."""
    trt = sys.modules["tensorrt"]
    flags_set: list[Any] = []
    spec = bundle.models["clip"].spec

    class Network:
        num_inputs = len(spec.inputs)

        def get_input(self, i: int) -> Any:
            return types.SimpleNamespace(name=spec.inputs[i].name)

    class Config:
        def create_timing_cache(self, data: bytes) -> object:
            return object()

        def set_timing_cache(self, cache: object, ignore: bool) -> bool:
            return True

        def set_flag(self, flag: Any) -> None:
            flags_set.append(flag)

        def add_optimization_profile(self, profile: Any) -> None:
            pass

        def get_timing_cache(self) -> Any:
            return types.SimpleNamespace(serialize=lambda: b"cache")

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> Network:
            return Network()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Any:
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network: Any, config: Any) -> bytes:
            return b"plan"

    monkeypatch.setattr(trt, "Builder", Builder, raising=False)
    parser = types.SimpleNamespace(parse_from_file=lambda path: True)
    monkeypatch.setattr(trt, "OnnxParser", lambda network, logger: parser, raising=False)
    monkeypatch.setattr(
        trt, "NetworkDefinitionCreationFlag", types.SimpleNamespace(STRONGLY_TYPED=0), raising=False
    )
    monkeypatch.setattr(trt, "BuilderFlag", types.SimpleNamespace(REFIT="REFIT"), raising=False)
    monkeypatch.setattr(trt, "Dims", list, raising=False)
    monkeypatch.delattr(trt, "IProgressMonitor", raising=False)
    env = trt_backend.probe_environment()
    for flags, expected in ((FLAGS, []), (REFITTABLE, ["REFIT"])):
        (job,) = [
            j
            for j in plan_jobs(
                bundle, ProfileRequest(), {}, env, {}, Path("/nonexistent"), False, flags=flags
            )[0]
            if j.model == "clip"
        ]
        flags_set.clear()
        build_plan(job, bundle, b"")
        assert flags_set == expected
