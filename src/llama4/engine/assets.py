"""Where the bundled default model lives, and loading a model directory with its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

BUNDLED = Path(__file__).resolve().parent.parent / "assets" / "nano"


def default_model_path() -> Path:
    """The bundled model directory ``llama4/assets/nano/`` (checkpoint + tokenizer.model).

    Raises FileNotFoundError when no default model is installed.
    """
    if (BUNDLED / "config.json").is_file():
        return BUNDLED
    raise FileNotFoundError(
        f"no default model is installed (expected a checkpoint in {BUNDLED}); "
        "pass one with --model PATH (a Hugging Face Llama 4 checkpoint directory, e.g. one "
        "written by llama4.save)"
    )


def load_model_and_tokenizer(path: str | Path | None, dtype: str | None = None) -> tuple[Any, Any, Path]:
    """(model, tokenizer, path) for a checkpoint directory, or the bundled model if None.

    The tokenizer is the directory's own ``tokenizer.model`` if it has one, else Meta's Llama 4
    tokenizer from ``llama-models``.
    """
    import llama4
    from llama4.tokenizer import Tokenizer

    path = Path(path) if path is not None else default_model_path()
    model = llama4.load(path, dtype=dtype)
    tokenizer = Tokenizer.find(path)
    if tokenizer.n_words > model.config.text.vocab_size:
        raise ValueError(
            f"tokenizer of {path} has {tokenizer.n_words} tokens but the model's vocabulary is "
            f"{model.config.text.vocab_size}: put the model's own tokenizer.model in {path}"
        )
    return model, tokenizer, path
