"""I/O contracts of the bundle models, declared once.

ONNX export, TensorRT profiles and backend input checks all read these, so a name or dtype
can only change in one place. Symbolic dims are strings; `TOKENS` is 77·k for long prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTEXT_LENGTH = 77
LATENT_CHANNELS = 4
VAE_SCALE_FACTOR = 8
# An inpainting UNet (SD 1.5 inpainting) reads the latents, the mask and the masked image's latents.
MASK_CHANNELS = 1
INPAINT_CHANNELS = LATENT_CHANNELS + MASK_CHANNELS + LATENT_CHANNELS


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx-style dynamic axes: every symbolic dim of every tensor."""
        axes: dict[str, dict[int, str]] = {}
        for t in (*self.inputs, *self.outputs):
            named = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if named:
                axes[t.name] = named
        return axes


def clip_spec(hidden: int, projection: int | None) -> ModelSpec:
    outputs = [
        TensorSpec("last_hidden_state", "float32", ("batch", "tokens", hidden)),
        TensorSpec("pooled", "float32", ("batch", hidden)),
    ]
    if projection is not None:
        outputs.append(TensorSpec("text_embeds", "float32", ("batch", projection)))
    return ModelSpec("clip", (TensorSpec("input_ids", "int32", ("batch", "tokens")),), tuple(outputs))


def deprojector_spec(hidden: int) -> ModelSpec:
    return ModelSpec(
        "deprojector",
        (TensorSpec("pooled", "float32", ("batch", hidden)),),
        (TensorSpec("hidden_states", "float32", ("batch", CONTEXT_LENGTH, hidden)),),
    )


def unet_spec(hidden: int, in_channels: int = LATENT_CHANNELS) -> ModelSpec:
    """`in_channels`: 4, or INPAINT_CHANNELS for an inpainting UNet (same output)."""
    return ModelSpec(
        "unet",
        (
            TensorSpec("sample", "float32", ("batch", in_channels, "height", "width")),
            TensorSpec("timestep", "float32", (1,)),
            TensorSpec("encoder_hidden_states", "float32", ("batch", "tokens", hidden)),
        ),
        (TensorSpec("noise_pred", "float32", ("batch", LATENT_CHANNELS, "height", "width")),),
    )


DEEPCACHE_FULL = "unet_deepcache_full"
DEEPCACHE_SHALLOW = "unet_deepcache_shallow"
DEEP_FEATURE = "deep_feature"


def _deep_feature(channels: int) -> TensorSpec:
    return TensorSpec(DEEP_FEATURE, "float32", ("batch", channels, "height", "width"))


def deepcache_full_spec(hidden: int, channels: int, in_channels: int = LATENT_CHANNELS) -> ModelSpec:
    """The UNet that also returns the feature step caching reuses (export/deepcache.py): the
    hidden state entering the cached skip branch of the last up block, at latent resolution."""
    unet = unet_spec(hidden, in_channels)
    return ModelSpec(DEEPCACHE_FULL, unet.inputs, (*unet.outputs, _deep_feature(channels)))


def deepcache_shallow_spec(hidden: int, channels: int, in_channels: int = LATENT_CHANNELS) -> ModelSpec:
    """The shallow part of the UNet only, taking the deep feature of the last full step."""
    unet = unet_spec(hidden, in_channels)
    return ModelSpec(DEEPCACHE_SHALLOW, (*unet.inputs, _deep_feature(channels)), unet.outputs)


def vae_decoder_spec() -> ModelSpec:
    return ModelSpec(
        "vae_decoder",
        (TensorSpec("latent", "float32", ("batch", LATENT_CHANNELS, "height", "width")),),
        (TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
    )


def vae_encoder_spec() -> ModelSpec:
    """image in [0, 1] -> the latent distribution's mean and std, both already multiplied by the
    VAE's scaling factor: the runtime draws latent = mean + std · noise itself, as diffusers'
    `latent_dist.sample(generator)` does, so the randomness stays the caller's."""
    latent = ("batch", LATENT_CHANNELS, "height", "width")
    return ModelSpec(
        "vae_encoder",
        (TensorSpec("image", "float32", ("batch", 3, "image_height", "image_width")),),
        (TensorSpec("latent_mean", "float32", latent), TensorSpec("latent_std", "float32", latent)),
    )


CLIP_VISION = "clip_vision"


def clip_vision_spec(image_size: int, projection: int) -> ModelSpec:
    """CLIP's image tower with its `visual_projection`: preprocessed pixels (CLIP mean/std, square,
    `image_size`) -> image_embeds, comparable with the text tower's `text_embeds` (CLIP score)."""
    return ModelSpec(
        CLIP_VISION,
        (TensorSpec("pixel_values", "float32", ("batch", 3, image_size, image_size)),),
        (TensorSpec("image_embeds", "float32", ("batch", projection)),),
    )


CLIP_GUIDANCE = "clip_guidance"


def clip_guidance_spec(image_size: int, projection: int) -> ModelSpec:
    """The gradient of CLIP guidance (export/clip_guidance.py): d cos(f(latent), text_embeds) /
    d latent, f = VAE decoder -> resize_rows · image · resize_colsᵀ (CLIP's resize and centre crop
    as one linear map, runtime/clip_guidance.py) -> CLIP mean/std -> `clip_vision`."""
    latent = ("batch", LATENT_CHANNELS, "height", "width")
    return ModelSpec(
        CLIP_GUIDANCE,
        (
            TensorSpec("latent", "float32", latent),
            TensorSpec("text_embeds", "float32", ("batch", projection)),
            TensorSpec("resize_rows", "float32", (image_size, "image_height")),
            TensorSpec("resize_cols", "float32", (image_size, "image_width")),
        ),
        (TensorSpec("grad", "float32", latent),),
    )
