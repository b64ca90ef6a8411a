"""Meta's original checkpoint format (params.json + consolidated.NN.pth) against Meta's reference.

The reference is ``llama_models.llama4.model.Transformer`` itself, built on CPU from small random
``ModelArgs`` (its fairscale layers run in a one-process gloo group with model-parallel size 1).
Its ``state_dict()`` is saved as ``consolidated.00.pth`` beside a ``params.json``, loaded with
``llama4.load``, and the logits compared on a sequence that crosses several attention chunks
and reaches positions where temperature tuning scales the global layers' queries.
Model-parallel shards are cut by Meta's own resharding code (``llama_models.checkpoint``) and
must equal what ``llama4.save(format="meta", model_parallel=2)`` writes.
Tolerance: relative max difference (max|ours - ref| / max|ref|) <= 1e-5 in float32.
"""

from __future__ import annotations

import io
import json
import socket
from unittest import mock

import pytest
import torch

import llama4
from llama4.checkpoint import meta
from llama4.checkpoint.io import CheckpointError, build
from llama4.config import RopeScaling, get_preset

pytest.importorskip("fairscale")
pytest.importorskip("llama_models")
import fairscale.nn.model_parallel.initialize as fs_init  # noqa: E402
from llama_models.checkpoint import convert_moe_weights, reshard_mp  # noqa: E402
from llama_models.llama4.args import ModelArgs  # noqa: E402
from llama_models.llama4.datatypes import TransformerInput  # noqa: E402
from llama_models.llama4.model import Transformer as Reference  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "model_parallel")

TOL = 1e-5
SEQ = 40  # chunk 8 -> 5 chunks; floor_scale 4 -> temperature tuning from position 3 on

BASE = dict(
    dim=32,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    vocab_size=256,
    ffn_exp=4.0,
    ffn_dim_multiplier=1.2,
    multiple_of=16,
    norm_eps=1e-5,
    rope_theta=500000.0,
    nope_layer_interval=4,
    attention_chunk_size=8,
    attn_temperature_tuning=True,
    floor_scale=4.0,
    attn_scale=0.1,
)
SCOUT_LIKE = dict(
    BASE,
    moe_args=dict(num_experts=4, top_k=1, interleave_moe_layer_step=1),  # every layer MoE
    use_qk_norm=True,
    use_scaled_rope=True,
    rope_scaling_factor=8.0,
    rope_high_freq_factor=4.0,  # 2048..8192-token wavelengths blended: one of the 4 frequencies
)
MAVERICK_LIKE = dict(  # use_qk_norm and attn_temperature_tuning left to the defaults (False)
    {k: v for k, v in BASE.items() if k != "attn_temperature_tuning"},
    n_layers=6,
    nope_layer_interval=3,
    moe_args=dict(num_experts=8, top_k=1, interleave_moe_layer_step=2),  # dense and MoE layers
)
ODD = dict(  # the reference's None branches: no NoPE layers, no chunking; top-2 routing, 1 kv head
    BASE,
    dim=48,
    n_heads=6,
    n_kv_heads=1,
    ffn_dim_multiplier=1.0,
    multiple_of=32,
    nope_layer_interval=None,
    attention_chunk_size=None,
    attn_temperature_tuning=False,
    moe_args=dict(num_experts=5, top_k=2, interleave_moe_layer_step=2, auto_scale_F=False),
    use_qk_norm=True,
)
DENSE = dict(BASE, use_qk_norm=True)  # no moe_args: every layer dense
CASES = {"scout-like": SCOUT_LIKE, "maverick-like": MAVERICK_LIKE, "odd": ODD, "dense": DENSE}
VISION = dict(
    SCOUT_LIKE,
    vision_args=dict(
        image_size=dict(height=56, width=56),
        patch_size=dict(height=14, width=14),
        dim=32,
        n_layers=2,
        n_heads=4,
        mlp_ratio=4.0,
        output_dim=64,
        pixel_shuffle_ratio=0.5,
    ),
)


@pytest.fixture(scope="module")
def model_parallel():
    """fairscale's layers need a process group and a model-parallel group, even alone."""
    started = not torch.distributed.is_initialized()
    if started:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
    fs_init.initialize_model_parallel(1)
    yield
    fs_init.destroy_model_parallel()
    if started:
        torch.distributed.destroy_process_group()


def reference(params: dict, seed: int) -> Reference:
    """Meta's model with random weights (its parallel layers allocate them uninitialised)."""
    args = ModelArgs(**params, max_batch_size=1, max_seq_len=SEQ)
    # The only CUDA call on this path: Attention.__init__ allocates its KV cache with `.cuda()`.
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):
        model = Reference(args)
    model = model.float()  # VisionEmbeddings casts its encoder to bfloat16
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() == 1 and name.endswith("weight"):  # norms
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("router_DE"):  # real spread, so routing differs between tokens
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def ref_logits(model: Reference, tokens: torch.Tensor) -> torch.Tensor:
    return model(TransformerInput(tokens=tokens, tokens_position=0)).logits


def write(path, params: dict, shards: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.json").write_text(json.dumps(params))
    for rank, state in enumerate(shards):
        torch.save(state, path / f"consolidated.{rank:02d}.pth")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


TOKENS = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_reference(case, tmp_path):
    ref = reference(CASES[case], seed=0)
    write(tmp_path, CASES[case], [ref.state_dict()])
    ours = llama4.load(tmp_path)
    with torch.no_grad():
        got = ours(TOKENS)
    expected = ref_logits(ref, TOKENS)
    assert got.shape == expected.shape == (1, SEQ, 256)
    assert rel_diff(got, expected) <= TOL
    # The routing really differs between tokens (otherwise the MoE check is vacuous).
    for layer in ours.config.text.moe_layers:
        assert ours.layers[layer].feed_forward.last_routing.experts.unique().numel() > 1


def meta_split(state: dict, num_experts: int, ranks: int) -> list[dict]:
    """Cut a one-rank state dict in the released layout with Meta's own resharding code."""
    state = convert_moe_weights(dict(state), num_experts)  # experts (E*D, F) -> (E, D, F)
    return [reshard_mp([state], size=ranks, rank=r) for r in range(ranks)]


def save_and_cut(ours, tmp_path, num_experts: int) -> tuple[dict, list[dict]]:
    """Write `ours` for one and for two ranks; the two must equal Meta's cut of the one."""
    llama4.save(ours, tmp_path / "one", format="meta")
    llama4.save(ours, tmp_path / "two", format="meta", model_parallel=2)
    single = torch.load(tmp_path / "one" / "consolidated.00.pth", weights_only=True)
    cut = meta_split(single, num_experts, ranks=2)
    for rank, theirs in enumerate(cut):
        mine = torch.load(tmp_path / "two" / f"consolidated.{rank:02d}.pth", weights_only=True)
        assert set(mine) == set(theirs)
        for key, tensor in theirs.items():  # Meta's cut keeps the experts 3D: (E, D, F / 2)
            assert torch.equal(mine[key].reshape(tensor.shape), tensor), key
    return single, cut


@pytest.mark.parametrize("case", ["scout-like", "maverick-like"])
def test_released_layout_and_two_shards(case, tmp_path):
    params = CASES[case]
    ref = reference(params, seed=2)
    write(tmp_path / "module", params, [ref.state_dict()])
    ours = llama4.load(tmp_path / "module")
    expected = ref_logits(ref, TOKENS)
    single, cut = save_and_cut(ours, tmp_path, params["moe_args"]["num_experts"])

    # Our writer uses the released names (wqkv, fc1_weight, moe_w_*, ...). Meta's model, built
    # from the params.json we wrote, loads that file through its own load hooks.
    assert "layers.1.attention.wqkv.weight" in single
    written = json.loads((tmp_path / "one" / "params.json").read_text())
    back = reference(written, seed=3)
    back.load_state_dict(dict(single), strict=True)
    assert rel_diff(ref_logits(back, TOKENS), expected) <= TOL

    # Entries of released files that are not weights are skipped (TransformerEngine's
    # `_extra_state` is pickled as io.BytesIO).
    extra = dict(
        single, **{"rope.freqs": torch.ones(4), "layers.0.attention.wo._extra_state": io.BytesIO(b"x")}
    )
    write(tmp_path / "extra", written, [extra])
    write(tmp_path / "meta-cut", params, cut)
    for folder in ("two", "meta-cut", "extra"):
        with torch.no_grad():
            assert rel_diff(llama4.load(tmp_path / folder)(TOKENS), expected) <= TOL, folder


def test_vision_tower_matches_reference(tmp_path):
    ref = reference(VISION, seed=4)
    write(tmp_path / "module", VISION, [ref.state_dict()])
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        v = ref.vision_embeddings
        feats = ref.vision_projection(v.vision_adapter(v.vision_encoder(pixels[:, None])))
    expected = ref_logits(ref, TOKENS)
    single, _ = save_and_cut(llama4.load(tmp_path / "module"), tmp_path, VISION["moe_args"]["num_experts"])
    assert "vision_embeddings.vision_encoder.conv1._linear.weight" in single
    for folder in ("module", "two"):
        model = llama4.load(tmp_path / folder)
        with torch.no_grad():
            got = model.image_features(pixels)
            assert got.shape == feats.shape == (3, 4, 32)
            assert rel_diff(got, feats) <= TOL, folder
            assert rel_diff(model(TOKENS), expected) <= TOL, folder


def test_params_json_gives_the_presets():
    scout = dict(
        dim=5120,
        n_layers=48,
        n_heads=40,
        n_kv_heads=8,
        vocab_size=202048,
        ffn_exp=4.0,
        ffn_dim_multiplier=1.2,
        multiple_of=2048,
        norm_eps=1e-5,
        rope_theta=500000.0,
        use_scaled_rope=True,
        nope_layer_interval=4,
        attention_chunk_size=8192,
        use_qk_norm=True,
        attn_temperature_tuning=True,
        moe_args=dict(
            num_experts=16, capacity_factor=1.0, auto_scale_F=True, top_k=1, interleave_moe_layer_step=1
        ),
        vision_args=dict(
            VISION["vision_args"], image_size=dict(height=336, width=336), dim=1408, n_layers=34
        ),
    )
    scout["vision_args"].update(n_heads=16, output_dim=4096)
    maverick = dict(
        scout,
        use_scaled_rope=False,
        use_qk_norm=False,
        moe_args=dict(scout["moe_args"], num_experts=128, interleave_moe_layer_step=2),
    )
    for params, name in ((scout, "scout"), (maverick, "maverick")):
        cfg = meta.config_from_params(params)
        preset = get_preset(name)
        preset.text.max_seq_len = cfg.text.max_seq_len  # not in params.json
        assert cfg.text == preset.text
        assert cfg.vision == preset.vision
        # Meta's widths: dense int(1.2 * int(2 * 4 * 5120 / 3)) up to 2048; experts half that.
        assert (cfg.text.dense_hidden_dim, cfg.text.moe.hidden_dim) == (16384, 8192)
        back = meta.params_from_config(cfg)
        assert (back["ffn_exp"], back["ffn_dim_multiplier"], back["multiple_of"]) == (4.0, 1.2, 2048)
        assert meta.config_from_params(back) == cfg


def test_our_model_runs_in_the_reference(tmp_path):
    """Widths that Meta's released FFN arguments cannot give are written with exact ones."""
    cfg = get_preset("debug")  # dense 128 and expert 64 wide at dim 64
    cfg.text.rope_scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    ours = build(cfg, device="cpu")
    ours.init_weights(seed=0)
    with torch.no_grad():
        for layer in ours.layers:
            layer.feed_forward.router.weight.normal_(0, 0.5)
    for ranks in (1, 2):
        llama4.save(ours, tmp_path / str(ranks), format="meta", model_parallel=ranks)
    params = json.loads((tmp_path / "1" / "params.json").read_text())
    ref = reference(params, seed=7)
    ref.load_state_dict(torch.load(tmp_path / "1" / "consolidated.00.pth", weights_only=True), strict=True)
    tokens = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = ours(tokens)
        assert rel_diff(ref_logits(ref, tokens), expected) <= TOL
        for ranks in (1, 2):
            back = llama4.load(tmp_path / str(ranks))
            back.config.text.max_seq_len = cfg.text.max_seq_len  # not in params.json
            assert back.config == cfg
            assert torch.equal(back(tokens), expected)


def test_any_feed_forward_widths_have_exact_params():
    # params.json sizes the layers through Meta's formulas (ffn_exp, multiplier, multiple_of,
    # capacity factor): every pair of widths must come out exactly, wide dense layers included
    # (a large multiplier steps over expert widths that capacity factor 1 cannot reach).
    for dim in (8, 32, 48, 100, 256):
        for dense in range(1, 10 * dim, 13):
            for moe in range(1, 6 * dim, 11):
                a = meta._ffn_args(dim, dense, moe)
                assert a is not None, (dim, dense, moe)
                assert meta.dense_hidden_dim(dim, a["multiple_of"], a["ffn_dim_multiplier"]) == dense
                assert meta.moe_hidden_dim(dim, **a) == moe
    assert meta.moe_hidden_dim(64, **meta._ffn_args(64, None, 40)) == 40  # no dense layer


def test_wide_dense_layers_round_trip(tmp_path):
    cfg = get_preset("debug")
    cfg.text.rope_scaling = None
    cfg.text.dense_hidden_dim, cfg.text.moe.hidden_dim = 640, 128  # 10 x dim: multiplier ~7.5
    cfg.text.moe.interleave_step, cfg.text.moe_layers = 2, None
    cfg = type(cfg).from_dict(cfg.to_dict())  # re-derive the MoE layers
    ours = build(cfg, device="cpu")
    ours.init_weights(seed=0)
    llama4.save(ours, tmp_path, format="meta")
    params = json.loads((tmp_path / "params.json").read_text())
    ref = reference(params, seed=7)
    ref.load_state_dict(torch.load(tmp_path / "consolidated.00.pth", weights_only=True), strict=True)
    tokens = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert rel_diff(ref_logits(ref, tokens), ours(tokens)) <= TOL
        assert torch.equal(llama4.load(tmp_path)(tokens), ours(tokens))


def test_three_ranks_with_a_head_dim_they_do_not_divide(tmp_path, model_parallel):
    # The reference splits a rank's fused wqkv rows by n_heads + 2 * n_kv_heads: with head_dim 8
    # on 3 ranks that does not divide, so wq, wk and wv are written apart (it loads those too).
    cfg = get_preset("debug")
    cfg.text.rope_scaling = None
    cfg.text.dim, cfg.text.n_heads, cfg.text.n_kv_heads, cfg.text.head_dim = 48, 6, 3, 8
    cfg.text.vocab_size, cfg.text.moe.hidden_dim, cfg.text.dense_hidden_dim = 513, 48, 96  # split in 3 too
    ours = build(cfg, device="cpu")
    ours.init_weights(seed=0)
    llama4.save(ours, tmp_path, format="meta", model_parallel=3)
    shards = [torch.load(tmp_path / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(3)]
    assert "layers.0.attention.wq.weight" in shards[0] and "layers.0.attention.wqkv.weight" not in shards[0]
    assert shards[0]["layers.0.attention.wk.weight"].shape == (8, 48)  # one of the 3 kv heads
    tokens = torch.randint(0, 512, (1, SEQ), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = ours(tokens)
        assert torch.equal(llama4.load(tmp_path)(tokens), expected)
        # Meta's own resharding merges the three ranks into what its model loads.
        params = json.loads((tmp_path / "params.json").read_text())
        ref = reference(params, seed=7)
        experts = cfg.text.moe.num_experts  # (E * F, D) per rank -> (E, F, D) before merging
        merged = reshard_mp([convert_moe_weights(dict(s), experts) for s in shards], size=1, rank=0)
        ref.load_state_dict(merged, strict=True)
        assert rel_diff(ref_logits(ref, tokens), expected) <= TOL


def test_bad_model_parallel_values_are_clear_errors(tmp_path):
    model = build(get_preset("debug"), device="cpu")
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="must be a whole number >= 1"):
            llama4.save(model, tmp_path, format="meta", model_parallel=bad)
    with pytest.raises(ValueError, match="format='meta' only"):
        llama4.save(model, tmp_path, model_parallel=2)


def test_save_rejects_what_params_json_cannot_say(tmp_path):
    model = build(get_preset("debug"), device="cpu")
    with pytest.raises(ValueError, match="original context 8192"):  # the debug preset's RoPE
        llama4.save(model, tmp_path, format="meta")


@pytest.fixture(scope="module")
def checkpoint():
    ref = reference(SCOUT_LIKE, seed=6)
    return {k: v.clone() for k, v in ref.state_dict().items()}


def test_wrong_shape_names_the_tensor(checkpoint, tmp_path):
    state = dict(checkpoint, **{"layers.2.feed_forward.experts.w2": torch.zeros(4, 60, 32)})
    write(tmp_path, SCOUT_LIKE, [state])
    with pytest.raises(
        CheckpointError, match=r"layers\.2\.feed_forward\.experts\.w2.*\(4, 60, 32\).*\(4, 64, 32\)"
    ):
        llama4.load(tmp_path)


def test_wrong_fused_shape_names_the_tensor(checkpoint, tmp_path):
    ours_dir = tmp_path / "ok"
    write(ours_dir, SCOUT_LIKE, [checkpoint])
    llama4.save(llama4.load(ours_dir), tmp_path / "released", format="meta")
    state = torch.load(tmp_path / "released" / "consolidated.00.pth", weights_only=True)
    state["layers.1.attention.wqkv.weight"] = state["layers.1.attention.wqkv.weight"][:-8]
    write(tmp_path / "bad", SCOUT_LIKE, [state])
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.wqkv\.weight.*\(56, 32\).*\(64, 32\)"):
        llama4.load(tmp_path / "bad")


def test_missing_and_unexpected_keys(checkpoint, tmp_path):
    state = {k: v for k, v in checkpoint.items() if k != "layers.0.attention.wk.weight"}
    write(tmp_path / "missing", SCOUT_LIKE, [state])
    with pytest.raises(CheckpointError, match=r"missing \['layers\.0\.attention\.wk\.weight'\]"):
        llama4.load(tmp_path / "missing")
    write(
        tmp_path / "extra", SCOUT_LIKE, [dict(checkpoint, **{"layers.0.attention.wz.weight": torch.zeros(1)})]
    )
    with pytest.raises(CheckpointError, match=r"unexpected \['layers\.0\.attention\.wz\.weight'\]"):
        llama4.load(tmp_path / "extra")


class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_arbitrary_pickles_are_refused(checkpoint, tmp_path):
    write(tmp_path, SCOUT_LIKE, [dict(checkpoint, evil=Payload())])
    with pytest.raises(Exception, match="Weights only load failed"):
        llama4.load(tmp_path)


def test_a_shard_that_is_not_a_dict_is_a_clear_error(tmp_path):
    for name, content in (("tensor", torch.zeros(3)), ("list", [torch.zeros(3)])):
        write(tmp_path / name, SCOUT_LIKE, [{}])
        torch.save(content, tmp_path / name / "consolidated.00.pth")
        with pytest.raises(CheckpointError, match=f"holds a {type(content).__name__}, not a dict of tensors"):
            llama4.load(tmp_path / name)
