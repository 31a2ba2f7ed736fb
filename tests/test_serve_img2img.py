"""img2img and inpainting through the server, torch-free (the fake bundle, in-process TestClient).

/v1/generate takes the images as base64 files, KServe v2 as BYTES (raw or base64) or UINT8 pixel
tensors; every route gives the image `Pipeline.generate` makes from the same arrays, byte for byte.
Every bad image or image setting is a 422 naming the field (a malformed v2 tensor a 400), and the
next request still works; the default body limit leaves room for images, and a larger body is 413.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from runtime.backends.config import BackendConfig  # noqa: E402
from runtime.image import infotext, png_bytes  # noqa: E402
from runtime.init_image import MAX_PIXELS  # noqa: E402
from runtime.options import GenerateOptions  # noqa: E402
from runtime.pipeline import Pipeline, Result  # noqa: E402
from runtime.serving import Engine, Limits  # noqa: E402
from tests.fake_bundle import write_fake_bundle  # noqa: E402
from tests.serve_client import client_for, open_client, open_engine  # noqa: E402

LIMITS = Limits(max_steps=50, max_images=4, max_body_bytes=256_000, timeout_s=30)
WIDTH, HEIGHT = 80, 64  # the init image's size, which the output takes when the request names none
BASE: dict[str, Any] = {"prompt": "a cat in the garden", "steps": 4, "seed": 3}
VALID = {"prompt": "still alive", "steps": 1, "size": "64x64"}
HEADER = "Inference-Header-Content-Length"


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def photo(seed: int = 0, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return mask


INIT = photo()
MASK = box_mask()
INIT_PNG, MASK_PNG = encode(Image.fromarray(INIT)), encode(Image.fromarray(MASK))


def with_header_size(png: bytes, width: int, height: int) -> bytes:
    """`png` with its IHDR patched to claim width x height (CRC fixed): refused from the header."""
    assert png[12:16] == b"IHDR"
    ihdr = struct.pack(">II", width, height) + png[24:29]  # then depth, colour type, ... unchanged
    return png[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + png[33:]


def bit16_png() -> bytes:
    return encode(Image.fromarray(np.full((HEIGHT, WIDTH), 40000, np.uint16)))


@pytest.fixture(scope="module")
def engine(fake_bundle: Path) -> Iterator[Engine]:
    with open_engine(fake_bundle) as e:
        yield e


@pytest.fixture(scope="module")
def client(engine: Engine) -> TestClient:
    return client_for(engine, LIMITS)


@pytest.fixture(scope="module")
def pipeline(fake_bundle: Path) -> Iterator[Pipeline]:
    """The reference, separate from the server's engine."""
    p = Pipeline(fake_bundle, BackendConfig(threads=1))
    yield p
    p.close()


@pytest.fixture(scope="module")
def inpaint_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fake_bundle(tmp_path_factory.mktemp("inpaint") / "bundle", inpaint=True)


@pytest.fixture(scope="module")
def inpaint_client(inpaint_bundle: Path) -> Iterator[TestClient]:
    with open_client(inpaint_bundle, LIMITS) as c:
        yield c


def served(response: Any) -> tuple[np.ndarray, str, bytes]:
    """(pixels, infotext, PNG bytes) of the first image of a /v1 JSON response."""
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["images"][0])
    image = Image.open(io.BytesIO(png))
    return np.asarray(image), image.info["parameters"], png


def reference_png(result: Result, bundle: Path) -> bytes:
    """The PNG the server would send for `result`: its pixels and its infotext."""
    text = infotext(result, 0, "onnxruntime", "fp32", bundle.resolve().name)  # the fake bundle's fp32
    return png_bytes(result.images[0], text)


def generate(pipeline: Pipeline, **fields: Any) -> Result:
    """The reference: BASE's settings and `fields`, straight through the pipeline."""
    return pipeline.generate(GenerateOptions(prompts=(BASE["prompt"],), steps=4, seed=3, **fields))


def assert_next_request_works(client: TestClient) -> None:
    r = client.post("/v1/generate", json=VALID)
    assert r.status_code == 200, r.text


# --- what works ----------------------------------------------------------------------------------


def test_img2img_over_http(client: TestClient, pipeline: Pipeline, fake_bundle: Path) -> None:
    body = {**BASE, "init_image": b64(INIT_PNG), "strength": 0.6}
    pixels, text, png = served(client.post("/v1/generate", json=body))
    assert pixels.shape == (HEIGHT, WIDTH, 3)  # the init image's size, no size given
    assert "Denoising strength: 0.6" in text and "Resize mode: just_resize" in text
    assert "Mask" not in text
    params = client.post("/v1/generate", json=body).json()["parameters"]
    assert params["init_image"] is True and params["mask"] is False
    assert (params["strength"], params["resize_mode"]) == (0.6, "just_resize")
    assert params["mask_blur"] is None and params["mask_mode"] is None
    assert "iVBOR" not in json.dumps(params)  # the image is not echoed

    assert png == reference_png(generate(pipeline, init_image=INIT, strength=0.6), fake_bundle)
    # the image matters, and so does the strength
    another = b64(encode(Image.fromarray(photo(1))))
    other = served(client.post("/v1/generate", json={**body, "init_image": another}))
    assert not np.array_equal(other[0], pixels)
    stronger = served(client.post("/v1/generate", json={**body, "strength": 1.0}))
    assert not np.array_equal(stronger[0], pixels) and "Denoising strength: 1.0" in stronger[1]


def test_default_strength_data_url_jpeg_and_resize_mode(
    client: TestClient, pipeline: Pipeline, fake_bundle: Path
) -> None:
    jpeg = encode(Image.fromarray(INIT), "JPEG")
    body = {**BASE, "init_image": b64(jpeg), "size": "64x64", "resize_mode": "crop_and_resize"}
    pixels, text, png = served(client.post("/v1/generate", json=body))
    assert pixels.shape == (64, 64, 3)
    assert "Denoising strength: 0.75" in text and "Resize mode: crop_and_resize" in text
    as_url = {**body, "init_image": "data:image/jpeg;base64," + b64(jpeg)}
    assert served(client.post("/v1/generate", json=as_url))[2] == png
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    expected = generate(pipeline, width=64, height=64, init_image=decoded, resize_mode="crop_and_resize")
    assert png == reference_png(expected, fake_bundle)


def test_inpainting_over_http(client: TestClient, pipeline: Pipeline, fake_bundle: Path) -> None:
    body = {**BASE, "init_image": b64(INIT_PNG), "mask": b64(MASK_PNG), "mask_blur": 2}
    pixels, text, png = served(client.post("/v1/generate", json=body))
    assert "Mask blur: 2" in text and "Mask mode: blend" in text  # auto, on a standard UNet
    params = client.post("/v1/generate", json=body).json()["parameters"]
    assert params["mask"] is True and params["mask_mode"] == "blend" and params["mask_blur"] == 2
    assert png == reference_png(generate(pipeline, init_image=INIT, mask=MASK, mask_blur=2), fake_bundle)
    unmasked = served(client.post("/v1/generate", json={**BASE, "init_image": b64(INIT_PNG)}))
    assert not np.array_equal(unmasked[0], pixels)  # the mask was used


def test_inpainting_unet_over_http(inpaint_client: TestClient, inpaint_bundle: Path) -> None:
    body = {**BASE, "init_image": b64(INIT_PNG), "mask": b64(MASK_PNG)}
    _, text, png = served(inpaint_client.post("/v1/generate", json=body))
    assert "Mask mode: unet" in text
    reference = Pipeline(inpaint_bundle, BackendConfig(threads=1))
    try:
        expected = generate(reference, init_image=INIT, mask=MASK)
    finally:
        reference.close()
    assert png == reference_png(expected, inpaint_bundle)
    r = inpaint_client.post("/v1/generate", json={**BASE, "init_image": b64(INIT_PNG)})
    assert r.status_code == 422 and "inpainting UNet: give a mask" in r.json()["detail"]
    r = inpaint_client.post("/v1/generate", json={**BASE, "init_image": b64(INIT_PNG), "mask": b64(MASK_PNG),
                                                  "mask_mode": "blend"})  # fmt: skip
    assert served(r)[2] != png and "Mask mode: blend" in served(r)[1]


def tensor(name: str, value: np.ndarray, datatype: str, binary: bool = True) -> Any:
    tc = pytest.importorskip("tritonclient.http")
    t = tc.InferInput(name, list(value.shape), datatype)
    t.set_data_from_numpy(value, binary_data=binary)
    return t


def infer(client: TestClient, inputs: list[Any], url: str = "/v2/models/sdrt/infer") -> Any:
    """POST a request encoded by tritonclient itself; the raw httpx response."""
    tc = pytest.importorskip("tritonclient.http")
    outputs = [tc.InferRequestedOutput(name, binary_data=True) for name in ("image", "parameters")]
    body, json_size = tc.InferenceServerClient.generate_request_body(inputs, outputs=outputs)
    headers = {} if json_size is None else {HEADER: str(json_size)}
    return client.post(url, content=body, headers=headers)


def infer_ok(client: TestClient, inputs: list[Any]) -> tuple[np.ndarray, str]:
    tc = pytest.importorskip("tritonclient.http")
    r = infer(client, inputs)
    assert r.status_code == 200, r.text
    result = tc.InferenceServerClient.parse_response_body(r.content, header_length=int(r.headers[HEADER]))
    return result.as_numpy("image")[0], result.as_numpy("parameters")[0].decode()


def settings_v2() -> list[Any]:
    return [
        tensor("prompt", np.array([BASE["prompt"].encode()], dtype=object), "BYTES"),
        tensor("steps", np.array([4], np.int32), "INT32"),
        tensor("seed", np.array([3], np.int64), "INT64"),
        tensor("strength", np.array([0.6], np.float32), "FP32"),
        tensor("mask_blur", np.array([2], np.int32), "INT32"),
        tensor("mask_mode", np.array([b"blend"], dtype=object), "BYTES"),
        tensor("resize_mode", np.array([b"just_resize"], dtype=object), "BYTES"),
    ]


IMAGE_FORMS: dict[str, Callable[[], list[Any]]] = {
    "bytes binary": lambda: [tensor("init_image", np.array([INIT_PNG], dtype=object), "BYTES"),
                             tensor("mask", np.array([MASK_PNG], dtype=object), "BYTES")],
    "bytes json base64": lambda: [
        tensor("init_image", np.array([b64(INIT_PNG).encode()], dtype=object), "BYTES", binary=False),
        tensor("mask", np.array([b64(MASK_PNG).encode()], dtype=object), "BYTES", binary=False)],
    "uint8 binary": lambda: [tensor("init_image", INIT, "UINT8"), tensor("mask", MASK, "UINT8")],
    "uint8 json": lambda: [tensor("init_image", INIT, "UINT8", binary=False),
                           tensor("mask", MASK, "UINT8", binary=False)],
}  # fmt: skip


@pytest.mark.parametrize("form", list(IMAGE_FORMS))
def test_kserve_equals_v1_and_the_pipeline(
    client: TestClient, pipeline: Pipeline, fake_bundle: Path, form: str
) -> None:
    pytest.importorskip("tritonclient.http")
    image, text = infer_ok(client, settings_v2() + IMAGE_FORMS[form]())
    body = {**BASE, "init_image": b64(INIT_PNG), "mask": b64(MASK_PNG), "strength": 0.6, "mask_blur": 2,
            "mask_mode": "blend", "resize_mode": "just_resize"}  # fmt: skip
    v1_pixels, v1_text, v1_png = served(client.post("/v1/generate", json=body))
    expected = generate(pipeline, init_image=INIT, mask=MASK, strength=0.6, mask_blur=2, mask_mode="blend")
    assert image.dtype == np.uint8 and image.shape == (HEIGHT, WIDTH, 3)
    assert image.tobytes() == expected.images[0].tobytes() == v1_pixels.tobytes()
    assert text == v1_text and "Denoising strength: 0.6" in text and "Mask mode: blend" in text
    assert v1_png == reference_png(expected, fake_bundle) == png_bytes(image, text)


def test_kserve_metadata_lists_the_image_inputs(client: TestClient) -> None:
    inputs = {i["name"]: i["datatype"] for i in client.get("/v2/models/sdrt").json()["inputs"]}
    assert inputs["init_image"] == inputs["mask"] == "BYTES"
    assert inputs["strength"] == "FP32" and inputs["mask_blur"] == "INT32"
    assert inputs["mask_mode"] == inputs["resize_mode"] == "BYTES"


def test_openapi_documents_the_fields(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    fields = schema["GenerateRequest"]["properties"]
    assert fields["mask_mode"]["enum"] == ["auto", "unet", "blend"]
    assert fields["resize_mode"]["enum"] == ["just_resize", "crop_and_resize", "resize_and_fill"]
    assert "base64" in fields["init_image"]["description"] and "white" in fields["mask"]["description"]
    assert {"strength", "mask_blur", "mask_mode", "resize_mode", "mask"} <= set(
        schema["GenerationParameters"]["properties"]
    )


# --- what is refused -----------------------------------------------------------------------------


def _rgb(mode: str) -> Image.Image:
    return Image.fromarray(INIT).convert(mode)


IMG = b64(INIT_PNG)
STRENGTH = "strength must be a number with 0 < strength <= 1"
V1_BAD: list[tuple[str, dict[str, Any] | bytes, str]] = [
    ("invalid base64", {"init_image": "not base64!"}, "init_image: not valid base64"),
    ("bad padding", {"init_image": IMG[:-3]}, "init_image: not valid base64"),
    ("line breaks", {"init_image": "\n".join(IMG[i:i + 76] for i in range(0, len(IMG), 76))},
     "base64 -w0"),
    ("non-ASCII", {"init_image": "iVBOR\u00e9"}, "init_image: not valid base64"),
    ("empty", {"init_image": ""}, "init_image is empty"),
    ("not a string", {"init_image": [1, 2]}, "init_image: Input should be a valid string"),
    ("data URL of text", {"init_image": "data:text/plain;base64,aGk="}, "init_image: a data URL must look"),
    ("data URL not base64", {"init_image": "data:image/png," + IMG}, "init_image: a data URL must look"),
    ("corrupt bytes", {"init_image": b64(b"GIF89a not really")}, "init_image: not an image Pillow can read"),
    ("truncated PNG", {"init_image": b64(INIT_PNG[: len(INIT_PNG) // 2])},
     "init_image: corrupt or truncated image data"),
    ("CMYK JPEG", {"init_image": b64(encode(_rgb("CMYK"), "JPEG"))}, "init_image: CMYK"),
    ("palette PNG", {"init_image": b64(encode(_rgb("P")))}, "init_image: palette"),
    ("RGBA PNG", {"init_image": b64(encode(_rgb("RGBA")))}, "init_image: RGB with alpha"),
    ("16-bit PNG", {"init_image": b64(bit16_png())}, "init_image: 16-bit"),
    ("RGBA mask", {"init_image": IMG, "mask": b64(encode(Image.fromarray(MASK).convert("RGBA")))},
     "mask: RGB with alpha"),
    ("corrupt mask", {"init_image": IMG, "mask": b64(b"\x89PNG\r\n\x1a\nnope")}, "mask: not an image Pillow"),
    ("bomb 20000x20000", {"init_image": b64(with_header_size(INIT_PNG, 20000, 20000))},
     f"init_image: the image is over the limit of {MAX_PIXELS} pixels"),
    ("big 5000x4000", {"init_image": b64(with_header_size(INIT_PNG, 5000, 4000))},
     f"init_image: 5000x4000 is 20000000 pixels, over the limit of {MAX_PIXELS}"),
    ("mask bomb", {"init_image": IMG, "mask": b64(with_header_size(MASK_PNG, 20000, 20000))},
     f"mask: the image is over the limit of {MAX_PIXELS}"),
    ("mask of another size", {"init_image": IMG, "mask": b64(encode(Image.fromarray(box_mask(64, 64))))},
     f"mask must have the init_image's size {WIDTH}x{HEIGHT}; got 64x64"),
    ("all-black mask", {"init_image": IMG, "mask": b64(encode(Image.new("L", (WIDTH, HEIGHT), 0)))},
     "mask is all black"),
    ("all-white mask", {"init_image": IMG, "mask": b64(encode(Image.new("L", (WIDTH, HEIGHT), 255)))},
     "mask is all white"),
    ("strength 0", {"init_image": IMG, "strength": 0}, f"{STRENGTH}; got 0"),
    ("strength 1.5", {"init_image": IMG, "strength": 1.5}, f"{STRENGTH}; got 1.5"),
    ("strength NaN", b'"strength": NaN', f"{STRENGTH}; got nan"),
    ("strength a string", {"init_image": IMG, "strength": "0.5"}, "strength: Input should be a valid number"),
    ("strength too small for the steps", {"init_image": IMG, "strength": 0.1},
     "strength x steps must give at least one step"),
    ("mask without init_image", {"mask": b64(MASK_PNG)}, "mask needs an init_image"),
    ("strength without init_image", {"strength": 0.5}, "strength needs an init_image"),
    ("mask_mode unet on a standard UNet", {"init_image": IMG, "mask": b64(MASK_PNG), "mask_mode": "unet"},
     "mask_mode 'unet' needs an inpainting UNet"),
    ("mask_mode unknown", {"init_image": IMG, "mask": b64(MASK_PNG), "mask_mode": "paint"},
     "mask_mode must be one of auto, unet, blend"),
    ("resize_mode unknown", {"init_image": IMG, "resize_mode": "stretch"}, "resize_mode must be one of"),
    ("mask_blur 65", {"init_image": IMG, "mask": b64(MASK_PNG), "mask_blur": 65},
     "mask_blur must be an integer from 0 to 64"),
    ("mask_blur a float", {"init_image": IMG, "mask": b64(MASK_PNG), "mask_blur": 1.5},
     "mask_blur: Input should be a valid integer"),
    ("mask_blur without mask", {"init_image": IMG, "mask_blur": 4}, "mask_blur need a mask"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "message"), [c[1:] for c in V1_BAD], ids=[c[0] for c in V1_BAD])
def test_v1_bad_images_are_422_naming_the_field(client: TestClient, body: Any, message: str) -> None:
    start = time.monotonic()
    if isinstance(body, bytes):  # not JSON: NaN, which Python's parser reads
        raw = b'{"prompt": "a cat", "steps": 4, "init_image": "' + IMG.encode() + b'", ' + body + b"}"
        r = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/generate", json={**BASE, **body})
    assert r.status_code == 422, r.text
    assert message in r.json()["detail"]
    assert len(r.content) < 1000  # the image is never echoed back
    assert time.monotonic() - start < 2  # bombs are refused from the header, not decoded
    assert_next_request_works(client)


def test_base64_length_is_checked_before_decoding(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.serving import images

    def no_decoding(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("decoded an over-long base64 text")

    monkeypatch.setattr(images, "MAX_BASE64_CHARS", 1000)
    monkeypatch.setattr(base64, "b64decode", no_decoding)  # the module images.py calls
    r = client.post("/v1/generate", json={**BASE, "init_image": "A" * 2000})
    assert r.status_code == 422
    assert "init_image: 2000 characters of base64 is over the limit of 1000" in r.json()["detail"]
    r = client.post("/v1/generate", json={**BASE, "init_image": "data:image/png;base64," + "A" * 1100})
    assert r.status_code == 422 and "1100 characters of base64 is over the limit" in r.json()["detail"]


def v2_json(*tensors: dict[str, Any]) -> dict[str, Any]:
    prompt = {"name": "prompt", "datatype": "BYTES", "shape": [1], "data": ["a cat"]}
    steps = {"name": "steps", "datatype": "INT32", "shape": [1], "data": [4]}
    return {"inputs": [prompt, steps, *tensors]}


def t(name: str, datatype: str, data: list[Any], shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


def pixels(name: str, array: np.ndarray) -> dict[str, Any]:
    return t(name, "UINT8", array.reshape(-1).tolist(), list(array.shape))


INIT_B64 = t("init_image", "BYTES", [IMG])
V2_BAD: list[tuple[str, Any, int, str]] = [
    ("invalid base64 in JSON", v2_json(t("init_image", "BYTES", ["not base64!"])), 422,
     "init_image: not valid base64"),
    ("UINT8 of the wrong rank", v2_json(pixels("init_image", MASK)), 400,
     "input init_image as UINT8 must have shape [H, W, 3]; got [64, 80]"),
    ("mask UINT8 with channels", v2_json(INIT_B64, pixels("mask", INIT)), 400,
     "input mask as UINT8 must have shape [H, W]; got [64, 80, 3]"),
    ("UINT8 with 4 channels", v2_json(pixels("init_image", np.zeros((8, 8, 4), np.uint8))), 400,
     "input init_image as UINT8 must have shape [H, W, 3]"),
    ("UINT8 with an empty side", v2_json(t("init_image", "UINT8", [], [0, 8, 3])), 422,
     "init_image must be a uint8 array of shape (H, W, 3)"),
    ("UINT8 out of range", v2_json(t("init_image", "UINT8", [300] * 12, [2, 2, 3])), 400,
     "input init_image: data is not UINT8"),
    ("FP32 pixels", v2_json(t("init_image", "FP32", [0.5] * 12, [2, 2, 3])), 400,
     "input init_image must be BYTES (an image file) or UINT8 [H, W, 3]"),
    ("two image files", v2_json(t("init_image", "BYTES", [IMG, IMG])), 400,
     "input init_image as BYTES must be one image file"),
    ("strength 0", v2_json(INIT_B64, t("strength", "FP32", [0.0])), 422, f"{STRENGTH}; got 0.0"),
    ("strength 1.5", v2_json(INIT_B64, t("strength", "FP64", [1.5])), 422, f"{STRENGTH}; got 1.5"),
    ("strength as INT32", v2_json(INIT_B64, t("strength", "INT32", [1])), 400,
     "input strength must be FP16, FP32 or FP64"),
    ("mask without init_image", v2_json(pixels("mask", MASK)), 422, "mask needs an init_image"),
    ("mask of another size", v2_json(INIT_B64, pixels("mask", box_mask(64, 64))), 422,
     "mask must have the init_image's size 80x64; got 64x64"),
    ("all-black mask", v2_json(INIT_B64, pixels("mask", np.zeros_like(MASK))), 422, "mask is all black"),
    ("all-white mask", v2_json(INIT_B64, pixels("mask", np.full_like(MASK, 255))), 422, "mask is all white"),
    ("mask_mode unet", v2_json(INIT_B64, pixels("mask", MASK), t("mask_mode", "BYTES", ["unet"])), 422,
     "mask_mode 'unet' needs an inpainting UNet"),
    ("mask_blur 65", v2_json(INIT_B64, pixels("mask", MASK), t("mask_blur", "INT64", [65])), 422,
     "mask_blur must be an integer from 0 to 64"),
    ("resize_mode unknown", v2_json(INIT_B64, t("resize_mode", "BYTES", ["fill"])), 422,
     "resize_mode must be one of"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "status", "message"), [c[1:] for c in V2_BAD], ids=[c[0] for c in V2_BAD])
def test_v2_bad_images(client: TestClient, body: dict[str, Any], status: int, message: str) -> None:
    r = client.post("/v2/models/sdrt/infer", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert len(r.content) < 1000
    assert client.post("/v2/models/sdrt/infer", json=v2_json(INIT_B64)).status_code == 200


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (lambda: [tensor("strength", np.array([np.nan], np.float32), "FP32")], f"{STRENGTH}; got nan"),
        (lambda: [tensor("strength", np.array([np.inf], np.float32), "FP32")], f"{STRENGTH}; got inf"),
        (lambda: [tensor("init_image", np.array([INIT_PNG[:300]], dtype=object), "BYTES")],
         "init_image: corrupt or truncated image data"),
        (lambda: [tensor("init_image", np.array([encode(_rgb("CMYK"), "JPEG")], dtype=object), "BYTES")],
         "init_image: CMYK"),
        (lambda: [tensor("mask", np.array([with_header_size(MASK_PNG, 20000, 20000)], dtype=object),
                         "BYTES")],
         f"mask: the image is over the limit of {MAX_PIXELS} pixels"),
    ],
    ids=["FP32 NaN", "FP32 inf", "truncated PNG", "CMYK JPEG", "mask bomb"],
)  # fmt: skip
def test_v2_binary_bad_values_are_422(
    client: TestClient, inputs: Callable[[], list[Any]], message: str
) -> None:
    pytest.importorskip("tritonclient.http")
    base = settings_v2()[:3] + IMAGE_FORMS["bytes binary"]()
    names = {i.name() for i in inputs()}
    r = infer(client, [i for i in base if i.name() not in names] + inputs())
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    assert_next_request_works(client)


# --- body size -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_limits_client(engine: Engine) -> TestClient:
    """The server's default limits, body size included."""
    return client_for(engine)


def test_default_body_limit_takes_a_large_image_and_refuses_more(default_limits_client: TestClient) -> None:
    web = default_limits_client
    noise = encode(Image.fromarray(photo(5, 700, 700)))  # incompressible: ~1.5 MB, 2 MB as base64
    body = {**BASE, "init_image": b64(noise), "mask": b64(encode(Image.fromarray(box_mask(700, 700)))),
            "size": "64x64"}  # fmt: skip
    assert len(json.dumps(body)) > 1 << 20  # over the old 1 MiB default
    _, text, _ = served(web.post("/v1/generate", json=body))
    assert "Size: 64x64" in text and "Mask mode: blend" in text
    too_big = {**BASE, "init_image": "A" * (16 << 20)}
    r = web.post("/v1/generate", json=too_big)
    assert r.status_code == 413 and r.json()["detail"] == f"request body must be at most {16 << 20} bytes"
    r = web.post("/v2/models/sdrt/infer", json=v2_json(t("init_image", "BYTES", ["A" * (16 << 20)])))
    assert r.status_code == 413 and "at most 16777216 bytes" in r.json()["error"]
    assert_next_request_works(web)


def test_configured_body_limit_is_413(client: TestClient) -> None:
    noise = encode(Image.fromarray(photo(6, 300, 300)))  # ~270 kB, 360 kB as base64
    r = client.post("/v1/generate", json={**BASE, "init_image": b64(noise)})
    assert r.status_code == 413 and "at most 256000 bytes" in r.json()["detail"]
    assert_next_request_works(client)
