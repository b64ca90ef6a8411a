"""The vision stages of training (llama4.train.multimodal): the tower alone, then fused into a decoder.

Images are small PNG files written here (coloured shapes with names), so the tests need no
shared data. The decoder is a `debug`-preset model trained two steps with the 512-rank test BPE.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from test_train import TOKENIZER, small_config

import llama4
from llama4.train.multimodal import (
    ImageDialogs,
    ImageTextStream,
    MixedStream,
    load_tower,
    text_fraction,
    train_tower,
    train_vision,
)
from llama4.train.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

VISION = """
[vision]
image_size = 16
patch_size = 4
dim = 32
n_layers = 1
n_heads = 2
mlp_hidden_dim = 64
pixel_shuffle_ratio = 0.5
adapter_dim = 64
adapter_out_dim = 64
vision_output_dim = 64
max_tiles = 4
"""
SHAPES = {"red disc": ("red", "ellipse"), "blue square": ("blue", "rectangle"), "green bar": ("green", "bar")}


def write_images(folder: Path) -> list[dict]:
    """Dialogs 'What is this?' + image -> name, one per shape (the tower draws its own views)."""
    folder.mkdir(parents=True, exist_ok=True)
    dialogs = []
    for name, (colour, shape) in SHAPES.items():
        img = Image.new("RGB", (16, 16), "white")
        d = ImageDraw.Draw(img)
        box = (1, 6, 14, 9) if shape == "bar" else (2, 2, 13, 13)
        getattr(d, "rectangle" if shape == "bar" else shape)(box, fill=colour)
        path = folder / f"{name.replace(' ', '_')}.png"
        img.save(path)
        user = {
            "role": "user",
            "content": [{"type": "image", "image": str(path)}, {"type": "text", "text": "What is this?"}],
        }
        dialogs.append({"messages": [user, {"role": "assistant", "content": name}]})
    return dialogs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    dialogs = write_images(root / "images")
    images = root / "images.jsonl"
    images.write_text("".join(json.dumps(d) + "\n" for d in dialogs * 4))
    text = root / "text.jsonl"
    text.write_text(
        "".join(json.dumps({"text": f"A short line of plain text, number {i}."}) + "\n" for i in range(40))
    )
    decoder = Trainer(small_config(root / "dec", steps=2), log=lambda _: None)
    decoder.fit()
    return root, images, text, Path(decoder.cfg.out) / "model"


def test_tower_alone_learns_the_names_and_round_trips(setup):
    root, images, _, _ = setup
    cfg = root / "tower.toml"
    evals = root / "eval.jsonl"  # new views: recoloured, scaled and shifted by their own seeds
    evals.write_text(
        "".join(
            json.dumps({**d, "split": "views"}).replace('.png"', f'.png@aug:{1000 + i}"') + "\n"
            for i, d in enumerate(write_images(root / "images") * 3)
        )
    )
    cfg.write_text(
        f'images = ["{images}"]\neval_images = ["{evals}"]\nout = "{root / "tower"}"\nseed = 0\n'
        "text_dim = 64\n[tower_pretraining]\nsteps = 60\nbatch_size = 16\nlr = 3e-3\n" + VISION
    )
    record = train_tower(cfg)
    assert record["step"] == 60 and record["accuracy"] >= 0.9, record
    assert record["eval_accuracy"]["views"]["n"] == 9
    assert record["eval_accuracy"]["views"]["accuracy"] >= 0.8, record
    vision_cfg, state = load_tower(root / "tower")
    assert vision_cfg.image_size == 16 and vision_cfg.tokens_per_tile == 4
    assert state["projector.weight"].shape == (64, 64)


def test_vision_stage_starts_from_the_tower_and_a_frozen_decoder_keeps_its_weights(setup):
    root, images, text, decoder_dir = setup
    dim = llama4.load(decoder_dir).config.text.dim  # the projector maps to the decoder's width
    tower_dir = root / f"tower_{dim}"
    cfg = root / "tower_d.toml"
    cfg.write_text(
        f'images = ["{images}"]\nout = "{tower_dir}"\nseed = 1\ntext_dim = {dim}\n'
        "[tower_pretraining]\nsteps = 3\nbatch_size = 4\nlr = 3e-3\n" + VISION
    )
    train_tower(cfg)
    _, tower_state = load_tower(tower_dir)
    stage = root / "vision.toml"
    common = (
        f'model = "{decoder_dir}"\nimages = ["{images}"]\ndata = ["{text}"]\n'
        f'cache_dir = "{root / "cache"}"\nsteps = 3\nbatch_size = 2\nseq_len = 64\nwarmup_steps = 1\n'
        "eval_every = 0\nprogress = false\n"
    )
    # lr 0: the written model is exactly the decoder plus the loaded tower.
    stage.write_text(
        common
        + f'out = "{root / "v0"}"\ntower = "{tower_dir}"\nlr = 0.0\ntext_every = 0\nbalance_gamma = 0.0\n'
    )
    train_vision(stage)
    out = llama4.load(root / "v0" / "model", dtype=torch.float32)
    for k, v in tower_state.items():
        assert torch.equal(out.vision.state_dict()[k], v), k
    base = llama4.load(decoder_dir, dtype=torch.float32).state_dict()
    for k, v in base.items():
        assert torch.equal(out.state_dict()[k], v), k
    # A frozen decoder (decoder_lr_scale 0) keeps every weight and its routers' balancing bias,
    # while the tower learns.
    stage.write_text(
        common + f'out = "{root / "vf"}"\ntower = "{tower_dir}"\nlr = 1e-2\ndecoder_lr_scale = 0.0\n'
        "text_every = 0\nbalance_gamma = 0.01\n"
    )
    train_vision(stage)
    frozen = llama4.load(root / "vf" / "model", dtype=torch.float32)
    for k, v in base.items():
        assert torch.equal(frozen.state_dict()[k], v), k
    assert not torch.equal(frozen.vision.state_dict()["projector.weight"], tower_state["projector.weight"])
    # With decoder_lr_scale > 0 the decoder moves too.
    stage.write_text(
        common + f'out = "{root / "v1"}"\ntower = "{tower_dir}"\nlr = 1e-2\ndecoder_lr_scale = 0.1\n'
        "text_every = 2\nbalance_gamma = 0.0\n"
    )
    record = train_vision(stage)
    assert record["step"] == 3
    moved = llama4.load(root / "v1" / "model", dtype=torch.float32)
    assert not torch.equal(moved.vision.state_dict()["projector.weight"], tower_state["projector.weight"])
    assert not torch.equal(moved.state_dict()["output.weight"], base["output.weight"])
    # Clear errors: a frozen decoder with text batches (nothing to learn from them), neither or both
    # of a tower and a [vision] table, a tower made for another decoder width.
    stage.write_text(
        common + f'out = "{root / "v2"}"\ntower = "{tower_dir}"\ndecoder_lr_scale = 0.0\ntext_every = 2\n'
    )
    with pytest.raises(ValueError, match="train nothing"):
        train_vision(stage)
    stage.write_text(common + f'out = "{root / "v3"}"\nlr = 0.0\n')
    with pytest.raises(ValueError, match="has no vision tower"):
        train_vision(stage)
    cfg.write_text(
        cfg.read_text()
        .replace(f"text_dim = {dim}", f"text_dim = {2 * dim}")
        .replace(str(tower_dir), str(root / "wide"))
    )
    train_tower(cfg)
    stage.write_text(common + f'out = "{root / "v4"}"\ntower = "{root / "wide"}"\nlr = 0.0\n')
    with pytest.raises(ValueError, match=f"projects to width {2 * dim}"):
        train_vision(stage)
    stage.write_text(common + f'out = "{root / "v2"}"\ntower = "{tower_dir}"\nlr = 0.0\n' + VISION)
    with pytest.raises(ValueError, match="give one of `tower`"):
        train_vision(stage)
    # A fused checkpoint trained further (neither a tower nor a [vision] table): lr 0 writes it
    # back unchanged, tower included; a rate moves both parts.
    fused = root / "v1" / "model"
    common = common.replace(str(decoder_dir), str(fused))
    stage.write_text(common + f'out = "{root / "a0"}"\nlr = 0.0\ntext_fraction = 0.5\nbalance_gamma = 0.0\n')
    train_vision(stage)
    again = llama4.load(root / "a0" / "model", dtype=torch.float32).state_dict()
    for k, v in moved.state_dict().items():
        assert torch.equal(again[k], v), k
    stage.write_text(common + f'out = "{root / "a1"}"\nlr = 1e-2\ntext_fraction = 0.75\n')
    record = train_vision(stage)
    assert record["step"] == 3
    annealed = llama4.load(root / "a1" / "model", dtype=torch.float32).state_dict()
    for k in ("vision.projector.weight", "output.weight"):
        assert not torch.equal(annealed[k], again[k]), k
    stage.write_text(common + f'out = "{root / "a2"}"\ntext_fraction = 0.5\ntext_every = 2\n')
    with pytest.raises(ValueError, match="one of text_every and text_fraction"):
        train_vision(stage)
    stage.write_text(common + f'out = "{root / "a2"}"\ntext_fraction = 1.5\n')
    with pytest.raises(ValueError, match=r"text_fraction must be a number in \[0, 1\]"):
        train_vision(stage)


class _Numbered:
    """A stream of numbered batches with a position (as the real streams' state_dict)."""

    def __init__(self, name: str) -> None:
        self.name, self.i, self.pixels = name, 0, []

    def next(self) -> str:
        self.i += 1
        return f"{self.name}{self.i}"

    def state_dict(self) -> dict[str, int]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.i = state["i"]


@pytest.mark.parametrize("fraction", ["0", "1/3", "1/2", "3/4", "2/7", "1"])
def test_mixed_stream_spreads_text_batches_evenly(fraction):
    stream = MixedStream(_Numbered("image"), _Numbered("text"), Fraction(fraction))
    kinds = [stream.next().rstrip("0123456789") for _ in range(84)]
    f = Fraction(fraction)
    assert kinds.count("text") == 84 * f
    for start in range(0, 84, f.denominator):  # every run of one denominator holds the numerator
        assert kinds[start : start + f.denominator].count("text") == f.numerator
    if f.numerator == 1:  # 1/n is every n-th batch (text_every = n), the n-th first
        assert [i + 1 for i, k in enumerate(kinds) if k == "text"] == list(
            range(f.denominator, 85, f.denominator)
        )


def test_packed_rows_queue_one_tile_per_patch_group(setup):
    _, images, _, decoder_dir = setup
    from llama4.config import VisionConfig
    from llama4.train.data import load_tokenizer

    tok = load_tokenizer(TOKENIZER)
    vision_cfg = VisionConfig(
        image_size=16,
        patch_size=4,
        dim=32,
        n_layers=1,
        n_heads=2,
        mlp_hidden_dim=64,
        pixel_shuffle_ratio=0.5,
        adapter_dim=64,
        adapter_out_dim=64,
        vision_output_dim=64,
        max_tiles=4,
    )
    stream = ImageTextStream(ImageDialogs([images], tok, vision_cfg), 2, 64, tok.eos_id, seed=0)
    patch = tok.special_tokens["<|patch|>"]
    for _ in range(3):
        inputs, targets = stream.next()
        tiles = stream.pixels.popleft()
        assert int((inputs == patch).sum()) == tiles.shape[0] * vision_cfg.tokens_per_tile
        # Loss only on the answers (and their <|eot|>): never on a patch or the user's question.
        assert not bool((targets == patch).any())
        answers = tok.decode(targets[targets >= 0].tolist()).split("<|eot|>")
        assert answers[-1] == "" and len(answers) > 1
        assert {a.strip() for a in answers[:-1]} <= set(SHAPES), answers


def test_text_fraction_reads_decimals_exactly_and_rejects_what_is_not_a_share():
    assert text_fraction({"text_fraction": 0.1}, "c.toml") == Fraction(1, 10)  # not the binary 0.1
    assert text_fraction({"text_fraction": 1}, "c.toml") == 1
    assert text_fraction({"text_every": 3}, "c.toml") == Fraction(1, 3)
    assert text_fraction({}, "c.toml") == 0
    for bad in ({"text_fraction": True}, {"text_fraction": "3/4"}, {"text_fraction": -0.5}):
        with pytest.raises(ValueError, match="c.toml: text_fraction must be a number"):
            text_fraction(bad, "c.toml")
    for bad in ({"text_every": 2.5}, {"text_every": True}, {"text_every": -1}):
        with pytest.raises(ValueError, match="c.toml: text_every must be a whole number"):
            text_fraction(bad, "c.toml")


def test_mixed_stream_resumes_where_it_stopped_and_refuses_another_mix():
    stream = MixedStream(_Numbered("image"), _Numbered("text"), Fraction(3, 4))
    for _ in range(7):
        stream.next()
    state = stream.state_dict()
    expected = [stream.next() for _ in range(9)]
    resumed = MixedStream(_Numbered("image"), _Numbered("text"), Fraction(3, 4))
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(9)] == expected
    with pytest.raises(ValueError, match="resume with the same text_every / text_fraction"):
        MixedStream(_Numbered("image"), _Numbered("text"), Fraction(1, 2)).load_state_dict(state)


class _Dialogs:
    """example(i): dialog i of 5-11 tokens (ids all 1000 + i) and one tile of value i."""

    def __len__(self) -> int:
        return 20

    def example(self, i: int):
        n = 5 + (3 * i) % 7
        return [1000 + i] * n, [True] * n, torch.full((1, 3, 4, 4), float(i))


def test_image_stream_resumes_exactly_with_a_dialog_waiting_for_the_next_row():
    # Rows of 16 tokens hold one or two dialogs: a checkpoint usually falls while a drawn dialog
    # waits for the next row. The resumed stream must start with it, as the unbroken one does.
    def stream():
        return ImageTextStream(_Dialogs(), batch_size=2, seq_len=15, pad_id=0, seed=0)

    unbroken = stream()
    waiting = 0
    for _ in range(12):  # across epochs too (20 dialogs, ~4 per batch)
        state = unbroken.state_dict()
        waiting += state["pending"] is not None
        resumed = stream()
        resumed.load_state_dict(state)
        for a, b in zip(unbroken.next(), resumed.next()):
            assert torch.equal(a, b)
        assert torch.equal(unbroken.pixels.popleft(), resumed.pixels.popleft())
    assert waiting >= 6
    other = ImageTextStream(_Dialogs(), batch_size=2, seq_len=15, pad_id=0, seed=1)
    with pytest.raises(ValueError, match="does not fit this data"):
        other.load_state_dict(state)
