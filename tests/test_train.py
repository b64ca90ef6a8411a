"""The trainer: data pipeline, loss on real text, checkpoints, exact resume after SIGKILL, plots.

Runs on the `debug` preset with a 512-rank BPE trained on the excerpt in tests/data (vocab 2560
with the 2048 special tokens). Single-threaded so that timings and results do not depend on a
busy machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from llama4.train import checkpoint as ckpt
from llama4.train.config import TrainConfig, make_config, read_run_config
from llama4.train.data import (
    IGNORE,
    BatchStream,
    build_data,
    build_store,
    expand_paths,
    load_tokenizer,
    tokenizer_fingerprint,
)
from llama4.train.trainer import Trainer

DATA = Path(__file__).parent / "data"
TEXT = DATA / "emma_excerpt.txt"
VAL_TEXT = DATA / "persuasion_excerpt.txt"
TOKENIZER = DATA / "tokenizer_512.model"
REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def small_config(tmp_path: Path, **kw) -> TrainConfig:
    values = dict(
        preset="debug",
        data=[str(TEXT)],
        tokenizer=str(TOKENIZER),
        out=str(tmp_path / "run"),
        cache_dir=str(tmp_path / "cache"),
        steps=20,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        log_every=1,
        eval_every=0,
        eval_batches=4,
        progress=False,
    )
    values.update(kw)
    return TrainConfig(**values)


# -- data -----------------------------------------------------------------------------------------


def test_documents_are_framed_and_cached(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    b.parent.mkdir()
    a.write_text("First document.")
    b.write_text("Second one, longer than the first.")
    tok = load_tokenizer(TOKENIZER)
    files = expand_paths([str(tmp_path)])
    assert files == [a.resolve(), b.resolve()]
    assert expand_paths([str(tmp_path / "**" / "*.txt")]) == files
    logs = []
    store = build_store(files, tok, "t", tmp_path / "cache", log=logs.append)
    ids = store.tokens.tolist()
    expected = tok.encode(a.read_text(), bos=True, eos=True) + tok.encode(b.read_text(), bos=True, eos=True)
    assert ids == expected and store.tokens.dtype == np.uint32 and isinstance(store.tokens, np.memmap)
    assert len(logs) == 1
    again = build_store(files, tok, "t", tmp_path / "cache", log=logs.append)
    assert len(logs) == 1 and again.tokens.tolist() == ids  # mapped, not re-tokenised
    os.utime(a, ns=(1, 1))  # a changed mtime is a different corpus
    build_store(files, tok, "t", tmp_path / "cache", log=logs.append)
    assert len(logs) == 2
    # Documents are the files' exact text (\r\n kept); JSON lines split at \n only (a JSON
    # string may hold a raw U+2028, where str.splitlines would cut).
    c, d = tmp_path / "c" / "c.txt", tmp_path / "c" / "d.jsonl"
    c.parent.mkdir()
    c.write_bytes(b"line one\r\nline two\r\n")
    d.write_bytes('{"text": "a\u2028b"}\r\n{"text": "c"}\n'.encode())
    store = build_store([c, d], tok, "t", tmp_path / "cache", log=logs.append)
    expected = [tok.encode(t, bos=True, eos=True) for t in ("line one\r\nline two\r\n", "a\u2028b", "c")]
    assert store.tokens.tolist() == [i for ids in expected for i in ids]


def test_data_order_is_seeded_and_position_restores_exactly(tmp_path):
    cfg = small_config(tmp_path, batch_size=3)
    data = build_data(cfg, load_tokenizer(TOKENIZER), "t", log=lambda _: None)
    stream = data.train
    n = len(stream.seqs)
    assert len(data.val) > 0 and data.val_tokens > 0
    for _ in range(n // 3 + 2):  # into the second epoch
        stream.next()
    state = stream.state_dict()
    expected = [stream.next() for _ in range(5)]
    other = BatchStream(stream.seqs, 3, cfg.seed)
    other.load_state_dict(state)
    for (xi, yi), (xo, yo) in zip(expected, (other.next() for _ in range(5))):
        assert torch.equal(xi, xo) and torch.equal(yi, yo)
    first = BatchStream(stream.seqs, 3, cfg.seed).next()[0]
    assert not torch.equal(first, BatchStream(stream.seqs, 3, cfg.seed + 1).next()[0])
    x, y = first, BatchStream(stream.seqs, 3, cfg.seed).next()[1]
    assert torch.equal(x[:, 1:], torch.where(y[:, :-1] == IGNORE, x[:, 1:], y[:, :-1]))  # shifted by one


def test_sft_loss_mask_covers_only_assistant_tokens(tmp_path):
    from llama4.chat import ChatFormat

    tok = load_tokenizer(TOKENIZER)
    dialogs = [
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"Question number {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "Welcome."},
        ]
        for i in range(6)
    ]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"messages": d}) + "\n" for d in dialogs))
    cfg = small_config(tmp_path, data=[str(path)], seq_len=16, batch_size=1, val_fraction=0.0)
    data = build_data(cfg, tok, "t", sft=True, log=lambda _: None)
    seqs = data.train.seqs
    _, targets = seqs.get(np.arange(len(seqs)))
    kept = targets.flatten()[targets.flatten() != IGNORE].tolist()

    chat = ChatFormat(tok)
    ids, mask = [], []
    for d in dialogs:
        i, m = chat.encode_dialog_for_training(d)
        ids += i
        mask += m
    n = len(seqs) * cfg.seq_len
    assert kept == [t for t, m in zip(ids[1 : n + 1], mask[1 : n + 1]) if m]
    text = tok.decode(kept)
    assert "Answer 0." in text and "Welcome.<|eot|>" in text
    assert "Question" not in text and "terse" not in text and "Thanks" not in text and "user" not in text


def test_sft_data_takes_plain_text_files_with_loss_on_every_token(tmp_path):
    tok = load_tokenizer(TOKENIZER)
    chat = tmp_path / "chat.jsonl"
    dialog = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Good day."}]
    chat.write_text(json.dumps({"messages": dialog}) + "\n")
    prose = tmp_path / "prose.txt"
    prose.write_text("It was a fine morning, and the rain had stopped.")
    store = build_store([chat, prose], tok, "t", tmp_path / "cache", sft=True, log=lambda _: None)
    from llama4.chat import ChatFormat

    chat_ids, chat_mask = ChatFormat(tok).encode_dialog_for_training(dialog)
    prose_ids = tok.encode(prose.read_text(), bos=True, eos=True)
    assert store.tokens.tolist() == list(chat_ids) + prose_ids
    assert store.mask.tolist() == [int(bool(m)) for m in chat_mask] + [1] * len(prose_ids)
    assert 0 in store.mask.tolist()[: len(chat_ids)]  # the user turn carries no loss


def test_run_config_file_and_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "debug"\nsteps = 7\nlr = 0.01\ndata = "x.txt"\n[model]\nn_layers = 2\n')
    from llama4.cli import build_parser

    args = build_parser().parse_args(["train", "--config", str(toml), "--steps", "9", "--seq-len", "16"])
    cfg = make_config(args)
    assert (cfg.steps, cfg.lr, cfg.seq_len, cfg.data, cfg.batch_size) == (9, 0.01, 16, ["x.txt"], 8)
    mcfg = cfg.model_config()
    assert mcfg.text.n_layers == 2 and mcfg.text.is_global == (False, False) and len(mcfg.text.is_moe) == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("stepz = 3\n")
    with pytest.raises(ValueError, match="stepz"):
        read_run_config(bad)
    assert read_run_config(REPO / "recipes" / "debug_pretrain.toml")["preset"] == "debug"


# -- training ------------------------------------------------------------------------------------


def test_loss_falls_on_real_text_and_outputs_load(tmp_path):
    cfg = small_config(
        tmp_path,
        steps=30,
        batch_size=8,
        seq_len=64,
        val_data=[str(VAL_TEXT)],
        eval_every=15,
        warmup_steps=3,
        balance_gamma=0.0,  # transformers has no router bias: compare logits on a model without one
    )
    trainer = Trainer(cfg, log=lambda _: None)
    initial = trainer.evaluate()
    final = trainer.fit()
    records = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[-1]["val_loss"] < initial - 2.0, (initial, records[-1])
    assert records[-1]["loss"] < records[0]["loss"] - 2.0
    for key in ("lr", "tokens_per_s", "grad_norm"):
        assert key in final
    assert [e["layer"] for e in final["experts"]] == [0, 1, 2, 3]
    assert {"max_load", "min_load", "dead"} <= set(final["experts"][0])

    import llama4

    model_dir = Path(cfg.out) / "model"
    assert (model_dir / "tokenizer.model").read_bytes() == TOKENIZER.read_bytes()
    loaded = llama4.load(model_dir)
    x = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        trainer.model.eval()
        assert torch.equal(loaded(x), trainer.model(x))
    from transformers import Llama4ForCausalLM

    hf = Llama4ForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, loaded(x), atol=1e-4, rtol=1e-4)

    from llama4.cli import main

    assert main(["plot", cfg.out]) == 0
    for name in ("loss.png", "lr.png", "expert_load.png"):
        assert (Path(cfg.out) / "plots" / name).read_bytes()[:4] == b"\x89PNG"


def test_train_from_a_checkpoint_continues_its_weights(tmp_path):
    """`llama4 train --model PATH`: more pretraining of a checkpoint (fresh optimizer and schedule)."""
    from llama4.cli import main

    first = small_config(
        tmp_path / "a", steps=25, warmup_steps=2, val_data=[str(VAL_TEXT)], balance_gamma=0.0
    )
    trainer = Trainer(first, log=lambda _: None)
    trainer.fit()
    trained = trainer.evaluate()
    model_dir = Path(first.out) / "model"
    common = [
        "--data",
        str(TEXT),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--steps",
        "1",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--lr",
        "0",
        "--eval-every",
        "0",
        "--eval-batches",
        "4",
        "--balance-gamma",
        "0",
        "--no-progress",
    ]
    # Before any step, the run's model is the checkpoint: it evaluates the same.
    again = Trainer(
        make_config(
            _train_args(
                [
                    "--model",
                    str(model_dir),
                    "--out",
                    str(tmp_path / "b"),
                    "--val-data",
                    str(VAL_TEXT),
                    *common,
                ]
            )
        ),
        log=lambda _: None,
    )
    assert again.evaluate() == pytest.approx(trained, abs=1e-5)
    fresh = Trainer(small_config(tmp_path / "c", steps=1, val_data=[str(VAL_TEXT)]), log=lambda _: None)
    assert fresh.evaluate() > trained + 1.0  # the checkpoint was not ignored
    # The command: a step at lr 0 (no balancing) writes the checkpoint's weights back unchanged.
    assert main(["train", "--model", str(model_dir), "--out", str(tmp_path / "d"), *common]) == 0
    written = load_file(tmp_path / "d" / "model" / "model.safetensors")
    original = load_file(model_dir / "model.safetensors")
    assert written.keys() == original.keys()
    assert all(torch.equal(written[k], original[k]) for k in original)
    with pytest.raises(SystemExit, match="not both"):
        main(["train", "--model", str(model_dir), "--preset", "debug", "--out", str(tmp_path / "e"), *common])


def _train_args(argv: list[str]):
    from llama4.cli import build_parser

    return build_parser().parse_args(["train", *argv])


def test_activation_checkpointing_gives_the_same_step(tmp_path):
    runs = []
    for ac in (False, True):
        t = Trainer(
            small_config(tmp_path / str(ac), steps=2, activation_checkpointing=ac), log=lambda _: None
        )
        stats = [t.train_step() for _ in range(2)]
        runs.append((stats, t.model.state_dict()))
    assert runs[0][0] == runs[1][0]
    for k, v in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][k], v, atol=1e-6, rtol=1e-5)


# -- checkpoints ---------------------------------------------------------------------------------


def test_crash_mid_checkpoint_leaves_no_complete_looking_checkpoint(tmp_path, monkeypatch):
    cfg = small_config(tmp_path, steps=6, save_every=3)
    Trainer(cfg, log=lambda _: None).fit()
    root = Path(cfg.out) / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_3", "step_6"]

    # A writer that dies after the model file: no step_9 appears, the temp folder is not taken.
    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 9, {"w": torch.zeros(2)}, {}, {"step": 9}, keep_last=3)
    monkeypatch.undo()
    assert list(root.glob("step_9.tmp-*")) and not (root / "step_9").exists()
    # A folder that looks like a checkpoint but misses files (e.g. a partial copy).
    (root / "step_12").mkdir()
    (root / "step_12" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(root).name == "step_6"

    logs = []
    resumed = Trainer(small_config(tmp_path, steps=8, save_every=3, resume=True), log=logs.append)
    record = resumed.fit()
    assert any("resumed from" in m and m.rstrip().endswith("step 6") for m in logs), logs
    assert record["step"] == 8
    assert not list(root.glob("step_*.tmp-*"))  # cleaned by the next save
    names = [p.name for p in ckpt.complete_checkpoints(root)]
    assert names[-1] == "step_8" and len(names) <= 3
    state = torch.load(root / "step_8" / "optimizer.pt", weights_only=True)
    assert state["state"]


def test_resume_between_log_steps_logs_the_same_expert_stats(tmp_path, monkeypatch):
    # Logged every 3 steps, saved every 2, killed after the checkpoint at step 4: that checkpoint
    # falls inside a stats window (steps 4-6), and the resumed run must log the same expert loads
    # at step 6 as the unbroken one.
    def expert_lines(out: str) -> dict[int, list]:
        lines = [json.loads(x) for x in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["experts"] for r in lines if "experts" in r}

    def cfg(out: str, **kw):
        return small_config(tmp_path, out=str(tmp_path / out), steps=6, log_every=3, save_every=2, **kw)

    Trainer(cfg("full"), log=lambda _: None).fit()
    save = Trainer.save

    def save_then_die(self):
        path = save(self)
        if self.step == 4:
            raise KeyboardInterrupt("killed after the checkpoint")
        return path

    monkeypatch.setattr(Trainer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg("cut"), log=lambda _: None).fit()
    monkeypatch.undo()
    Trainer(cfg("cut", resume=True), log=lambda _: None).fit()
    full, resumed = expert_lines("full"), expert_lines("cut")
    assert sorted(full) == sorted(resumed) == [3, 6]
    assert resumed == full


def _train_cmd(out: Path, cache: Path, steps: int, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "llama4.cli", "train", "--preset", "debug", "--data", str(TEXT)]
    cmd += [
        "--tokenizer",
        str(TOKENIZER),
        "--out",
        str(out),
        "--cache-dir",
        str(cache),
        "--steps",
        str(steps),
    ]
    cmd += ["--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--save-every", "5", "--log-every", "1"]
    cmd += [
        "--eval-every",
        "10",
        "--eval-batches",
        "2",
        "--seed",
        "3",
        "--no-progress",
        "--balance-gamma",
        "0.01",
    ]
    return cmd + (["--resume"] if resume else [])


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cache, steps = tmp_path / "cache", 40
    full, killed = tmp_path / "full", tmp_path / "killed"
    tok = load_tokenizer(TOKENIZER)  # tokenise once, before two runs race for the cache
    build_store(expand_paths([str(TEXT)]), tok, tokenizer_fingerprint(str(TOKENIZER), tok), cache)
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uninterrupted = subprocess.Popen(_train_cmd(full, cache, steps, False), **quiet)
    proc = subprocess.Popen(_train_cmd(killed, cache, steps, False), **quiet)
    metrics, deadline = killed / "metrics.jsonl", time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            past = lines and json.loads(lines[-1])["step"] >= 12
            if past and (killed / "checkpoints" / "step_10").is_dir():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        rc = proc.wait(timeout=60)
        _, err = uninterrupted.communicate(timeout=300)
    assert uninterrupted.returncode == 0, err.decode()[-2000:]
    assert rc == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert 12 <= killed_at < steps and not (killed / "model").exists()

    subprocess.run(
        _train_cmd(killed, cache, steps, True), env=env, check=True, capture_output=True, timeout=300
    )
    a, b = load_file(full / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    assert any(k.endswith("router.bias") for k in a)  # the balancing bias was trained and resumed too
    last_full = json.loads((full / "metrics.jsonl").read_text().splitlines()[-1])
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    last_resumed = json.loads(lines[-1])
    assert [json.loads(x)["step"] for x in lines] == list(range(1, steps + 1))
    assert (last_full["loss"], last_full["val_loss"]) == (last_resumed["loss"], last_resumed["val_loss"])


def test_a_multi_process_launch_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    # Under torchrun every rank would train its own copy into the same folder.
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = small_config(tmp_path, steps=2)
    with pytest.raises(ValueError, match="launched as 1 of 2"):
        Trainer(cfg, log=lambda _: None)
    assert not (Path(cfg.out) / "checkpoints").exists()
