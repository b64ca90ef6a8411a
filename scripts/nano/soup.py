"""Average the weights of models fine-tuned from one starting point (a "model soup").

    python scripts/nano/soup.py OUT MODEL_DIR [MODEL_DIR ...]

The bundled model's last stage anneals the same fused checkpoint twice, at two peak rates, side by
side (one thread each); their mean is better than either on validation bits per byte and keeps
the higher rate's image naming with the lower rate's prose (README, the model card). Every
model must have the same config; the tokenizer is the first model's.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

import llama4


@torch.no_grad()
def main(out: str, *models: str) -> None:
    if not models:
        raise SystemExit(__doc__)
    loaded = [llama4.load(m, dtype=torch.float32) for m in models]
    soup = loaded[0]
    for m, other in zip(models[1:], loaded[1:]):
        if other.config != soup.config:
            raise SystemExit(f"{m} has another config than {models[0]}: only like models average")
    states = [m.state_dict() for m in loaded]
    soup.load_state_dict(
        {
            k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v
            for k, v in states[0].items()
        }
    )
    llama4.save(soup, out)
    shutil.copyfile(Path(models[0]) / "tokenizer.model", Path(out) / "tokenizer.model")
    print(f"wrote {out}: the mean of {', '.join(models)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
