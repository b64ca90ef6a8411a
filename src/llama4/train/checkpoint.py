"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

`OUT/checkpoints/step_N/` holds
  model.safetensors   trainable parameters and persistent buffers (router balancing bias)
  optimizer.pt        optimizer state (tensors, numbers, lists: loads with weights_only=True)
  rng.pt              torch (CPU and CUDA), numpy and python RNG states
  trainer.json        step, data position, scheduler, run config, model config (written last)

A checkpoint is first written to `step_N.tmp-PID/`, every file fsynced, then the folder is
renamed to `step_N` and the parent fsynced. A crash at any point leaves either no `step_N` or a
complete one; leftover temp folders are ignored (and removed by the next save). Loading never
unpickles arbitrary objects: safetensors and `torch.load(..., weights_only=True)` only.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d+)$")
FILES = ("model.safetensors", "optimizer.pt", "rng.pt", "trainer.json")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "python": torch.tensor(py_internal, dtype=torch.int64),
        "python_version": py_version,
        "python_gauss": py_gauss,
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `root/step_{step}` atomically; keep only the newest `keep_last` complete ones."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    tmp = root / f"step_{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / FILES[0]))
    torch.save(optimizer_state, tmp / FILES[1])
    torch.save(rng_state(), tmp / FILES[2])
    (tmp / FILES[3]).write_text(json.dumps(trainer_state, indent=1) + "\n")  # last: marks completion
    for name in FILES:
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a resumed run that ends there)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    for stale in root.glob("step_*.tmp-*"):  # left by crashed writers
        shutil.rmtree(stale, ignore_errors=True)
    return final


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and d.is_dir() and all((d / f).is_file() for f in FILES):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """model, optimizer, rng and trainer states of a checkpoint folder (no unpickling)."""
    path = Path(path)
    return {
        "model": load_file(str(path / FILES[0]), device=str(device)),
        "optimizer": torch.load(path / FILES[1], map_location=device, weights_only=True),
        "rng": torch.load(path / FILES[2], map_location="cpu", weights_only=True),
        "trainer": json.loads((path / FILES[3]).read_text()),
    }
