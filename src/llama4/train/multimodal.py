"""Image + text training: chat records with image parts -> packed (tokens, targets, pixel tiles).

The text trainer (`llama4.train.trainer.Trainer`) knows tokens only. This module adds images
without changing it, through the two hooks the Trainer already has:

- the **data**: `ImageTextStream` packs image dialogs into rows of `seq_len` tokens and keeps,
  per batch, the pixel tiles of the images whose `<|patch|>` tokens the batch's inputs hold;
  `MixedStream` interleaves it with the Trainer's own text stream (so the decoder does not
  forget its text while it learns to read images). It replaces `trainer.data.train`.
- the **objective**: `ImageTextObjective` runs the vision tower on the batch's tiles and the
  decoder on the tokens with those features at the `<|patch|>` positions (early fusion), and
  returns the summed cross-entropy like the Trainer's own objective.

Batches go through the Trainer's micro-batch loop in the order they were drawn, so the pixels
travel beside the tokens in a FIFO queue shared by stream and objective.

Records (JSONL) are OpenAI-style dialogs whose image parts name their image in ``"image"``:
a file path, or a reference into the project's image data (``IMAGE_DATA``):
``emoji:INDEX`` (emoji64.npz), ``fashion:train:INDEX`` / ``fashion:test:INDEX`` (Fashion-MNIST),
each optionally with ``@aug:SEED``, a deterministic augmented view (scaled, shifted, background
recoloured). The loss is taken on the assistant turns (the chat format's training mask).

Two stages (the bundled model's recipes/nano_tower.toml and recipes/nano_vision.toml)::

    python -m llama4.train.multimodal --tower --config recipes/nano_tower.toml   # tower alone
    python -m llama4.train.multimodal --config recipes/nano_vision.toml          # fused

The tower stage (`train_tower`) trains a fresh vision tower as a classifier of the images'
names, without the decoder. The vision stage's TOML is a run config (`llama4.train.config`) plus
``model`` (the text checkpoint to start from), ``images`` (JSONL files of image dialogs),
``text_every`` (every n-th batch is text from ``data``) or ``text_fraction`` (that fraction of
the batches, e.g. 0.75), ``decoder_lr_scale`` (the decoder's learning rate as a fraction of
``lr``, which the tower gets; 0 freezes the decoder), and either ``tower`` (a folder written by
the tower stage) or a ``[vision]`` table of `VisionConfig` fields for a fresh tower; with
neither, ``model`` must already have a tower (a fused checkpoint trained further, as the
bundled model's last stage, recipes/nano_anneal.toml, does).

Shapes: B rows, L seq_len, N tiles, S tile side.
"""

from __future__ import annotations

import argparse
import collections
import functools
import gzip
import json
import math
import os
import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from llama4.train.data import IGNORE

# The project's image data: the data checkout beside the repository ($LLAMA4_IMAGE_DATA elsewhere).
IMAGE_DATA = Path(
    os.environ.get("LLAMA4_IMAGE_DATA") or Path(__file__).resolve().parents[4] / "shared" / "data" / "images"
)


# -- images -------------------------------------------------------------------------------------------


@functools.cache
def _emoji() -> np.ndarray:
    return np.load(IMAGE_DATA / "emoji64.npz")["images"]  # (3010, 64, 64, 3) uint8, white background


@functools.cache
def _fashion(split: str) -> np.ndarray:
    prefix = {"train": "train", "test": "t10k"}[split]
    with gzip.open(IMAGE_DATA / "fashion-mnist" / f"{prefix}-images-idx3-ubyte.gz") as f:
        return np.frombuffer(f.read()[16:], dtype=np.uint8).reshape(-1, 28, 28)


def augment(image: Image.Image, seed: int) -> Image.Image:
    """A deterministic augmented view: background recoloured, scaled to 60-100%, shifted."""
    rng = random.Random(seed)
    img = image.convert("RGB")
    w, h = img.size
    bg = tuple(rng.randrange(256) for _ in range(3))
    corner = img.getpixel((0, 0))
    if min(corner) >= 240:  # a light background: flood it from the corners with the new colour
        for xy in ((0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)):
            if min(img.getpixel(xy)) >= 240:
                ImageDraw.floodfill(img, xy, bg, thresh=24)
    scale = rng.uniform(0.6, 1.0)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    small = img.resize((sw, sh), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (w, h), bg)
    canvas.paste(small, (rng.randint(0, w - sw), rng.randint(0, h - sh)))
    return canvas


def load_image_ref(ref: str) -> Image.Image:
    """An image from a path or an ``emoji:I`` / ``fashion:SPLIT:I`` reference (``@aug:SEED`` optional)."""
    ref, _, aug = ref.partition("@aug:")
    kind, _, rest = ref.partition(":")
    if kind == "emoji":
        image = Image.fromarray(_emoji()[int(rest)])
    elif kind == "fashion":
        split, _, index = rest.partition(":")
        image = Image.fromarray(_fashion(split)[int(index)]).convert("RGB")
    else:
        image = Image.open(ref).convert("RGB")
    return augment(image, int(aug)) if aug else image


def image_parts(messages: list[dict[str, Any]]) -> list[str]:
    """The image references of a dialog, in order of appearance."""
    refs = []
    for m in messages:
        if isinstance(m.get("content"), list):
            for part in m["content"]:
                if isinstance(part, dict) and part.get("type") in ("image", "image_url", "input_image"):
                    refs.append(part.get("image") or part.get("image_url", {}).get("url"))
    return refs


# -- examples and packing ----------------------------------------------------------------------------


def read_jsonl(files: str | Path | list[str | Path]) -> list[dict[str, Any]]:
    """The records of one or more JSONL files, in order (blank lines skipped)."""
    files = [files] if isinstance(files, (str, Path)) else files
    lines = (line for f in files for line in Path(f).read_text(encoding="utf-8").splitlines())
    return [json.loads(line) for line in lines if line.strip()]


class ImageDialogs:
    """JSONL image dialogs -> (ids, loss mask, pixel tiles (N, 3, S, S)) per record."""

    def __init__(self, files: list[str | Path], tokenizer, vision_cfg) -> None:
        from llama4.chat import ChatFormat

        self.records = [r["messages"] for r in read_jsonl(files)]
        self.chat = ChatFormat(tokenizer)
        self.vision = vision_cfg

    def __len__(self) -> int:
        return len(self.records)

    def example(self, i: int) -> tuple[list[int], list[bool], torch.Tensor]:
        from llama4.image import preprocess_image

        messages = self.records[i]
        grids, tiles = [], []
        for ref in image_parts(messages):
            img = preprocess_image(
                load_image_ref(ref), tile_size=self.vision.image_size, max_tiles=self.vision.max_tiles
            )
            grids.append(img.grid)
            tiles.append(img.pixel_values)
        ids, mask = self.chat.encode_dialog_for_training(
            messages, image_grids=grids, tokens_per_tile=self.vision.tokens_per_tile
        )
        s = self.vision.image_size
        pixels = torch.cat(tiles) if tiles else torch.zeros(0, 3, s, s)
        return ids, mask, pixels


class ImageTextStream:
    """Endless batches (inputs, targets) of packed image dialogs; tiles queued in `pixels`.

    Whole dialogs are packed back to back into rows of L + 1 tokens (a dialog that does not fit
    starts the next row; the rest of a row is `<|end_of_text|>` padding without loss), in an order
    drawn from (seed, epoch). Each batch's tiles, in the order of its `<|patch|>` tokens, are
    appended to `self.pixels` for the objective.
    """

    def __init__(self, dialogs: ImageDialogs, batch_size: int, seq_len: int, pad_id: int, seed: int) -> None:
        self.dialogs, self.batch_size, self.seq_len, self.pad_id, self.seed = (
            dialogs,
            batch_size,
            seq_len,
            pad_id,
            seed,
        )
        self.epoch, self.cursor = 0, 0
        self.order = np.random.default_rng([seed, 0]).permutation(len(dialogs))
        # A dialog drawn from the order that did not fit the last row: it starts the next one.
        # (index, example); the index is part of the data position (`state_dict`).
        self.pending: tuple[int, tuple[list[int], list[bool], torch.Tensor]] | None = None
        self.pixels: collections.deque[torch.Tensor | None] = collections.deque()

    def _next_example(self) -> tuple[int, tuple[list[int], list[bool], torch.Tensor]]:
        if self.pending is not None:
            drawn, self.pending = self.pending, None
            return drawn
        if self.cursor == len(self.order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dialogs))
        index = int(self.order[self.cursor])
        self.cursor += 1
        return index, self.dialogs.example(index)

    def _row(self) -> tuple[list[int], list[bool], list[torch.Tensor]]:
        ids: list[int] = []
        mask: list[bool] = []
        tiles: list[torch.Tensor] = []
        width = self.seq_len + 1
        while True:
            index, ex = self._next_example()
            if len(ex[0]) > width:
                continue  # longer than a row: skipped
            if len(ids) + len(ex[0]) > width:
                self.pending = index, ex
                break
            ids += ex[0]
            mask += ex[1]
            tiles.append(ex[2])
        pad = width - len(ids)
        return ids + [self.pad_id] * pad, mask + [False] * pad, tiles

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self._row() for _ in range(self.batch_size)]
        tokens = torch.tensor([r[0] for r in rows], dtype=torch.long)  # (B, L + 1)
        mask = torch.tensor([r[1] for r in rows], dtype=torch.bool)
        inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
        targets[~mask[:, 1:]] = IGNORE
        # Dialogs end with <|eot|>, so no image is cut by the row's last (target-only) token.
        self.pixels.append(torch.cat([t for r in rows for t in r[2]]))
        return inputs, targets

    def state_dict(self) -> dict[str, int | None]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "pending": None if self.pending is None else self.pending[0],
            "seed": self.seed,
            "dialogs": len(self.dialogs),
        }

    def load_state_dict(self, state: dict[str, int | None]) -> None:
        if state["dialogs"] != len(self.dialogs) or state["seed"] != self.seed:
            raise ValueError(
                f"data position {state} does not fit this data ({len(self.dialogs)} dialogs, seed {self.seed})"
            )
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dialogs))
        pending = state.get("pending")  # absent in positions saved before it was recorded
        self.pending = None if pending is None else (pending, self.dialogs.example(pending))


class MixedStream:
    """Image batches, with a `fraction` of the batches taken from a text stream instead.

    Batch k (1-based) is text when floor(k * fraction) > floor((k - 1) * fraction): evenly
    spread, exact (a Fraction), and for fraction 1/n every n-th batch.
    """

    def __init__(self, images: ImageTextStream, text, fraction: Fraction) -> None:
        self.images, self.text, self.fraction = images, text, Fraction(fraction)
        self.count = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.count += 1
        k, f = self.count, self.fraction
        if math.floor(k * f) > math.floor((k - 1) * f):
            self.images.pixels.append(None)
            return self.text.next()
        return self.images.next()

    def state_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "fraction": str(self.fraction),
            "images": self.images.state_dict(),
            "text": self.text.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = Fraction(state.get("fraction", str(self.fraction)))  # older checkpoints: not saved
        if saved != self.fraction:
            raise ValueError(
                f"the checkpoint's run took {saved} of its batches from text, this run {self.fraction}: "
                "resume with the same text_every / text_fraction"
            )
        self.count = state["count"]
        self.images.load_state_dict(state["images"])
        self.text.load_state_dict(state["text"])


class ImageTextObjective:
    """Summed cross-entropy of a batch, the vision tower's features fused at `<|patch|>` tokens."""

    def __init__(self, pixels: collections.deque) -> None:
        self.pixels = pixels

    def __call__(self, model, inputs: torch.Tensor, targets: torch.Tensor):
        from llama4.train.trainer import cross_entropy_sum

        tiles = self.pixels.popleft()
        if tiles is None or tiles.shape[0] == 0:
            return cross_entropy_sum(model, inputs, targets), {}
        features = model.image_features(tiles.to(inputs.device))  # (N, K, D)
        h = model.hidden(inputs, image_features=features)  # (B, L, D)
        logits = model.output(h).float()
        return F.cross_entropy(
            logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum"
        ), {}


# -- model ----------------------------------------------------------------------------------------------


def add_vision_tower(text_model_dir: str | Path, vision_cfg, image_token_id: int, seed: int = 0):
    """The text checkpoint's decoder with a freshly initialised vision tower (float32, train mode).

    image_token_id: the tokenizer's `<|patch|>` id (200092 only for Llama 4's own vocabulary).
    """
    import llama4
    from llama4.checkpoint.io import build
    from llama4.config import ModelConfig

    text_model = llama4.load(text_model_dir, dtype=torch.float32)
    cfg = ModelConfig(text=text_model.config.text, vision=vision_cfg, image_token_id=image_token_id)
    torch.manual_seed(seed)
    model = build(cfg, device="cpu")  # modules initialise themselves (the vision tower's init)
    missing, unexpected = model.load_state_dict(text_model.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("vision.") for k in missing), (missing[:5], unexpected[:5])
    return model.train()


def pretrain_tower(
    tower,
    records: list[list[dict[str, Any]]],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    evals: dict[str, list[list[dict[str, Any]]]] | None = None,
    log=print,
) -> dict[str, Any]:
    """Train a fresh vision tower (and its adapter) as a classifier of the dialogs' answers.

    Llama 4's vision encoder is trained apart from the language model before early fusion; here
    the tower learns to tell the training images' names apart through a linear head over its mean
    output feature (dropped afterwards), on a fresh augmented view of an image 9 times in 10. An
    image costs the tower a few MFLOPs against ~1 GFLOP for a dialog through the decoder, so the
    tower sees each image hundreds of times for the price of a few decoder steps. `records`: chat
    dialogs with one image and one assistant reply. Returns the last logged record: loss and
    accuracy on that step's batch (training images, most of them freshly augmented, scored
    before the update) and, for each split of `evals` (dialogs of the same form, images used as
    given), the head's accuracy on them ("eval_accuracy").
    """
    from llama4.image import preprocess_image
    from llama4.train.trainer import warmup_cosine

    pairs = _image_name_pairs(records)
    if not pairs:
        raise ValueError("tower pretraining needs dialogs with one image and one assistant reply")
    refs = [ref.partition("@aug:")[0] for ref, _ in pairs]  # the images as drawn; views drawn below
    answers = [name for _, name in pairs]
    classes = sorted(set(answers))
    labels = torch.tensor([classes.index(a) for a in answers])
    cfg = tower.cfg
    head = torch.nn.Linear(tower.projector.out_features, len(classes))
    params = [*tower.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, steps // 20), steps, 0.1))
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    log(f"tower pretraining: {len(refs)} images, {len(classes)} names, {steps} steps of {batch_size}")

    def classify(images: list[Image.Image]) -> torch.Tensor:
        tiles, owner = [], []
        for j, image in enumerate(images):
            t = preprocess_image(image, tile_size=cfg.image_size, max_tiles=cfg.max_tiles).pixel_values
            tiles.append(t)
            owner += [j] * t.shape[0]
        feats = tower(torch.cat(tiles)).mean(1)  # (tiles, D): each tile's mean token
        owner_t = torch.tensor(owner)
        pooled = torch.zeros(len(images), feats.shape[1]).index_add(0, owner_t, feats)
        pooled = pooled / torch.bincount(owner_t, minlength=len(images))[:, None]  # (B, D) per image
        return head(pooled)

    record: dict[str, Any] = {}
    tower.train()
    for step in range(1, steps + 1):
        idx = torch.randint(len(refs), (batch_size,), generator=gen).tolist()
        images = [load_image_ref(refs[i]) for i in idx]
        images = [augment(im, rng.randrange(1 << 30)) if rng.random() < 0.9 else im for im in images]
        logits = classify(images)
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps:
            acc = (logits.argmax(-1) == labels[idx]).float().mean().item()
            record = {"step": step, "loss": round(loss.item(), 4), "accuracy": round(acc, 4)}
            log(json.dumps({"tower_pretraining": record}))
    if evals:
        tower.eval()
        record["eval_accuracy"] = {}
        with torch.no_grad():
            for split, dialogs in sorted(evals.items()):
                known = [(ref, name) for ref, name in _image_name_pairs(dialogs) if name in classes]
                hits = 0
                for b in range(0, len(known), 64):
                    part = known[b : b + 64]
                    pred = classify([load_image_ref(ref) for ref, _ in part]).argmax(-1).tolist()
                    hits += sum(classes[p] == name for p, (_, name) in zip(pred, part))
                record["eval_accuracy"][split] = {
                    "accuracy": round(hits / max(1, len(known)), 4),
                    "n": len(known),
                }
        log(json.dumps({"tower_pretraining": record}))
    return record


def _image_name_pairs(records: list[list[dict[str, Any]]]) -> list[tuple[str, str]]:
    """(image reference, answer) of the dialogs with one image and one assistant reply (a string)."""
    pairs = []
    for messages in records:
        parts = image_parts(messages)
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        if len(parts) == 1 and len(replies) == 1 and isinstance(replies[0], str):
            pairs.append((parts[0], replies[0]))
    return pairs


# -- command -------------------------------------------------------------------------------------------


def read_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(run-config values for TrainConfig, this stage's own keys) from a TOML file."""
    import tomllib

    from llama4.train.config import FIELDS

    with open(path, "rb") as f:
        raw = tomllib.load(f)
    own_keys = ("images", "text_every", "text_fraction", "decoder_lr_scale", "vision", "tower")
    own = {k: raw.pop(k) for k in own_keys if k in raw}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise ValueError(f"{path}: unknown key {key!r}")
        values[name] = [value] if name in ("data", "val_data") and isinstance(value, str) else value
    return values, own


def scale_decoder_lr(trainer, scale: float) -> None:
    """Give the decoder `scale` x the learning rate of the fresh vision tower (0: freeze it).

    A fresh tower needs a high rate; the trained decoder forgets its text at that rate. Rebuilds
    the Trainer's optimizer and schedule with the same settings and two rates.
    """
    from llama4.train.trainer import param_groups, warmup_cosine

    if scale == 1.0:
        return
    cfg, model = trainer.cfg, trainer.model
    if scale == 0.0:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("vision."))
        trainer.balancer.gamma = 0.0  # the routers' balancing bias is decoder state too
    groups = []
    for g in param_groups(model, cfg.weight_decay):
        vision = [p for p in g["params"] if any(p is q for q in model.vision.parameters())]
        decoder = [p for p in g["params"] if not any(p is q for q in vision)]
        groups.append({**g, "params": vision, "lr": cfg.lr})
        if scale > 0 and decoder:
            groups.append({**g, "params": decoder, "lr": cfg.lr * scale})
    trainer.trainable = [p for p in model.parameters() if p.requires_grad]
    trainer.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(
        trainer.optimizer, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
    )


def train_tower(config: str | Path, out: str | None = None, steps: int | None = None) -> dict[str, Any]:
    """The tower stage: pretrain a fresh vision tower alone (`pretrain_tower`), write it to OUT.

    TOML keys: ``images`` (JSONL image dialogs), ``out``, ``seed``, ``text_dim`` (the decoder
    width the projector maps to), a ``[vision]`` table (VisionConfig), ``[tower_pretraining]``
    (``steps``, ``batch_size``, ``lr``) and optionally ``eval_images`` (JSONL dialogs with a
    "split" field, scored per split at the end). Writes OUT/tower.safetensors,
    OUT/vision_config.json and OUT/metrics.json; the vision stage starts from it with
    ``tower = "OUT"`` (and checks the projector's width against its decoder).
    """
    import dataclasses
    import time
    import tomllib

    from llama4.train.parallel import refuse_multi_process

    refuse_multi_process()

    from safetensors.torch import save_file

    from llama4.config import VisionConfig
    from llama4.model.vision import VisionTower

    with open(config, "rb") as f:
        raw = tomllib.load(f)
    unknown = set(raw) - {"images", "eval_images", "out", "seed", "text_dim", "vision", "tower_pretraining"}
    missing = {"images", "out", "text_dim", "vision", "tower_pretraining"} - set(raw)
    if unknown or missing:
        raise ValueError(
            f"{config}: the tower stage takes no keys {sorted(unknown)} and needs {sorted(missing)}"
        )
    seed, tp, vision_cfg = (
        raw.get("seed", 0),
        dict(raw["tower_pretraining"]),
        VisionConfig.from_dict(raw["vision"]),
    )
    if set(tp) != {"steps", "batch_size", "lr"}:
        raise ValueError(
            f"{config}: [tower_pretraining] needs exactly steps, batch_size and lr, got {sorted(tp)}"
        )
    if steps is not None:
        tp["steps"] = steps
    torch.manual_seed(seed)
    tower = VisionTower(vision_cfg, raw["text_dim"])
    records = [r["messages"] for r in read_jsonl(raw["images"])]
    evals: dict[str, list] = {}
    for r in read_jsonl(raw.get("eval_images", [])):
        evals.setdefault(r.get("split", "eval"), []).append(r["messages"])
    t0 = time.perf_counter()
    record = pretrain_tower(tower, records, seed=seed, evals=evals, **tp)
    record["elapsed_s"] = round(time.perf_counter() - t0, 1)
    dst = Path(out or raw["out"])
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, dst / "tower.safetensors")
    fields = {f.name: getattr(vision_cfg, f.name) for f in dataclasses.fields(vision_cfg) if f.init}
    (dst / "vision_config.json").write_text(json.dumps(fields, indent=1))
    (dst / "metrics.json").write_text(json.dumps(record) + "\n")
    return record


def load_tower(path: str | Path):
    """(VisionConfig, state dict) of a tower written by `train_tower`."""
    from safetensors.torch import load_file

    from llama4.config import VisionConfig

    path = Path(path)
    saved = json.loads((path / "vision_config.json").read_text())
    state = load_file(path / "tower.safetensors")
    return VisionConfig.from_dict(saved), state


def text_fraction(own: dict[str, Any], config: str | Path) -> Fraction:
    """The share of text batches: `text_fraction` (a number in [0, 1]) or 1 / `text_every`."""
    if "text_every" in own and "text_fraction" in own:
        raise ValueError(f"{config}: give one of text_every and text_fraction")
    if "text_fraction" in own:
        value = own["text_fraction"]
        # str(): a TOML float such as 0.1 means 1/10, not its binary approximation
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
            raise ValueError(f"{config}: text_fraction must be a number in [0, 1], got {value!r}")
        return Fraction(str(value))
    every = own.get("text_every", 0)
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"{config}: text_every must be a whole number >= 0, got {every!r}")
    return Fraction(1, every) if every else Fraction(0)


def train_vision(config: str | Path, **overrides: Any) -> dict[str, Any]:
    """Run the vision stage described by a TOML file; returns the Trainer's last metrics record."""
    from llama4.config import VisionConfig
    from llama4.train.config import TrainConfig
    from llama4.train.trainer import Trainer

    values, own = read_config(config)
    values.update({k: v for k, v in overrides.items() if v is not None})
    cfg = TrainConfig(**values)
    if "tower" in own and "vision" in own:
        raise ValueError(f"{config}: give one of `tower` (a pretrained tower's folder) and a [vision] table")
    fraction = text_fraction(own, config)
    scale = float(own.get("decoder_lr_scale", 1.0))
    if scale == 0.0 and fraction > 0:
        raise ValueError(
            f"{config}: decoder_lr_scale = 0 freezes the decoder, so text batches "
            "(text_every, text_fraction) train nothing"
        )
    if "tower" in own or "vision" in own:
        vision_cfg, tower_state = (
            load_tower(own["tower"]) if "tower" in own else (VisionConfig.from_dict(own["vision"]), None)
        )
        from llama4.train.data import load_tokenizer
        from llama4.train.trainer import tokenizer_path_for

        patch_id = load_tokenizer(tokenizer_path_for(cfg, cfg.model)).special_tokens["<|patch|>"]
        model = add_vision_tower(cfg.model, vision_cfg, patch_id, cfg.seed)
    else:  # a fused checkpoint, trained further
        import llama4

        model, tower_state = llama4.load(cfg.model, dtype=torch.float32).train(), None
        if model.vision is None:
            raise ValueError(
                f"{config}: {cfg.model} has no vision tower; give `tower` (a pretrained tower's "
                "folder) or a [vision] table for a fresh one"
            )
        vision_cfg = model.config.vision
    if tower_state is not None:
        width, dim = tower_state["projector.weight"].shape[0], model.config.text.dim
        if width != dim:
            raise ValueError(
                f"the tower in {own['tower']} projects to width {width}; {cfg.model} is {dim} wide"
            )
        model.vision.load_state_dict(tower_state)
    trainer = Trainer(cfg, model=model, sft=True)  # data: chat JSONL (text) for the mix
    dialogs = ImageDialogs(own["images"], trainer.tokenizer, vision_cfg)
    images = ImageTextStream(dialogs, cfg.batch_size, cfg.seq_len, trainer.tokenizer.eos_id, cfg.seed)
    trainer.data.train = MixedStream(images, trainer.data.train, fraction)
    trainer.objective = ImageTextObjective(images.pixels)
    scale_decoder_lr(trainer, scale)
    trainer.log(
        f"vision stage: {len(dialogs)} image dialogs, tiles {vision_cfg.image_size}px, "
        f"{vision_cfg.tokens_per_tile} tokens per tile, {fraction} of the batches text"
    )
    return trainer.fit()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="The vision stages: a tower alone (--tower), or a tower fused into a text checkpoint."
    )
    p.add_argument(
        "--config",
        required=True,
        help="TOML: run config + model, images, text_every or text_fraction, and a tower or [vision] "
        "unless the model has one",
    )
    p.add_argument("--tower", action="store_true", help="the tower stage: pretrain a vision tower alone")
    p.add_argument("--steps", type=int)
    p.add_argument("--out")
    p.add_argument("--model")
    p.add_argument("--lr", type=float, help="peak learning rate (the vision stage; default: the config's)")
    args = p.parse_args(argv)
    if args.tower:
        if args.lr is not None:
            p.error("--lr applies to the vision stage; the tower stage's rate is in [tower_pretraining]")
        print(json.dumps(train_tower(args.config, out=args.out, steps=args.steps)))
        return 0
    print(json.dumps(train_vision(args.config, steps=args.steps, out=args.out, model=args.model, lr=args.lr)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
