"""Flags and loading shared by ``llama4 generate`` and ``llama4 chat`` (no torch at import)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (argparse then reports a bad value as a usage error)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
    return value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="weight dtype (default: as stored)"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; slow first call)")


def add_sampling_arguments(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument(
        "--max-tokens", type=int, default=max_tokens, help=f"new tokens at most (default {max_tokens})"
    )
    p.add_argument("--temperature", type=float, default=0.6, help="0: greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats")
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible output)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_params(args: argparse.Namespace, stop_ids: tuple[int, ...]) -> Any:
    from llama4.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        frequency_penalty=args.frequency_penalty,
        presence_penalty=args.presence_penalty,
        seed=args.seed,
        stop_ids=stop_ids,
        stop=tuple(args.stop),
    )


class CliError(Exception):
    """A user-facing failure: printed as ``llama4 VERB: message`` with exit code 2."""


def load(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, path) for --model (or the bundled model), on --device."""
    import torch

    from llama4.engine.assets import load_model_and_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer, path = load_model_and_tokenizer(args.model, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as e:
        raise CliError(str(e)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return to_device(model, device), tokenizer, path


def to_device(model: Any, device: str) -> Any:
    """`model` on `device`, or a CliError that says why not."""
    try:
        return model.to(device)
    except (RuntimeError, ValueError, AssertionError) as e:  # unknown device, no GPU, no CUDA build
        raise CliError(f"cannot use --device {device!r}: {str(e).splitlines()[0]}") from None


def default_max_len(model: Any) -> int:
    """Tokens per sequence when --max-len is not given: the model's context, at most 8192 (the
    cache is allocated up front: Scout's 10M-token context would not fit)."""
    return min(model.config.text.max_seq_len, 8192)


def fail(verb: str, message: str) -> int:
    print(f"llama4 {verb}: {message}", file=sys.stderr)
    return 2


def image_inputs(model: Any, paths: list[str]) -> tuple[list[tuple[int, int]], Any]:
    """(grids, features (P, D)) of image files, for the chat layout and the prefill."""
    import torch

    from llama4.image import ImageError, preprocess_image

    vision = model.config.vision
    if vision is None:
        raise CliError("this model has no vision tower: --image/--/image need a multimodal checkpoint")
    grids, feats = [], []
    for path in paths:
        try:
            image = preprocess_image(path, tile_size=vision.image_size, max_tiles=vision.max_tiles)
        except (ImageError, OSError) as e:
            raise CliError(f"cannot read image {path}: {e}") from None
        with torch.inference_mode():
            f = model.image_features(image.pixel_values.to(model.tok_embeddings.weight.device))
        grids.append(image.grid)
        feats.append(f.reshape(-1, f.shape[-1]))
    return grids, (torch.cat(feats) if feats else None)
