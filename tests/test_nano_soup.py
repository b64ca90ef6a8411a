"""scripts/nano/soup.py, the bundled model's last recipe step: the mean of like models' weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

import llama4
from llama4.checkpoint.io import build
from llama4.config import get_preset

SOUP = Path(__file__).resolve().parents[1] / "scripts" / "nano" / "soup.py"


def saved(path: Path, seed: int, tokenizer: bytes = b"tok", **text_overrides) -> Path:
    cfg = get_preset("debug")
    for k, v in text_overrides.items():
        setattr(cfg.text, k, v)
    model = build(cfg, device="cpu")
    model.init_weights(seed=seed)
    llama4.save(model, path)
    (path / "tokenizer.model").write_bytes(tokenizer)
    return path


def soup(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SOUP), *map(str, args)], capture_output=True, text=True)


def test_soup_is_the_mean_of_the_weights(tmp_path):
    a, b = saved(tmp_path / "a", 0), saved(tmp_path / "b", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("from an earlier run")  # OUT is replaced
    r = soup(tmp_path / "out", a, b)
    assert r.returncode == 0, r.stderr
    out = llama4.load(tmp_path / "out", dtype=torch.float32).state_dict()
    sa = llama4.load(a, dtype=torch.float32).state_dict()
    sb = llama4.load(b, dtype=torch.float32).state_dict()
    assert out.keys() == sa.keys()
    moved = 0
    for k, v in out.items():
        torch.testing.assert_close(v, (sa[k] + sb[k]) / 2, rtol=0, atol=1e-6, msg=k)
        moved += not torch.equal(sa[k], sb[k])
    assert moved > 10  # the two models differ, so the mean is neither
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"tok"
    assert not (tmp_path / "out" / "stale.txt").exists()


def test_soup_refuses_unlike_models(tmp_path):
    a = saved(tmp_path / "a", 0)
    r = soup(tmp_path / "o1", a, saved(tmp_path / "b", 1, vocab_size=640))
    assert r.returncode != 0 and "differs from" in r.stderr
    r = soup(tmp_path / "o2", a, saved(tmp_path / "c", 1, tokenizer=b"other"))
    assert r.returncode != 0 and "differs from" in r.stderr
    r = soup(tmp_path / "o3")
    assert r.returncode != 0 and "soup.py OUT MODEL_DIR" in r.stderr
