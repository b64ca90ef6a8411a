"""Distillation: the loss's parts and weighting, and a student pulled toward its teacher."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llama4
from llama4.cli import main
from llama4.config import get_preset
from llama4.model.transformer import Transformer
from llama4.train.config import TrainConfig
from llama4.train.data import IGNORE, build_data, load_tokenizer
from llama4.train.distill import DistillObjective, distillation_loss, soft_weights
from llama4.train.trainer import build_model

DATA = Path(__file__).parent / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_parts():
    torch.manual_seed(0)
    s, z = torch.randn(6, 10), torch.randn(6, 10) * 3
    y = torch.tensor([1, 2, IGNORE, 4, 5, 6])
    keep = y != IGNORE
    ce = F.cross_entropy(s[keep], y[keep], reduction="sum")
    hard, _ = distillation_loss(s, z, y, temperature=2.0, weighting="hard", soft_weight=0.5)
    torch.testing.assert_close(hard, ce)
    soft, parts = distillation_loss(s, z, y, temperature=2.0, weighting="fixed", soft_weight=1.0)
    kl = F.kl_div(
        F.log_softmax(s[keep] / 2, -1), F.log_softmax(z[keep] / 2, -1), log_target=True, reduction="sum"
    )
    torch.testing.assert_close(soft, 4 * kl)
    torch.testing.assert_close(parts["kl"], kl)
    mix, _ = distillation_loss(s, z, y, temperature=2.0, weighting="fixed", soft_weight=0.25)
    torch.testing.assert_close(mix, 0.25 * soft + 0.75 * ce)


def test_dynamic_weight_follows_who_knows_the_token():
    p_t = torch.tensor([0.9, 0.9, 0.01, 0.5])
    p_s = torch.tensor([1e-4, 0.9, 0.9, 0.5])
    w = soft_weights("dynamic", 1.0, p_t, p_s)
    assert w[0] > 0.99  # teacher right, student lost: follow the teacher
    assert w[1] == pytest.approx(0.5) and w[3] == pytest.approx(0.5)  # equal: an even mix
    assert w[2] < 0.02  # teacher wrong, student right: the label wins
    assert torch.equal(soft_weights("fixed", 0.3, p_t, p_s), torch.full((4,), 0.3))


def mean_kl(teacher, student, batches) -> float:
    """Mean over target tokens of KL(teacher || student) at temperature 1."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            keep = (y != IGNORE).flatten()
            lt = F.log_softmax(teacher.eval()(x).flatten(0, 1)[keep], -1)
            ls = F.log_softmax(student.eval()(x).flatten(0, 1)[keep], -1)
            total += (lt.exp() * (lt - ls)).sum().item()
            n += int(keep.sum())
    return total / n


def test_distillation_pulls_the_student_toward_the_teacher(tmp_path):
    # A teacher with sharp, arbitrary opinions: a random model with a scaled-up output head. It is
    # wrong about the text, so the dynamic weighting would (rightly) ignore it: use soft targets only.
    cfg = get_preset("debug")
    cfg.text.vocab_size = 2560
    teacher = Transformer(cfg)
    teacher.init_weights(seed=7)
    with torch.no_grad():
        teacher.output.weight.mul_(20.0)
    teacher_dir = tmp_path / "teacher"
    llama4.save(teacher, teacher_dir)
    shutil.copyfile(DATA / "tokenizer_512.model", teacher_dir / "tokenizer.model")

    out = tmp_path / "student"
    args = [
        "distill",
        "--teacher",
        str(teacher_dir),
        "--student",
        "debug",
        "--data",
        str(DATA / "emma_excerpt.txt"),
    ]
    args += ["--out", str(out), "--steps", "40", "--batch-size", "4", "--seq-len", "32", "--lr", "1e-2"]
    args += [
        "--weighting",
        "fixed",
        "--soft-weight",
        "1.0",
        "--temperature",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    args += ["--no-progress", "--log-every", "1", "--eval-batches", "4", "--seed", "0"]
    assert main(args) == 0
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"ce", "kl", "soft_weight", "teacher_ce", "val_loss"} <= set(record)

    tcfg = TrainConfig(
        preset="debug", data=[str(DATA / "emma_excerpt.txt")], seq_len=32, batch_size=4, eval_batches=4,
        cache_dir=str(tmp_path / "cache"), seed=0,
    )  # fmt: skip
    val = build_data(tcfg, load_tokenizer(DATA / "tokenizer_512.model"), "t", log=lambda _: None).val
    initial = build_model(tcfg, torch.device("cpu"), vocab_size=2560)  # the student before training
    before = mean_kl(teacher, initial, val)
    after = mean_kl(teacher, llama4.load(out / "model"), val)
    assert after < 0.75 * before, (before, after)  # measured: 4.08 -> 2.65 nats
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["kl"] < 0.75 * records[0]["kl"]


@pytest.mark.parametrize("weighting", ["fixed", "dynamic"])
def test_chunked_logits_equal_whole(weighting):
    """Logits computed a few positions at a time (recomputed in backward) give the loss and the
    gradients of computing them all at once."""
    torch.manual_seed(0)
    cfg = get_preset("debug")
    teacher, student = Transformer(cfg), Transformer(cfg)
    teacher.init_weights(seed=1)
    student.init_weights(seed=2)
    inputs = torch.randint(0, cfg.text.vocab_size, (2, 24))
    targets = torch.randint(0, cfg.text.vocab_size, (2, 24))
    targets[0, :5] = IGNORE
    results = []
    for rows in (7, 10_000):  # 7 rows: chunks that split sequences and the ignored span
        student.zero_grad()
        objective = DistillObjective(teacher, 1.0, weighting, 0.7, chunk_rows=rows)
        loss, parts = objective(student, inputs, targets)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None])
        results.append((loss.detach(), parts, grads))
    (l1, p1, g1), (l2, p2, g2) = results
    assert torch.allclose(l1, l2, rtol=1e-5)
    assert all(torch.allclose(p1[k], p2[k], rtol=1e-4) for k in p2)
    assert ((g1 - g2).abs().max() / g2.abs().max()).item() <= 1e-5
