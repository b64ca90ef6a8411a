"""Helpers shared by the server tests and ``benchmarks/serve_load.py``: a tiny random model
with the real Llama 4 tokenizer, and a ``llama4 serve`` subprocess on a free loopback port."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path


def make_random_model(
    path: str | Path, preset: str = "debug-vision", seed: int = 0, std: float = 0.02, **text
) -> Path:
    """Save a randomly initialised model of `preset` (vocabulary forced to Llama 4's 202048,
    `text` overriding other TextConfig fields) to `path`, with Meta's tokenizer.model copied in."""
    import llama4
    from llama4.checkpoint.io import build
    from llama4.config import get_preset
    from llama4.tokenizer import _installed_llama4_model

    path = Path(path)
    cfg = get_preset(preset)
    cfg.text = dataclasses.replace(cfg.text, vocab_size=202048, **text)
    model = build(cfg, device="cpu")
    model.init_buffers("cpu")
    model.init_weights(seed, std=std)
    llama4.save(model, path)
    source = _installed_llama4_model()
    if source is None:
        raise FileNotFoundError("pip 'llama-models' (Meta's Llama 4 tokenizer.model) is not installed")
    shutil.copyfile(source, path / "tokenizer.model")
    return path


def shared_random_model(root: str | Path, name: str = "tiny-llama4", **kwargs) -> Path:
    """``make_random_model(root / name, **kwargs)`` unless a previous call already made it
    (test files of one pytest session share a model this way)."""
    path = Path(root) / name
    if not (path / "tokenizer.model").is_file():
        tmp = Path(root) / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        make_random_model(tmp, **kwargs)
        tmp.rename(path)
    return path


class ServerProcess:
    """``llama4 serve --port 0 ARGS`` in a subprocess; ``url`` once it listens. Use as a context
    manager (the process is terminated on exit); ``output`` keeps what it printed."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, timeout: float = 60) -> None:
        cmd = [sys.executable, "-m", "llama4.cli", "serve", "--port", "0", *args]
        self.output: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.url = ""
        ready = threading.Event()

        def pump() -> None:
            for line in self.proc.stdout:
                self.output.append(line)
                m = re.search(r"listening on (http://\S+)", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        if not ready.wait(timeout) or not self.url:
            self.close()
            raise RuntimeError(f"llama4 serve did not start:\n{''.join(self.output)}")
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.close()
        raise RuntimeError(f"llama4 serve is not healthy:\n{''.join(self.output)}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
