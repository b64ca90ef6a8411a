"""LoRA: adapters on attention and stacked experts, saved alone, merged into the same logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import llama4
from llama4.cli import main
from llama4.config import get_preset
from llama4.model.transformer import Transformer
from llama4.train.lora import apply_lora, lora_modules, merge_lora, save_adapter

DATA = Path(__file__).parent / "data"
ALL_TARGETS = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_up_proj",
    "down_proj",
    "gate_proj",
    "up_proj",
    "router",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def base_dir(tmp_path) -> Path:
    cfg = get_preset("debug")
    cfg.text.vocab_size = 2560  # the test tokenizer: 512 BPE ranks + 2048 special tokens
    model = Transformer(cfg)
    model.init_weights(0)
    path = tmp_path / "base"
    llama4.save(model, path)
    shutil.copyfile(DATA / "tokenizer_512.model", path / "tokenizer.model")
    return path


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_adapter_shapes_and_frozen_base(base_dir):
    model = llama4.load(base_dir)
    x = torch.randint(0, 2560, (2, 24))
    before = logits(model, x)
    adapters = apply_lora(model, rank=4, alpha=8.0, targets=ALL_TARGETS)
    assert torch.equal(logits(model, x), before)  # B starts at zero: the base model exactly
    t, r = model.config.text, 4
    E, D, F = t.moe.num_experts, t.dim, t.moe.hidden_dim
    up = adapters["layers.0.feed_forward.experts.gate_up_proj"]
    down = adapters["layers.0.feed_forward.experts.down_proj"]
    assert (up.A.shape, up.B.shape) == ((E, D, r), (E, r, 2 * F))
    assert (down.A.shape, down.B.shape) == ((E, F, r), (E, r, D))
    q = adapters["layers.0.attention.q_proj.weight"]
    assert (q.A.shape, q.B.shape) == ((r, D), (t.n_heads * t.head_dim, r))
    for name in ("router.weight", "shared_expert.gate_proj.weight", "shared_expert.down_proj.weight"):
        assert f"layers.1.feed_forward.{name}" in adapters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)


def test_merged_model_gives_the_logits_of_base_plus_adapter(base_dir, tmp_path):
    model = llama4.load(base_dir)
    apply_lora(model, rank=4, alpha=8.0, targets=ALL_TARGETS)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in lora_modules(model).values():
            lora.B.copy_(torch.randn(lora.B.shape, generator=gen) * 0.05)
    x = torch.randint(0, 2560, (2, 40))
    adapted = logits(model, x)
    assert not torch.allclose(adapted, logits(llama4.load(base_dir), x), atol=1e-3)  # the adapter matters
    save_adapter(model, tmp_path / "adapter", base_model=str(base_dir))
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert (meta["rank"], meta["alpha"], meta["targets"]) == (4, 8.0, ALL_TARGETS)

    merge_lora(model)
    assert not any("parametrizations" in k for k in model.state_dict())
    torch.testing.assert_close(logits(model, x), adapted, atol=1e-5, rtol=1e-5)

    assert (
        main(
            [
                "merge",
                "--model",
                str(base_dir),
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    merged = llama4.load(tmp_path / "m")
    torch.testing.assert_close(logits(merged, x), adapted, atol=1e-5, rtol=1e-5)
    assert (tmp_path / "m" / "tokenizer.model").exists()


def test_lora_finetune_trains_only_the_adapter(base_dir, tmp_path):
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Say {w}."},
                {"role": "assistant", "content": f"{w}, {w}!"},
            ]
        }
        for w in ("yes", "no", "maybe", "Emma", "Harriet", "Knightley") * 3
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "ft"
    args = ["finetune", "--model", str(base_dir), "--data", str(data), "--out", str(out), "--steps", "6"]
    args += [
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--lora-rank",
        "4",
        "--log-every",
        "1",
        "--eval-every",
        "1",
    ]
    args += [
        "--cache-dir",
        str(tmp_path / "cache"),
        "--no-progress",
        "--save-merged",
        "--val-fraction",
        "0.2",
    ]
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[-1]["val_loss"] < records[0]["val_loss"] - 0.1
    assert (out / "adapter" / "adapter.safetensors").exists() and (
        out / "adapter" / "tokenizer.model"
    ).exists()
    # The adapter merged by `llama4 merge` equals the merged model the run wrote itself.
    assert (
        main(
            [
                "merge",
                "--model",
                str(base_dir),
                "--adapter",
                str(out / "adapter"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    x = torch.randint(0, 2560, (1, 20))
    a, b = logits(llama4.load(out / "model"), x), logits(llama4.load(tmp_path / "m"), x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, logits(llama4.load(base_dir), x), atol=1e-4)
