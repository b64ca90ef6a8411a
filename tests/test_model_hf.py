"""The text decoder against transformers' Llama 4 classes, through the real checkpoint format.

Each case builds a random transformers model, saves it with `save_pretrained`, loads it with
`llama4.load` and compares logits on a sequence that crosses several attention chunks and
reaches positions where temperature tuning scales the global layers' queries.
Tolerance: relative max difference (max|ours - ref| / max|ref|) <= 1e-5 in float32.
"""

from __future__ import annotations

import json

import pytest
import torch

import llama4
from llama4.checkpoint.io import CheckpointError

transformers = pytest.importorskip("transformers")

TOL = 1e-5
SEQ = 50  # chunk 8 -> 7 chunks; floor_scale 4 -> temperature tuning from position 3 on


def text_config(**overrides):
    base = dict(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=24,
        intermediate_size_mlp=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=1,
        attention_chunk_size=8,
        floor_scale=4,
        attn_scale=0.1,
        use_qk_norm=True,
        interleave_moe_layer_step=1,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    base.update(overrides)
    return transformers.Llama4TextConfig(**base)


SCOUT_LIKE = dict(
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 16.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
        "original_max_position_embeddings": 16,
    },
)
MAVERICK_LIKE = dict(
    num_hidden_layers=6, num_local_experts=16, interleave_moe_layer_step=2, use_qk_norm=False
)
ODD_SHAPES = dict(
    hidden_size=36,
    head_dim=12,  # != hidden / heads
    num_attention_heads=6,
    num_key_value_heads=1,
    num_experts_per_tok=2,
    num_local_experts=5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
)
CASES = {"scout-like": SCOUT_LIKE, "maverick-like": MAVERICK_LIKE, "odd-shapes": ODD_SHAPES}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def random_hf_model(seed: int, **overrides):
    torch.manual_seed(seed)
    model = transformers.Llama4ForCausalLM(text_config(**overrides)).eval()
    # HF initialises expert weights with the same small std as everything else; give the
    # router real spread so that routing differs between tokens and experts.
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.feed_forward, "router"):
                layer.feed_forward.router.weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    ref = random_hf_model(0, **CASES[case])
    ref.save_pretrained(tmp_path)
    ours = llama4.load(tmp_path)
    tokens = torch.randint(0, ref.config.vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(tokens).logits
        got = ours(tokens)
    assert got.shape == (2, SEQ, ref.config.vocab_size)
    assert rel_diff(got, expected) <= TOL
    # The routing really differs between tokens (otherwise the MoE test is vacuous).
    routing = ours.layers[ref.config.moe_layers[0]].feed_forward.last_routing
    assert routing.experts.unique().numel() > 1


def test_round_trip_through_transformers(tmp_path):
    ref = random_hf_model(3, **SCOUT_LIKE)
    ref.save_pretrained(tmp_path / "hf")
    ours = llama4.load(tmp_path / "hf")
    llama4.save(ours, tmp_path / "ours")
    back = transformers.Llama4ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    tokens = torch.randint(0, 320, (1, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel_diff(back(tokens).logits, ref(tokens).logits) <= TOL
        assert rel_diff(llama4.load(tmp_path / "ours")(tokens), ours(tokens)) == 0.0


def test_sharded_checkpoint_and_dtype(tmp_path):
    ref = random_hf_model(4, **MAVERICK_LIKE)
    ref.save_pretrained(tmp_path / "hf")
    ours = llama4.load(tmp_path / "hf")
    llama4.save(ours, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = llama4.load(tmp_path / "sharded")
    tokens = torch.randint(0, 320, (1, 20))
    with torch.no_grad():
        assert torch.equal(again(tokens), ours(tokens))
    half = llama4.load(tmp_path / "sharded", dtype="bfloat16")
    assert half.output.weight.dtype == torch.bfloat16
    assert all(p.device.type == "cpu" for p in half.parameters())


def test_errors_name_the_tensor(tmp_path):
    ref = random_hf_model(5)
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 20  # experts no longer fit
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"experts\.(down_proj.*\(4, 24, 32\).*\(4, 20, 32\)|gate_up_proj.*\(4, 32, 48\).*\(4, 32, 40\))",
    ):
        llama4.load(tmp_path)
    config["intermediate_size"] = 24
    config["num_hidden_layers"] = 5  # a layer the checkpoint lacks
    for derived in ("no_rope_layers", "moe_layers", "layer_types"):
        del config[derived]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing \['layers\.4\."):
        llama4.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        llama4.load(tmp_path / "nowhere")


def test_internal_names_translate_hf_no_rope_layers(tmp_path):
    # HF: no_rope_layers[i] == 1 means layer i USES RoPE. Ours: global = NoPE.
    ref = random_hf_model(6, no_rope_layers=[1, 0, 1, 1])
    ref.save_pretrained(tmp_path)
    ours = llama4.load(tmp_path)
    assert ours.config.text.global_layers == (1,)
    assert [layer.attention.is_global for layer in ours.layers] == [False, True, False, False]
    tokens = torch.randint(0, 320, (1, SEQ))
    with torch.no_grad():
        assert rel_diff(ours(tokens), ref(tokens).logits) <= TOL


def test_explicit_positions_use_the_masked_path(tmp_path):
    # Without positions, local layers run chunk by chunk; with them, through explicit masks.
    ref = random_hf_model(7, **SCOUT_LIKE)
    ref.save_pretrained(tmp_path)
    ours = llama4.load(tmp_path)
    tokens = torch.randint(0, 320, (2, SEQ))
    positions = torch.arange(SEQ)[None].expand(2, SEQ)
    with torch.no_grad():
        assert rel_diff(ours(tokens, positions=positions), ours(tokens)) <= 1e-6


def test_tied_embeddings_load(tmp_path):
    # transformers ties the head to the embedding and saves no lm_head.weight.
    ref = random_hf_model(7, tie_word_embeddings=True)
    assert ref.lm_head.weight.data_ptr() == ref.model.embed_tokens.weight.data_ptr()
    ref.save_pretrained(tmp_path)
    ours = llama4.load(tmp_path)
    tokens = torch.randint(0, 320, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_diff(ours(tokens), ref(tokens).logits) <= TOL


@pytest.mark.parametrize(
    "field, value, match",
    [("hidden_act", "gelu", "hidden_act='gelu'"), ("attention_bias", True, "attention_bias")],
)
def test_configs_llama4_cannot_compute_are_refused(tmp_path, field, value, match):
    # Real Llama 4 has SwiGLU (silu) feed-forwards and no attention biases; a config asking for
    # anything else must not load as if it were one.
    random_hf_model(8).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        llama4.load(tmp_path)


def test_released_config_quirks(tmp_path):
    # Meta's released config.json says "attn_temperature_tuning": 4 (a flag to transformers
    # 4.51): it loads as True and is written back as a bool that transformers and Meta accept.
    random_hf_model(9).save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    config["attn_temperature_tuning"] = 4
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    ours = llama4.load(tmp_path / "a")
    assert ours.config.text.attn_temperature_tuning is True
    llama4.save(ours, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["attn_temperature_tuning"] is True
    # FP8 releases: a clear refusal, not a list of unexpected tensors.
    config["quantization_config"] = {"quant_method": "fbgemm_fp8"}
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized weights \\(fbgemm_fp8\\)"):
        llama4.load(tmp_path / "a")
