"""img2img and inpainting without torch (the fake bundle): reading images, fitting them, validating
requests, the CLI flags, and hostile input. Parity with diffusers is test_img2img_parity.py's job."""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.bundle import Bundle
from runtime.errors import RequestError
from runtime.generate import main
from runtime.init_image import MAX_PIXELS, fit, prepare_mask, read_image, read_image_file
from runtime.options import GenerateOptions, validate
from runtime.pipeline import Pipeline
from runtime.start_latents import begin_index
from tests.fake_bundle import write_fake_bundle

SIZE = 64  # the fake bundle's default image side


def _png(image: Image.Image, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save)
    return buffer.getvalue()


def _image(seed: int = 0, size: tuple[int, int] = (SIZE, SIZE)) -> np.ndarray:
    return (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)


def _mask(size: int = SIZE) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return mask


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with almost no data: refused from the header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def inpaint_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_bundle(tmp_path_factory.mktemp("inpaint") / "bundle", inpaint=True)


@pytest.fixture(scope="module")
def encoderless_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_bundle(tmp_path_factory.mktemp("old") / "bundle", encoder=False)


# --- reading --------------------------------------------------------------------------------


def test_reads_rgb_and_grayscale() -> None:
    rgb = _image()
    assert np.array_equal(read_image(_png(Image.fromarray(rgb)), "init_image"), rgb)
    gray = Image.fromarray(_mask())
    assert read_image(_png(gray), "init_image").shape == (SIZE, SIZE, 3)
    assert np.array_equal(read_image(_png(gray), "mask", mask=True), _mask())
    assert np.array_equal(
        read_image(_png(Image.fromarray(rgb)), "mask", mask=True),
        np.asarray(Image.fromarray(rgb).convert("L")),
    )


REFUSED = [
    (lambda: Image.new("CMYK", (8, 8)), "JPEG", "CMYK: convert it to RGB first"),
    (lambda: Image.new("P", (8, 8)), "PNG", "palette: convert it to RGB first"),
    (lambda: Image.new("RGBA", (8, 8)), "PNG", "RGB with alpha: flatten it"),
    (lambda: Image.new("LA", (8, 8)), "PNG", "grayscale with alpha"),
    (lambda: Image.new("I;16", (8, 8)), "PNG", "16-bit: convert it to 8 bits"),
]


@pytest.mark.parametrize(("make", "fmt", "message"), REFUSED, ids=["cmyk", "palette", "rgba", "la", "16bit"])
@pytest.mark.parametrize("mask", [False, True])
def test_refused_modes_name_the_field_and_the_fix(make, fmt, message, mask) -> None:
    buffer = io.BytesIO()
    make().save(buffer, format=fmt)
    field = "mask" if mask else "init_image"
    with pytest.raises(RequestError, match=f"^{field}: {message}"):
        read_image(buffer.getvalue(), field, mask=mask)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not an image Pillow can read"),
        (b"GIF89a garbage", "not an image Pillow can read"),
        (_png(Image.fromarray(_image()))[:200], "corrupt or truncated image data"),
        (_bomb_png(5000, 4000), f"5000x4000 is 20000000 pixels, over the limit of {MAX_PIXELS}"),
        (
            _bomb_png(20000, 20000),
            f"the image is over the limit of {MAX_PIXELS} pixels",
        ),  # Pillow's own check
    ],
    ids=["empty", "garbage", "truncated", "large", "bomb"],
)
def test_bad_bytes_are_request_errors(data: bytes, message: str) -> None:
    with pytest.raises(RequestError, match=f"^init_image: {message}"):
        read_image(data, "init_image")


def test_48_bit_rgb_is_refused_as_16_bit() -> None:
    """Pillow would quietly read a 16-bit-per-channel RGB PNG as 8-bit RGB."""
    width = height = 4
    rows = b"".join(b"\x00" + b"\x12\x34" * 3 * width for _ in range(height))
    png = _bomb_png(width, height).replace(b"\x08\x02", b"\x10\x02", 1)  # IHDR: bit depth 16
    png = png[:8] + _chunk(b"IHDR", png[16:29]) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    with pytest.raises(RequestError, match="^init_image: 16-bit: convert it to 8 bits"):
        read_image(png, "init_image")


def test_file_paths(tmp_path: Path) -> None:
    with pytest.raises(RequestError, match="is a directory"):
        read_image_file(tmp_path, "--init-image")
    with pytest.raises(RequestError, match="does not exist"):
        read_image_file(tmp_path / "missing.png", "--init-image")
    path = tmp_path / "ok.png"
    path.write_bytes(_png(Image.fromarray(_image())))
    assert read_image_file(path, "--init-image").shape == (SIZE, SIZE, 3)


# --- fitting --------------------------------------------------------------------------------


def test_resize_modes_keep_what_they_promise() -> None:
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, :32] = 255  # left half white
    stretched = fit(wide, 64, 64, "just_resize")
    cropped = fit(wide, 64, 64, "crop_and_resize")
    filled = fit(wide, 64, 64, "resize_and_fill")
    assert stretched.shape == cropped.shape == filled.shape == (64, 64, 3)
    assert stretched[:, :28].min() >= 250 and stretched[:, 36:].max() <= 5  # aspect lost, halves kept
    assert cropped[:, :8].min() >= 250 and cropped[:, 56:].max() <= 5  # scaled x2 and centre-cut
    assert (filled[:16, 8] == filled[16, 8]).all()  # top border: copies of the first row
    assert (filled[48:, 60] == filled[47, 60]).all()  # bottom border: copies of the last row
    assert fit(wide, 64, 32, "crop_and_resize") is wide  # already the size: untouched


def test_mask_is_blurred_then_binarized() -> None:
    mask = _mask()
    sharp, blurred = (
        prepare_mask(mask, SIZE, SIZE, "just_resize", 0),
        prepare_mask(mask, SIZE, SIZE, "just_resize", 8),
    )
    assert set(np.unique(sharp)) == set(np.unique(blurred)) == {0.0, 1.0}
    assert np.array_equal(sharp, (mask >= 128).astype(np.float32))
    assert not np.array_equal(sharp, blurred)  # corners rounded off


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"strength": 0.0}, "strength must be a number with 0 < strength <= 1; got 0.0"),
        ({"strength": 1.5}, "strength must be a number with 0 < strength <= 1; got 1.5"),
        ({"strength": float("nan")}, "strength must be a number with 0 < strength <= 1; got nan"),
        ({"strength": 0.1, "steps": 5}, "strength x steps must give at least one step: 0.1 x 5 runs none"),
        ({"mask": _mask(32)}, "mask must have the init_image's size 64x64; got 32x32"),
        ({"mask": np.zeros((SIZE, SIZE), np.uint8)}, "mask is all black"),
        ({"mask": np.full((SIZE, SIZE), 255, np.uint8)}, "mask is all white"),
        ({"mask": _mask(), "mask_mode": "unet"}, "mask_mode 'unet' needs an inpainting UNet"),
        ({"mask_mode": "blend"}, "mask_mode and mask_blur need a mask"),
        ({"mask": _mask(), "mask_blur": 65}, "mask_blur must be an integer from 0 to 64"),
        ({"resize_mode": "zoom"}, "resize_mode must be one of just_resize, crop_and_resize, resize_and_fill"),
        (
            {"init_image": _image()[..., 0]},
            r"init_image must be a uint8 array of shape \(H, W, 3\); got uint8 \(64, 64\)",
        ),
        ({"init_image": _image(size=(20, 20))}, "taken from init_image's 20x20: give a size"),
    ],
)
def test_bad_requests_name_the_field(fake_bundle: Path, fields: dict, message: str) -> None:
    values = {"prompts": ("a cat",), "steps": 10, "init_image": _image(), **fields}
    with pytest.raises(RequestError, match=message):
        validate(GenerateOptions(**values), Bundle.open(fake_bundle))


def test_image_fields_need_an_init_image(fake_bundle: Path) -> None:
    for fields in ({"mask": _mask()}, {"strength": 0.5}):
        with pytest.raises(RequestError, match="needs an init_image"):
            validate(GenerateOptions(prompts=("a cat",), **fields), Bundle.open(fake_bundle))


def test_old_bundle_without_encoder_says_how_to_fix(encoderless_bundle: Path) -> None:
    with pytest.raises(RequestError, match="needs a bundle with the VAE encoder.*re-export"):
        validate(GenerateOptions(prompts=("a cat",), init_image=_image()), Bundle.open(encoderless_bundle))


def test_inpainting_unet_needs_image_and_mask(inpaint_bundle: Path) -> None:
    bundle = Bundle.open(inpaint_bundle)
    with pytest.raises(RequestError, match="has an inpainting UNet: give an init_image and a mask"):
        validate(GenerateOptions(prompts=("a cat",)), bundle)
    with pytest.raises(RequestError, match="give a mask with the init_image"):
        validate(GenerateOptions(prompts=("a cat",), init_image=_image()), bundle)
    resolved = validate(GenerateOptions(prompts=("a cat",), init_image=_image(), mask=_mask()), bundle)
    assert resolved.mask_mode == "unet" and resolved.strength == 0.75


def test_size_defaults_to_the_image_scaled_into_range(fake_bundle: Path) -> None:
    bundle = Bundle.open(fake_bundle)  # sides 32..128, multiple of 8
    o = validate(GenerateOptions(prompts=("a",), init_image=_image(size=(100, 60))), bundle)
    assert (o.width, o.height) == (96, 56) and o.init_image is not None and o.init_image.shape == (56, 96, 3)
    o = validate(GenerateOptions(prompts=("a",), init_image=_image(size=(400, 200))), bundle)
    assert (o.width, o.height) == (128, 64)  # scaled to fit 128 wide, aspect kept
    o = validate(
        GenerateOptions(prompts=("a",), init_image=_image(size=(400, 200)), width=64, height=64), bundle
    )
    assert o.init_image is not None and o.init_image.shape == (64, 64, 3)


# --- generation -----------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler_a", "dpmpp_2m"])
def test_strength_sets_the_steps_run(fake_bundle: Path, scheduler: str) -> None:
    pipeline = Pipeline(fake_bundle)
    calls: list[int] = []
    options = GenerateOptions(
        prompts=("a cat",), steps=10, scheduler=scheduler, init_image=_image(), strength=0.5
    )
    pipeline.generate(options, on_step=lambda i, t, x: calls.append(i))
    extra = 1 if scheduler == "pndm" else 0  # its PLMS warm-up repeats a timestep
    assert calls == list(range(begin_index(10, 0.5), 10 + extra)) and len(calls) == 5 + extra
    assert pipeline.denoising_steps(options) == len(calls)


def test_same_seed_same_image_and_the_image_matters(fake_bundle: Path) -> None:
    pipeline = Pipeline(fake_bundle)

    def run(seed: int, image: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
        options = GenerateOptions(
            prompts=("a cat",), steps=6, seed=seed, init_image=image, mask=mask, strength=0.6
        )
        return pipeline.generate(options).images

    a = run(3, _image(0))
    assert np.array_equal(a, run(3, _image(0)))
    assert not np.array_equal(a, run(4, _image(0)))
    assert not np.array_equal(a, run(3, _image(1)))
    assert not np.array_equal(a, run(3, _image(0), _mask()))


def test_inpainting_unet_runs(inpaint_bundle: Path) -> None:
    pipeline = Pipeline(inpaint_bundle)
    for strength in (0.5, 1.0):
        result = pipeline.generate(
            GenerateOptions(prompts=("a cat",), steps=4, init_image=_image(), mask=_mask(), strength=strength)
        )
        assert result.images.shape == (1, SIZE, SIZE, 3) and "encode" in result.timings


# --- CLI --------------------------------------------------------------------------------------


def test_cli_img2img_and_inpainting_write_their_settings(fake_bundle: Path, tmp_path: Path) -> None:
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    image.write_bytes(_png(Image.fromarray(_image())))
    mask.write_bytes(_png(Image.fromarray(_mask())))
    out = tmp_path / "out.png"
    assert main(["a cat", "--bundle", str(fake_bundle), "--steps", "4", "--init-image", str(image),
                 "--strength", "0.5", "--out", str(out)]) == 0  # fmt: skip
    text = Image.open(out).text["parameters"]
    assert "Denoising strength: 0.5, Resize mode: just_resize" in text and "Mask" not in text
    assert main(["a cat", "--bundle", str(fake_bundle), "--steps", "4", "--init-image", str(image),
                 "--mask", str(mask), "--mask-blur", "4", "--out", str(out)]) == 0  # fmt: skip
    assert (
        "Denoising strength: 0.75, Resize mode: just_resize, Mask blur: 4, Mask mode: blend"
        in Image.open(out).text["parameters"]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--init-image", "{dir}"], "--init-image: {dir} is a directory"),
        (["--init-image", "{dir}/missing.png"], "--init-image: {dir}/missing.png does not exist"),
        (["--init-image", "{dir}/bad.png"], "--init-image ({dir}/bad.png): corrupt or truncated image data"),
        (
            ["--init-image", "{dir}/in.png", "--mask", "{dir}/rgba.png"],
            "--mask ({dir}/rgba.png): RGB with alpha",
        ),
        (
            ["--init-image", "{dir}/in.png", "--strength", "0"],
            "strength must be a number with 0 < strength <= 1",
        ),
        (["--mask", "{dir}/in.png"], "mask needs an init_image"),
    ],
)
def test_cli_bad_images_exit_2_without_writing(
    fake_bundle: Path, tmp_path: Path, caplog, args, message
) -> None:
    (tmp_path / "in.png").write_bytes(_png(Image.fromarray(_image())))
    (tmp_path / "bad.png").write_bytes(_png(Image.fromarray(_image()))[:100])
    (tmp_path / "rgba.png").write_bytes(_png(Image.new("RGBA", (SIZE, SIZE))))
    out = tmp_path / "out" / "x.png"
    argv = ["a cat", "--bundle", str(fake_bundle), "--steps", "2", "--out", str(out)]
    with caplog.at_level(logging.ERROR, logger="sdrt"):
        assert main(argv + [a.format(dir=tmp_path) for a in args]) == 2
    assert message.format(dir=tmp_path) in caplog.text and "Traceback" not in caplog.text
    assert not out.exists()
