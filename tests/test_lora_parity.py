"""LoRA at run time against diffusers on the tiny bundle: one and two LoRAs, in the kohya and the
diffusers/PEFT file layouts, UNet (attention, feed-forward, 1x1 and 3x3 conv) and text encoder.

The reference reads each file with diffusers' own loader (`StableDiffusionPipeline.lora_state_dict`:
its kohya -> diffusers key conversion, its alphas; the PEFT layout's alpha from its metadata) and
fuses W += scale · (alpha / r) · up @ down into copies of the tiny preset's torch modules, which is
what `load_lora_weights` + `set_adapters` + `fuse_lora` compute. (`load_lora_weights` itself needs
the `peft` package, which this environment lacks; with it installed, `test_fuse_lora_agrees`
checks that the hand-fused reference equals diffusers' fused one.)
Tolerance as for the other end-to-end parity tests: max pixel difference <= 2/255.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from safetensors.numpy import save_file

from export.models import SDComponents, build_preset
from export.reference import ReferencePipeline
from runtime.backends import BackendConfig
from runtime.errors import RequestError
from runtime.lora import LoraRef
from runtime.options import GenerateOptions
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.integration  # the PyTorch reference

SIZE, STEPS, SEED = 64, 4, 5
MAX_PIXEL_DIFF = 2  # out of 255
MIN_EFFECT = 20  # a LoRA must move some pixel at least this far, or the comparison proves little
PROMPT = "a photo of a cat"
UNET_LEAVES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
)
TEXT_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _modules(components: SDComponents) -> dict[str, dict[str, torch.nn.Module]]:
    """component -> {module path as LoRA files name it: Linear / Conv2d} the test LoRAs touch.

    transformers 5 dropped CLIPTextModel's `text_model` level, which LoRA files keep."""
    picked: dict[str, dict[str, torch.nn.Module]] = {"unet": {}, "text_encoder": {}}
    for component, model, leaves in (
        ("unet", components.unet, UNET_LEAVES),
        ("text_encoder", components.text_encoder, TEXT_LEAVES),
    ):
        for name, module in model.named_modules():
            if name.endswith(leaves) and isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                picked[component][_file_name(component, name)] = module
    return picked


def _file_name(component: str, name: str) -> str:
    return (
        f"text_model.{name}" if component == "text_encoder" and not name.startswith("text_model.") else name
    )


def _factors(module: torch.nn.Module, rank: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random (down, up) whose update is about the weight's own size: a LoRA that shows."""
    weight = module.weight.detach().numpy()
    fan_in = int(np.prod(weight.shape[1:]))
    down = rng.standard_normal((rank, *weight.shape[1:])) / np.sqrt(fan_in)
    up_shape = (weight.shape[0], rank, 1, 1) if weight.ndim == 4 else (weight.shape[0], rank)
    up = rng.standard_normal(up_shape) * float(weight.std()) * 2.0
    return down.astype(np.float32), up.astype(np.float32)


def write_kohya(path: Path, components: SDComponents, seed: int, rank: int = 4, alpha: float = 2.0) -> Path:
    """kohya/A1111 layout, UNet and text encoder, 3x3 conv LoRAs (LoCon) on the resnets' conv1."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for component, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_")):
        for name, module in _modules(components)[component].items():
            key = prefix + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = _factors(module, rank, rng)
            tensors[f"{key}.alpha"] = np.array(alpha, np.float32)
    save_file(tensors, str(path))
    return path


def write_peft(path: Path, components: SDComponents, seed: int, rank: int = 2, alpha: float = 3.0) -> Path:
    """The diffusers/PEFT layout as users get it: a PEFT adapter on a copy of the UNet's Linear
    layers (factors set like the kohya file's), saved by diffusers' `save_lora_weights` with the
    adapter's config as `lora_adapter_metadata`."""
    from peft import LoraConfig, get_peft_model_state_dict

    rng = np.random.default_rng(seed)
    unet = copy.deepcopy(components.unet)
    linear = [n for n, m in _modules(components)["unet"].items() if isinstance(m, torch.nn.Linear)]
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=linear)
    unet.add_adapter(config)
    named = dict(unet.named_modules())
    with torch.no_grad():
        for name in linear:
            down, up = _factors(named[name].base_layer, rank, rng)
            named[name].lora_A["default"].weight.copy_(torch.from_numpy(down))
            named[name].lora_B["default"].weight.copy_(torch.from_numpy(up))
    StableDiffusionPipeline.save_lora_weights(
        path.parent, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=path.name,
        unet_lora_adapter_metadata=config.to_dict(),
    )  # fmt: skip
    return path


def _diffusers_updates(path: Path) -> dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """component -> {module path: (down, up, alpha / r)} as diffusers reads the file: its kohya key
    conversion (UNet: on to PEFT names; text encoder: diffusers' `…self_attn.to_q_lora.down.weight`),
    its network alphas (kohya) or the file's lora_adapter_metadata (PEFT layout), else alpha = rank.
    The test files use one alpha per component, so no per-module alpha lookup is needed."""
    state, alphas, metadata = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    updates: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {"unet": {}, "text_encoder": {}}
    for component in updates:
        own = {k.removeprefix(f"{component}."): v for k, v in state.items() if k.startswith(f"{component}.")}
        if component == "unet":
            own = convert_unet_state_dict_to_peft(own)
        component_alphas = {float(v) for k, v in (alphas or {}).items() if k.startswith(f"{component}.")}
        assert len(component_alphas) <= 1, "the test files use one alpha per component"
        network_alpha = component_alphas.pop() if component_alphas else None
        meta_alpha = (metadata or {}).get(f"{component}.lora_alpha")
        for key, down in own.items():
            if ".lora_A." in key:
                module, up = key.split(".lora_A.")[0], own[key.replace(".lora_A.", ".lora_B.")]
            elif ".down." in key:  # text encoder, diffusers' own naming
                module, up = _te_module(key), own[key.replace(".down.", ".up.")]
            else:
                continue
            rank = down.shape[0]
            alpha = network_alpha if network_alpha is not None else float(meta_alpha or rank)
            updates[component][module] = (down, up, alpha / rank)
    return updates


def _te_module(key: str) -> str:
    """text_model.encoder.layers.0.self_attn.to_q_lora.down.weight -> ….self_attn.q_proj;
    ….mlp.fc1.lora.down.weight -> ….mlp.fc1."""
    stem = key.split(".down.")[0]
    renames = {"to_q_lora": "q_proj", "to_k_lora": "k_proj", "to_v_lora": "v_proj", "to_out_lora": "out_proj"}
    parent, leaf = stem.rsplit(".", 1)
    return f"{parent}.{renames[leaf]}" if leaf in renames else parent


def fused_reference(components: SDComponents, loras: list[tuple[Path, float]]) -> ReferencePipeline:
    """A reference pipeline on copies of the modules with every LoRA fused in (fuse_lora's sum)."""
    fused = copy.copy(components)
    fused.unet, fused.text_encoder = copy.deepcopy(components.unet), copy.deepcopy(components.text_encoder)
    models = {"unet": fused.unet, "text_encoder": fused.text_encoder}
    with torch.no_grad():
        for path, scale in loras:
            for component, updates in _diffusers_updates(path).items():
                named = {_file_name(component, n): m for n, m in models[component].named_modules()}
                for module_name, (down, up, factor) in updates.items():
                    weight = named[module_name].weight
                    delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
                    weight += (scale * factor * delta).reshape(weight.shape)
    return ReferencePipeline(fused)


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> SDComponents:
    return build_preset("tiny", cache_dir=tmp_path_factory.mktemp("cache"), with_vision=False)


@pytest.fixture(scope="module")
def lora_files(components, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        "kohya": write_kohya(folder / "style_kohya.safetensors", components, seed=1),
        "peft": write_peft(folder / "style_peft.safetensors", components, seed=2),
    }


@pytest.fixture(scope="module", params=["onnxruntime", "openvino"])
def pipeline(request, tiny_bundle):
    if request.param == "openvino":
        pytest.importorskip("openvino")
    p = Pipeline(tiny_bundle, BackendConfig(request.param))
    yield p
    p.close()


def _ours(pipeline: Pipeline, loras: tuple[LoraRef, ...] = ()) -> np.ndarray:
    options = GenerateOptions(prompts=(PROMPT,), steps=STEPS, seed=SEED, height=SIZE, width=SIZE,
                              scheduler="ddim", loras=loras)  # fmt: skip
    return pipeline.generate(options).images


def _theirs(reference: ReferencePipeline) -> np.ndarray:
    images = reference.generate(PROMPT, steps=STEPS, seed=SEED, height=SIZE, width=SIZE, scheduler="ddim",
                                latents=torch.from_numpy(_latents()))  # fmt: skip
    return (images * 255).round().astype(np.uint8)


def _latents() -> np.ndarray:
    """The runtime's start noise for SEED (its first draw), handed to diffusers as `latents`."""
    return np.random.default_rng(SEED).standard_normal((4, SIZE // 8, SIZE // 8), dtype=np.float32)[None]


@pytest.mark.parametrize(
    "chosen",
    [[("kohya", 1.0)], [("peft", 0.8)], [("kohya", 0.7), ("peft", -0.6)]],
    ids=["kohya", "peft", "kohya+peft"],
)
def test_loras_match_diffusers(pipeline, components, lora_files, chosen) -> None:
    loras = [(lora_files[layout], scale) for layout, scale in chosen]
    ours = _ours(pipeline, tuple(LoraRef(path, scale) for path, scale in loras))
    theirs = _theirs(fused_reference(components, loras))
    plain = _ours(pipeline)
    assert ours.shape == theirs.shape == (1, SIZE, SIZE, 3)
    effect = np.abs(ours.astype(int) - plain).max()
    assert effect >= MIN_EFFECT, f"the LoRA moved pixels by {effect}/255 only: the comparison proves little"
    diff = np.abs(ours.astype(int) - theirs).max()
    print(f"LoRA effect {effect}/255, max pixel difference to diffusers {diff}/255")
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255 against diffusers"


def test_text_encoder_lora_alone_matches_diffusers(pipeline, components, tmp_path) -> None:
    """Only the text encoder's factors (the kohya file minus its UNet keys): CLIP's weights move."""
    full = write_kohya(tmp_path / "all.safetensors", components, seed=3)
    from safetensors.numpy import load_file

    text_only = {k: v for k, v in load_file(str(full)).items() if k.startswith("lora_te_")}
    path = tmp_path / "te.safetensors"
    save_file(text_only, str(path))
    ours = _ours(pipeline, (LoraRef(path, 1.0),))
    assert np.abs(ours.astype(int) - _ours(pipeline)).max() >= MIN_EFFECT
    diff = np.abs(ours.astype(int) - _theirs(fused_reference(components, [(path, 1.0)]))).max()
    assert diff <= MAX_PIXEL_DIFF, f"max pixel difference {diff}/255 against diffusers"


def test_unload_restores_the_exact_image(tiny_bundle, lora_files) -> None:
    """Never touched, then with a LoRA, then without: the first and last images are equal bit for bit."""
    for backend in ("onnxruntime", "openvino"):
        if backend == "openvino":
            pytest.importorskip("openvino")
        with_lora = (LoraRef(lora_files["kohya"], 1.0),)
        fresh = Pipeline(tiny_bundle, BackendConfig(backend))
        try:
            untouched = _ours(fresh)
            changed = _ours(fresh, with_lora)
            again = _ours(fresh, with_lora)
            after = _ours(fresh)
        finally:
            fresh.close()
        np.testing.assert_array_equal(changed, again)
        assert np.abs(changed.astype(int) - untouched).max() >= MIN_EFFECT
        np.testing.assert_array_equal(after, untouched)


def test_bad_files_are_refused_before_any_model_runs(pipeline, tmp_path, components) -> None:
    sdxl = tmp_path / "sdxl.safetensors"
    key = "lora_unet_input_blocks_4_1_proj_in"
    save_file({f"{key}.lora_down.weight": np.ones((2, 8), np.float32),
               f"{key}.lora_up.weight": np.ones((8, 2), np.float32)}, str(sdxl))  # fmt: skip
    with pytest.raises(RequestError, match=r"sdxl.safetensors: key lora_unet_input_blocks_4_1_proj_in"):
        _ours(pipeline, (LoraRef(sdxl),))
    name, module = next(iter(_modules(components)["unet"].items()))
    wrong = tmp_path / "wrong.safetensors"
    key = "lora_unet_" + name.replace(".", "_")
    out_features = module.weight.shape[0]
    save_file({f"{key}.lora_down.weight": np.ones((2, 3), np.float32),
               f"{key}.lora_up.weight": np.ones((out_features, 2), np.float32)}, str(wrong))  # fmt: skip
    with pytest.raises(RequestError, match=rf"wrong.safetensors: key {key}.lora_down.weight: its update is"):
        _ours(pipeline, (LoraRef(wrong),))
    assert _ours(pipeline).std() > 5  # a refused request leaves the pipeline as it was


def test_fuse_lora_agrees(components, lora_files) -> None:
    """The hand-fused reference against diffusers' own load_lora_weights + set_adapters + fuse_lora."""
    pytest.importorskip("peft")
    loras = [(lora_files["kohya"], 0.7), (lora_files["peft"], -0.6)]
    ours = fused_reference(components, loras)
    pipe = StableDiffusionPipeline(
        vae=components.vae, text_encoder=copy.deepcopy(components.text_encoder),
        tokenizer=components.tokenizer(), unet=copy.deepcopy(components.unet), scheduler=None,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    names = []
    for i, (path, _) in enumerate(loras):
        pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
        names.append(f"l{i}")
    pipe.set_adapters(names, [scale for _, scale in loras])
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()
    for mine, theirs in (
        (ours.components.unet, pipe.unet),
        (ours.components.text_encoder, pipe.text_encoder),
    ):
        mine_state, their_state = mine.state_dict(), theirs.state_dict()
        for key, value in mine_state.items():
            torch.testing.assert_close(their_state[key], value, rtol=1e-5, atol=1e-6)


FP16_MAX_PIXEL_DIFF = 3  # fp16 files with a LoRA vs fp32 files with it (without LoRA they differ by ~1/255)


def test_fp16_files_take_the_lora_in_fp16(tiny_bundle, lora_files) -> None:
    """ONNX Runtime on the fp16 files: the merged weights are cast to each initializer's dtype (the
    fp16 graphs keep a few fp32), and the image follows the fp32 one; unloading is exact there too."""
    with_lora = (LoraRef(lora_files["kohya"], 1.0),)
    images = {}
    for precision in ("fp32", "fp16"):
        pipeline = Pipeline(tiny_bundle, BackendConfig("onnxruntime", precision=precision))
        try:
            images[precision] = [_ours(pipeline), _ours(pipeline, with_lora), _ours(pipeline)]
        finally:
            pipeline.close()
    np.testing.assert_array_equal(images["fp16"][2], images["fp16"][0])
    assert np.abs(images["fp32"][1].astype(int) - images["fp32"][0]).max() >= MIN_EFFECT
    diff = np.abs(images["fp16"][1].astype(int) - images["fp32"][1]).max()
    assert diff <= FP16_MAX_PIXEL_DIFF, f"fp16 with LoRA differs from fp32 with LoRA by {diff}/255"
