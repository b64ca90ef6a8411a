"""Vision tower against transformers' Llama 4 (tiny random configs, the production key table)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from llama4.checkpoint.vision_keys import VISION_KEYS, convert_vision_state_dict, hf_vision_key, vision_key
from llama4.config import VisionConfig, get_preset
from llama4.image import preprocess_image
from llama4.model.vision import VisionTower, pixel_shuffle, rope_2d

transformers = pytest.importorskip("transformers")
from transformers import Llama4Config, Llama4ForConditionalGeneration  # noqa: E402
from transformers.models.llama4 import modeling_llama4 as hf_llama4  # noqa: E402

TEXT_DIM = 64


def hf_config(vc: VisionConfig) -> Llama4Config:
    """The HF config for our VisionConfig, with a tiny text model beside it."""
    return Llama4Config(
        vision_config=dict(
            hidden_size=vc.dim,
            num_hidden_layers=vc.n_layers,
            num_attention_heads=vc.n_heads,
            # HF sizes the adapter's input as intermediate_size (it equals dim / ratio^2 in the
            # released models); our tiny configs keep that equality so HF can run them.
            intermediate_size=vc.mlp_hidden_dim,
            image_size=vc.image_size,
            patch_size=vc.patch_size,
            pixel_shuffle_ratio=vc.pixel_shuffle_ratio,
            projector_input_dim=vc.adapter_dim,
            projector_output_dim=vc.adapter_out_dim,
            vision_output_dim=vc.vision_output_dim,
            rope_parameters={"rope_theta": vc.rope_theta, "rope_type": "default"},
        ),
        text_config=dict(
            hidden_size=TEXT_DIM,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=64,
            intermediate_size_mlp=128,
            vocab_size=256,
            num_local_experts=2,
        ),
        image_token_index=255,  # <|patch|> (200092 in the real vocabulary)
    )


def tiny_vision(image_size: int = 56, dim: int = 32, n_heads: int = 4, n_layers: int = 2) -> VisionConfig:
    return VisionConfig(
        image_size=image_size,
        patch_size=14,
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        mlp_hidden_dim=4 * dim,
        adapter_dim=48,
        adapter_out_dim=48,
        vision_output_dim=48,
    )


def build_pair(vc: VisionConfig, seed: int = 0):
    """A random HF model (every vision weight random, norms and biases too) and our tower loaded
    from its state dict through the key table (built on meta, loaded with assign=True)."""
    torch.manual_seed(seed)
    hf = Llama4ForConditionalGeneration(hf_config(vc)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.startswith(("vision_model.", "multi_modal_projector.")):
                p.normal_(0.0, 0.5 if p.ndim == 1 else p.shape[-1] ** -0.5)
    with torch.device("meta"):
        ours = VisionTower(vc, TEXT_DIM)
    ours.load_state_dict(convert_vision_state_dict(hf.state_dict()), strict=True, assign=True)
    return hf, ours.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize(
    "vc, n_tiles",
    [
        (tiny_vision(56), 1),  # single tile
        (tiny_vision(56), 5),  # a 2x2 grid + global tile
        (tiny_vision(84, dim=48, n_heads=3), 3),  # 6x6 patches, head_dim 16
        (tiny_vision(84, dim=64, n_heads=4, n_layers=3), 17),  # 4x4 grid + global
    ],
)
def test_matches_hf_image_features(vc, n_tiles):
    hf, ours = build_pair(vc)
    pixels = torch.randn(n_tiles, 3, vc.image_size, vc.image_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # What Llama4ForConditionalGeneration.forward does with pixel_values:
        features = hf.get_image_features(pixel_values=pixels).last_hidden_state  # (N, K, E)
        projected = hf.multi_modal_projector(features.view(-1, features.size(-1)))  # (N*K, Dt)
        our_features = ours.encode(pixels)
        our_out = ours(pixels)
    assert our_features.shape == features.shape == (n_tiles, vc.tokens_per_tile, vc.adapter_out_dim)
    assert our_out.shape == (n_tiles, vc.tokens_per_tile, TEXT_DIM)
    assert rel_err(our_features, features) <= 1e-5
    assert rel_err(our_out.reshape(-1, TEXT_DIM), projected) <= 1e-5


def test_pixel_shuffle_ratio_one_seventh_matches_hf():
    # 14 x 14 patches, k = 7: 4 tokens a tile (49 * (1/7)**2 truncated to 3 in floating point).
    dim = 8
    vc = VisionConfig(
        image_size=196,
        patch_size=14,
        dim=dim,
        n_layers=1,
        n_heads=2,
        mlp_hidden_dim=49 * dim,  # HF's adapter input: dim / ratio^2
        pixel_shuffle_ratio=1 / 7,
        adapter_dim=16,
        adapter_out_dim=16,
        vision_output_dim=16,
    )
    assert vc.tokens_per_tile == 4
    hf, ours = build_pair(vc)
    pixels = torch.randn(2, 3, 196, 196, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        features = hf.get_image_features(pixel_values=pixels).last_hidden_state
        our_features = ours.encode(pixels)
    assert our_features.shape == features.shape == (2, 4, 16)
    assert rel_err(our_features, features) <= 1e-5


def test_features_land_on_patch_tokens_in_order():
    """HF's full forward scatters the projected features, flattened tile by tile, over the
    <|patch|> positions in order: the rows of our (N, K, Dt) output, in the same order."""
    vc = tiny_vision(56)
    hf, ours = build_pair(vc)
    n_tiles, k = 2, vc.tokens_per_tile
    patch_id = hf.config.image_token_id
    ids = [1, 2] + [patch_id] * k + [3] + [patch_id] * k + [4]
    pixels = torch.randn(n_tiles, 3, 56, 56, generator=torch.Generator().manual_seed(2))
    seen = {}
    hook = hf.language_model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"]), with_kwargs=True
    )
    with torch.no_grad():
        hf(input_ids=torch.tensor([ids]), pixel_values=pixels)
        ours_flat = ours(pixels).reshape(-1, TEXT_DIM)
    hook.remove()
    at_patches = seen["embeds"][0, torch.tensor(ids) == patch_id]
    assert rel_err(ours_flat, at_patches) <= 1e-5


def test_pixel_shuffle_matches_hf():
    g = torch.Generator().manual_seed(0)
    for side in (4, 6, 24):
        x = torch.randn(3, side * side, 8, generator=g)
        assert torch.equal(pixel_shuffle(x, 0.5), hf_llama4.pixel_shuffle(x, 0.5))


def test_rope_matches_hf_real_size():
    vc = VisionConfig()  # 336 / 14 patches, dim 1408, 16 heads: head_dim 88
    freqs_ci = hf_llama4.Llama4VisionRotaryEmbedding._compute_freqs_ci(hf_config(vc).vision_config)
    cos, sin = rope_2d(vc.patches_per_side, vc.dim // vc.n_heads, vc.rope_theta)
    assert cos.shape == (577, 44)
    assert torch.equal(cos, freqs_ci[:, 0].real) and torch.equal(sin, freqs_ci[:, 0].imag)


def test_key_table_covers_real_checkpoint_layout():
    """Every HF vision weight of the real Scout/Maverick vision config maps to one of ours."""
    vc = VisionConfig()
    with torch.device("meta"):
        hf_vision = hf_llama4.Llama4VisionModel(hf_config(vc).vision_config)
        ours = VisionTower(vc, 5120)
    hf_keys = {f"vision_model.{k}": v.shape for k, v in hf_vision.state_dict().items()}
    hf_keys["multi_modal_projector.linear_1.weight"] = torch.Size([5120, vc.vision_output_dim])
    our_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    mapped = {vision_key(k): shape for k, shape in hf_keys.items()}
    assert None not in mapped and len(mapped) == len(hf_keys)
    assert mapped == our_shapes  # same names, same shapes: no tensor transforms
    # 34 layers x 23.8M + embeddings 1.6M + adapter 39.8M (5632->4096->4096) + projector 21.0M
    assert sum(s.numel() for s in our_shapes.values()) == 871_932_416
    assert len({ours for _, ours in VISION_KEYS}) == len(VISION_KEYS)
    assert all(hf_vision_key(vision_key(k)) == k for k in hf_keys)  # the table reads both ways


def test_unknown_vision_key_is_an_error():
    with pytest.raises(KeyError, match="no entry"):
        convert_vision_state_dict({"vision_model.something_new": torch.zeros(1)})
    assert convert_vision_state_dict({"language_model.model.norm.weight": torch.zeros(1)}) == {}


def test_bfloat16_close_to_float32():
    vc = tiny_vision(56)
    _, ours = build_pair(vc)
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ours(pixels)
        out = ours.to(torch.bfloat16)(pixels)  # float32 pixels are cast to the weights' dtype
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 0.05


def test_init_weights_after_meta_build():
    vc = tiny_vision(56)
    with torch.device("meta"):
        tower = VisionTower(vc, TEXT_DIM)
    tower.to_empty(device="cpu").init_weights(torch.Generator().manual_seed(0))
    again = VisionTower(vc, TEXT_DIM)
    again.init_weights(torch.Generator().manual_seed(0))
    for (name, a), (_, b) in zip(tower.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name  # deterministic, every parameter written
    assert torch.all(tower.layers[0].attn_norm.weight == 1) and torch.all(tower.layers[0].attn.wq.bias == 0)
    out = tower(torch.randn(2, 3, 56, 56))
    assert torch.isfinite(out).all()


def test_bad_pixel_shape():
    with torch.device("meta"):
        tower = VisionTower(tiny_vision(56), TEXT_DIM)
    with pytest.raises(ValueError, match="pixel_values must be"):
        tower(torch.zeros(2, 3, 84, 84, device="meta"))


def test_debug_vision_preset_runs():
    cfg = get_preset("debug-vision")
    tower = VisionTower(cfg.vision, cfg.text.dim)
    s = cfg.vision.image_size
    out = tower(torch.randn(3, 3, s, s))
    assert out.shape == (3, cfg.vision.tokens_per_tile, cfg.text.dim)


def _llama_models_photo(name: str) -> Path:
    spec = importlib.util.find_spec("llama_models")
    path = Path(spec.origin).parent / "resources" / name if spec and spec.origin else None
    if path is None or not path.exists():
        pytest.skip(f"llama_models/resources/{name} not found (pip install llama-models ships it)")
    return path


@pytest.mark.parametrize("name, grid", [("dog.jpg", (2, 2)), ("pasta.jpeg", (4, 4))])
def test_real_photos_through_preprocessing_and_a_small_tower(name, grid):
    vc = VisionConfig(
        dim=32,
        n_layers=1,
        n_heads=4,
        mlp_hidden_dim=64,
        adapter_dim=32,
        adapter_out_dim=32,
        vision_output_dim=32,
    )  # real tile size (336), patch 14, max 16 tiles; tiny widths
    image = preprocess_image(_llama_models_photo(name), tile_size=vc.image_size, max_tiles=vc.max_tiles)
    print(f"{name}: grid {image.grid}, {image.n_tiles} tiles")
    assert image.grid == grid  # the reference rule on 512x512 and 1280x1280 (test_image.py)
    assert image.pixel_values.shape == (grid[0] * grid[1] + 1, 3, 336, 336)
    torch.manual_seed(0)
    tower = VisionTower(vc, TEXT_DIM)
    with torch.no_grad():
        out = tower(image.pixel_values)
    assert out.shape == (image.n_tiles, 144, TEXT_DIM) and torch.isfinite(out).all()
