"""Copy a trained model into the package as the bundled default: bf16 safetensors + tokenizer.

python scripts/nano/ship.py runs/nano/vision/model src/llama4/assets/nano
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

import llama4


def main(src: str, dst: str) -> None:
    model = llama4.load(src, dtype=torch.bfloat16)
    dst_path = Path(dst)
    if dst_path.exists():
        shutil.rmtree(dst_path)
    llama4.save(model, dst_path)
    shutil.copyfile(Path(src) / "tokenizer.model", dst_path / "tokenizer.model")
    for f in sorted(dst_path.iterdir()):
        print(f"{f}  {f.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main(*sys.argv[1:])
