"""Average the weights of models fine-tuned from one starting point (a "model soup").

    python scripts/nano/soup.py OUT MODEL_DIR [MODEL_DIR ...]

The bundled model's last stage anneals the same fused checkpoint twice, at two peak rates, side
by side (one thread each), and ships their mean. Measured (README, the model card): the mean
scores the higher rate's validation bits per byte (1.5933 vs 1.5935; the lower rate 1.5976) and
image naming between the two, and its greedy continuation of the check prompt reads as prose
where the higher rate's alone drifted into Jargon File markup. Every model must have the same
config and tokenizer; OUT is replaced.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

import llama4


@torch.no_grad()
def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    out, models = Path(argv[0]), argv[1:]
    loaded = [llama4.load(m, dtype=torch.float32) for m in models]
    tokenizers = [(Path(m) / "tokenizer.model").read_bytes() for m in models]
    for m, model, tok in zip(models[1:], loaded[1:], tokenizers[1:]):
        if model.config != loaded[0].config or tok != tokenizers[0]:
            raise SystemExit(f"{m} differs from {models[0]} in config or tokenizer: only like models average")
    states = [m.state_dict() for m in loaded]
    mean = {
        k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
        for k, v in states[0].items()
    }
    soup = loaded[0]
    soup.load_state_dict(mean)
    if out.exists():
        shutil.rmtree(out)
    llama4.save(soup, out)
    (out / "tokenizer.model").write_bytes(tokenizers[0])
    print(f"wrote {out}: the mean of {', '.join(models)}")


if __name__ == "__main__":
    main(sys.argv[1:])
