"""The whole multimodal model against transformers' Llama4ForConditionalGeneration.

A random transformers model (text + vision) is saved with `save_pretrained`, loaded with
`llama4.load`, and fed real preprocessed images laid out by our chat format (single tile and
multi-tile grids, one and two images). Tolerance: relative max logit difference <= 1e-5 (fp32).
"""

from __future__ import annotations

import re

import pytest
import torch
from PIL import Image

import llama4
from llama4.chat import ChatFormat
from llama4.image import preprocess_image
from llama4.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TILE = 28  # 2x2 patches of 14 -> pixel shuffle 0.5 -> 1 token per tile
TOKENS_PER_TILE = 1
VOCAB = 202048  # the real tokenizer's ids (<|patch|> = 200092)


def hf_multimodal(seed: int, **vision_overrides):
    text = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=24,
        intermediate_size_mlp=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        attention_chunk_size=16,
        floor_scale=8,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    vision = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        image_size=TILE,
        patch_size=14,
        vision_output_dim=64,
        projector_input_dim=64,
        projector_output_dim=64,
        **vision_overrides,
    )
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(
        transformers.Llama4Config(text_config=text, vision_config=vision)
    ).eval()
    with torch.no_grad():  # spread the router so tokens take different experts
        for layer in model.language_model.model.layers:
            layer.feed_forward.router.weight.normal_(0, 0.5)
    return model


def picture(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("mm")
    ref = hf_multimodal(0)
    ref.save_pretrained(path)
    return ref, llama4.load(path)


@pytest.mark.parametrize(
    "sizes",
    [[(20, 20)], [(100, 40)], [(30, 90), (56, 56)]],  # 1x1 grid; 1x4 grid; a 3x1 grid and a 2x2 grid
    ids=["single-tile", "multi-tile", "two-images"],
)
def test_logits_match_transformers(models, sizes):
    ref, ours = models
    tok = Tokenizer.default()
    images = [
        preprocess_image(picture(w, h, i), tile_size=TILE, max_tiles=4) for i, (w, h) in enumerate(sizes)
    ]
    content = [{"type": "text", "text": "Compare these:"}]
    content += [{"type": "image"} for _ in images]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    ids = ChatFormat(tok).encode_dialog(
        messages, image_grids=[im.grid for im in images], tokens_per_tile=TOKENS_PER_TILE
    )
    tokens = torch.tensor([ids])
    pixels = torch.cat([im.pixel_values for im in images])
    n_tiles = sum(im.grid[0] * im.grid[1] + (im.grid != (1, 1)) for im in images)
    assert pixels.shape[0] == n_tiles == int((tokens == tok.special("<|patch|>")).sum())
    with torch.no_grad():
        expected = ref(input_ids=tokens, pixel_values=pixels).logits
        got = ours(tokens, pixel_values=pixels)
        without_image = ours(tokens)  # <|patch|> embeddings left as they are
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel <= 1e-5
    assert (got - without_image).abs().max() > 1e-3  # the image really changes the logits


def test_patch_count_mismatch_is_a_clear_error(models):
    _, ours = models
    tokens = torch.tensor([[1, 200092, 200092, 2]])
    with pytest.raises(ValueError, match=re.escape("3 rows but tokens hold 2 <|patch|>")):
        ours(tokens, image_features=torch.zeros(3, 32))


def test_save_round_trip_keeps_vision(models, tmp_path):
    ref, ours = models
    llama4.save(ours, tmp_path)
    back = transformers.Llama4ForConditionalGeneration.from_pretrained(tmp_path).eval()
    tokens = torch.tensor([[5, 200092, 7]])
    pixels = preprocess_image(picture(20, 20, 9), tile_size=TILE, max_tiles=4).pixel_values
    with torch.no_grad():
        a = back(input_ids=tokens, pixel_values=pixels).logits
        b = ref(input_ids=tokens, pixel_values=pixels).logits
    assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5


def test_vision_config_fields_transformers_ignores(tmp_path):
    # transformers builds the vision LayerNorms with eps 1e-5 and the projector without a bias
    # whatever norm_eps and multi_modal_projector_bias say: a checkpoint saying otherwise still
    # loads, and computes what transformers computes.
    ref = hf_multimodal(1, norm_eps=1e-2, multi_modal_projector_bias=True)
    ref.save_pretrained(tmp_path / "hf")
    ours = llama4.load(tmp_path / "hf")
    tokens = torch.tensor([[5, 200092, 7]])
    pixels = preprocess_image(picture(20, 20, 3), tile_size=TILE, max_tiles=4).pixel_values
    with torch.no_grad():
        expected = ref(input_ids=tokens, pixel_values=pixels).logits
        got = ours(tokens, pixel_values=pixels)
    assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    # llama4's tower has no such settings; configs of our own format that name them may only
    # hold the reference's values.
    from llama4.config import ModelConfig

    d = ours.config.to_dict()
    d["vision"].update(norm_eps=1e-5, projector_bias=False)
    assert ModelConfig.from_dict(d) == ours.config
    d["vision"]["norm_eps"] = 1e-2
    with pytest.raises(
        ValueError, match=r"vision norm_eps must be 1e-05 \(the reference tower's\), got 0.01"
    ):
        ModelConfig.from_dict(d)
