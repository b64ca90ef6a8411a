"""The bundled nano model (src/llama4/assets/nano): it loads, writes, stops its turns, reads images,
and its bits per byte on a held-out Austen excerpt stays where it was measured when it shipped.

A broken loader, tokenizer, chat format or vision path fails here. Fast (a 10.63M-parameter model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import llama4
from llama4.chat import ChatFormat
from llama4.engine.assets import BUNDLED, default_model_path, load_model_and_tokenizer
from llama4.eval import evaluate_text

DATA = Path(__file__).parent / "data"
# Measured on tests/data/nano_persuasion_4k.txt (from austen_persuasion.txt, never trained on)
# when the model shipped, plus a margin; a uniform guess over the vocabulary is ~3.6 bits/byte.
BPB_MEASURED = 1.454  # bf16 weights as shipped, evaluated in float32
BPB_BOUND = BPB_MEASURED + 0.05


@pytest.fixture(scope="module")
def bundled():
    model, tok, path = load_model_and_tokenizer(None, dtype="float32")
    return model, tok


def test_bundled_files_are_in_the_package():
    assert default_model_path() == BUNDLED
    names = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model"} <= names
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) < 60e6


def test_bundled_architecture_is_llama4(bundled):
    model, tok = bundled
    t = model.config.text
    assert t.vocab_size == tok.n_words
    assert any(t.is_global) and not all(t.is_global)  # NoPE global layers and chunked local ones
    assert t.attention_chunk_size < t.max_seq_len and t.qk_norm
    assert any(t.is_moe) and t.moe.num_experts > 1
    assert model.config.vision is not None
    assert model.config.image_token_id == tok.special_tokens["<|patch|>"]


def test_bundled_generates_english_words(bundled):
    model, tok = bundled
    out = llama4.generate(model, [tok.encode("It is a truth universally acknowledged", bos=True)], 12)[0]
    text = tok.decode(out)
    assert len(out) == 12 and sum(c.isalpha() for c in text) > 10, text


def test_bundled_chat_turn_ends_with_eot(bundled):
    """With `llama4 chat`'s default sampling (temperature 0.6, top-p 0.9) the replies to this turn
    end it (measured when it shipped: 37 of 40 sampled replies to ten user turns ended within
    256 tokens, all 4 to this one).

    (Greedy decoding of a model this small falls into loops such as ", and the first, and the
    first"; sampling is what the chat command does.)
    """
    model, tok = bundled
    prompt = ChatFormat(tok).encode_dialog([{"role": "user", "content": "Who is Mr. Darcy?"}])
    outs = llama4.generate(
        model, [prompt] * 4, 256, temperature=0.6, top_p=0.9, seed=0, stop_ids=[tok.eot_id]
    )
    for out in outs:
        assert out[-1] == tok.eot_id, tok.decode(out)


def test_bundled_reads_an_image(bundled):
    from llama4.image import preprocess_image

    model, tok = bundled
    v = model.config.vision
    pixels = np.full((28, 28, 3), 255, np.uint8)
    pixels[6:22, 10:18] = 0  # a dark bar on white
    img = preprocess_image(Image.fromarray(pixels), tile_size=v.image_size, max_tiles=v.max_tiles)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = ChatFormat(tok).encode_dialog(
        messages, image_grids=[img.grid], tokens_per_tile=v.tokens_per_tile
    )
    with torch.no_grad():
        features = model.image_features(img.pixel_values)
    assert features.shape == (1, v.tokens_per_tile, model.config.text.dim)
    out = llama4.generate(model, [prompt], 8, stop_ids=[tok.eot_id], image_features=[features])[0]
    assert out and tok.decode(out).strip(), out


def test_bundled_bits_per_byte_on_held_out_austen(bundled):
    model, tok = bundled
    r = evaluate_text(model, tok, (DATA / "nano_persuasion_4k.txt").read_text(encoding="utf-8"))
    assert r["bits_per_byte"] < BPB_BOUND, r
