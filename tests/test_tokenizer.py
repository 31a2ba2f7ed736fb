"""The torch-free tokenizer gives transformers' CLIPTokenizer ids, and handles long prompts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from transformers import CLIPTokenizer

from export.tokenizer_files import VOCAB_SIZE, write_clip_tokenizer_files
from runtime.tokenizer import ClipTokenizer

pytestmark = pytest.mark.integration  # compares with transformers' CLIPTokenizer

PROMPTS = [
    "a photo of a cat",
    "",
    "A Cat, Maid!!  with (weights:1.3) and [brackets]",
    "héllo wörld, naïve café 東京 🐱",
    "it's 3.14 o'clock... don't   stop\tnow\n",
    "photorealistic portrait of an astronaut riding a horse on mars, 8k, trending on artstation",
]
LONG = " ".join(f"word{i} red cat" for i in range(60))  # ~290 tokens: over 3 chunks
MEDIUM = " ".join(f"word{i} red cat" for i in range(30))  # ~140 tokens: 2 chunks


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    files = write_clip_tokenizer_files(tmp_path_factory.mktemp("clip_bpe"))
    hf = CLIPTokenizer.from_pretrained(files)
    out = tmp_path_factory.mktemp("tokenizer")
    hf.save_pretrained(out)
    return hf, ClipTokenizer(out, bos_id=49406, eos_id=49407, pad_id=49407)


def test_vocabulary_is_the_real_clip_bpe(tokenizers):
    hf, _ = tokenizers
    assert len(hf) == VOCAB_SIZE
    assert hf("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_ids_equal_transformers(tokenizers):
    hf, ours = tokenizers
    expected = hf(PROMPTS + [LONG], padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(PROMPTS + [LONG]).ids
    assert got.dtype == np.int32 and got.shape == (len(PROMPTS) + 1, 77)
    np.testing.assert_array_equal(got, np.array(expected))


def test_truncation_warns_with_the_dropped_text(tokenizers, caplog):
    _, ours = tokenizers
    with caplog.at_level(logging.WARNING):
        result = ours(["a cat", LONG])
    assert result.truncated[0] == ""
    assert result.truncated[1].endswith("word 5 9 red cat")  # CLIP splits digits
    assert "dropped" in caplog.text and "word 5 9 red cat" in caplog.text


def test_chunked_long_prompt_is_a1111_style(tokenizers):
    hf, ours = tokenizers
    result = ours(["a cat", MEDIUM], long_prompt="chunk")
    body = hf(MEDIUM, add_special_tokens=False).input_ids
    chunks = -(-len(body) // 75)
    assert result.ids.shape == (2, 77 * chunks) and result.truncated == ("", "")
    for k in range(chunks):
        window = result.ids[1, 77 * k : 77 * (k + 1)]
        piece = body[75 * k : 75 * (k + 1)]
        assert window[0] == 49406 and list(window[1 : 1 + len(piece)]) == piece
        assert window[1 + len(piece)] == 49407
    # the short prompt gets empty BOS/EOS windows after its first
    assert list(result.ids[0, 77:79]) == [49406, 49407]


def test_unknown_long_prompt_mode(tokenizers):
    with pytest.raises(ValueError, match="long_prompt must be one of truncate, chunk"):
        tokenizers[1](["x"], long_prompt="wrap")


def test_chunking_is_capped_and_warns(tokenizers, caplog):
    with caplog.at_level(logging.WARNING):
        result = tokenizers[1]([LONG], long_prompt="chunk", max_chunks=3)
    assert result.ids.shape == (1, 231) and result.truncated[0]
