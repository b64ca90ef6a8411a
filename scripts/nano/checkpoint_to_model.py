"""A training checkpoint (OUT/checkpoints/step-N) -> a model directory that `llama4 eval` reads.

python scripts/nano/checkpoint_to_model.py runs/nano/pretrain/checkpoints/step_50 runs/nano/first
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import llama4
from llama4.checkpoint.io import build
from llama4.config import ModelConfig


def main(ckpt: str, out: str, tokenizer: str = "runs/nano/tokenizer.model") -> None:
    trainer = json.loads((Path(ckpt) / "trainer.json").read_text())
    model = build(ModelConfig.from_dict(trainer["model_config"]), device="cpu")
    missing, unexpected = model.load_state_dict(load_file(Path(ckpt) / "model.safetensors"), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("rope_inv_freq")], (
        missing,
        unexpected,
    )
    model.init_buffers("cpu")
    llama4.save(model.to(torch.float32), out)
    shutil.copyfile(tokenizer, Path(out) / "tokenizer.model")
    print(f"wrote {out} (step {trainer['step']}, {trainer['tokens_seen']} tokens)")


if __name__ == "__main__":
    main(*sys.argv[1:])
