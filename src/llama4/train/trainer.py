"""The trainer: pretraining, fine-tuning (full and LoRA) and distillation share this loop.

What differs between them is small and named: the data (`sft` packs JSONL with loss masks),
the starting model (fresh preset or checkpoint), LoRA (attached before the optimizer sees the
parameters) and the objective (cross-entropy here, soft + hard targets in `distill.py`).

A step: `grad_accum` micro-batches, each forward under bf16 autocast where supported (the model
keeps router, norms and softmax in float32; the loss is taken in float32), the loss summed over
target tokens and divided by the step's target count; gradient clipping; AdamW (no weight decay
on norms, biases, embeddings); warmup + cosine schedule; then the MoE balancing bias update.

OUT/metrics.jsonl gets one JSON object per logged step: step, loss, lr, grad_norm, tokens_per_s,
tokens, elapsed_s, val_loss when computed, experts (per MoE layer: max_load and min_load as
multiples of the mean, dead experts), and any terms the objective reports.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llama4.train.balance import ExpertBalancer, sequence_balance_loss
from llama4.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from llama4.train.config import TrainConfig
from llama4.train.data import IGNORE, Data, build_data, load_tokenizer, tokenizer_fingerprint
from llama4.train.parallel import parallelize, refuse_multi_process

# -- losses -----------------------------------------------------------------------------------------

LOGIT_CHUNK_ELEMENTS = 1 << 26  # at most this many logits (256 MiB in fp32) alive at once


def _ce_sum(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), targets, ignore_index=IGNORE, reduction="sum")


def sum_over_chunks(fn, rows: int, *tensors: torch.Tensor):
    """fn(*chunks) summed over chunks of `rows` positions (dim 0 of every tensor).

    fn returns a loss or a (loss, {name: sum}) pair; both are summed. With more than one chunk,
    each chunk runs under activation checkpointing: its logits are recomputed in the backward
    pass instead of kept (with Llama 4's 202048-token vocabulary they would otherwise dwarf every
    other activation).
    """
    n = tensors[0].shape[0]
    if n <= rows:
        return fn(*tensors)
    total = None
    for s in range(0, n, rows):
        out = checkpoint(fn, *(t[s : s + rows] for t in tensors), use_reentrant=False)
        if total is None:
            total = out
        elif isinstance(out, tuple):
            total = (total[0] + out[0], {k: total[1][k] + v for k, v in out[1].items()})
        else:
            total = total + out
    return total


def logit_rows(vocab_size: int) -> int:
    """Positions per chunk so that at most LOGIT_CHUNK_ELEMENTS logits are alive at once."""
    return max(1, LOGIT_CHUNK_ELEMENTS // vocab_size)


def cross_entropy_sum(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of token cross-entropies, the (N, V) logits computed chunk by chunk."""
    h = model.hidden(inputs).flatten(0, 1)  # (N, D)
    rows = logit_rows(model.config.text.vocab_size)
    return sum_over_chunks(lambda h, t: _ce_sum(model.output, h, t), rows, h, targets.flatten())


class Objective(Protocol):
    """What a step minimises: (sum of per-token losses over targets != IGNORE, extra sums)."""

    def __call__(
        self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


def cross_entropy_objective(model, inputs, targets):
    return cross_entropy_sum(model, inputs, targets), {}


# -- optimisation -------------------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices and stacked experts, none on norms, biases, embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or "tok_embeddings" in name or "embedding" in name or name.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def warmup_cosine(warmup: int, total: int, min_ratio: float) -> Callable[[int], float]:
    """lr multiplier at step s: linear warmup to 1, cosine down to min_ratio at `total`."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass (wraps the instance's forward)."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def use_bf16(dtype: str, device: torch.device) -> bool:
    if dtype == "fp32":
        return False
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if dtype == "bf16":
        return supported or device.type == "cpu"  # CPU autocast works, just slowly
    return supported  # auto


# -- the trainer -----------------------------------------------------------------------------------


def tokenizer_path_for(cfg: TrainConfig, model_dir: str | None = None) -> str | None:
    """--tokenizer, else the checkpoint's tokenizer.model, else None (Llama 4's own)."""
    if cfg.tokenizer:
        return cfg.tokenizer
    if model_dir:
        for candidate in (
            Path(model_dir) / "tokenizer.model",
            Path(model_dir) / "original" / "tokenizer.model",
        ):
            if candidate.is_file():
                return str(candidate)
    return None


def build_model(cfg: TrainConfig, device: torch.device, vocab_size: int) -> nn.Module:
    """A checkpoint in float32 (cfg.model), or a fresh model of cfg's preset initialised from cfg.seed.

    A fresh model's vocabulary is sized to the tokenizer's unless the run config sets it: a
    tokenizer trained with `llama4 tokenizer train` has its BPE ranks plus 2048 special tokens.
    """
    import llama4
    from llama4.checkpoint.io import build
    from llama4.config import ModelConfig

    if cfg.model:
        return llama4.load(cfg.model, dtype=torch.float32, device=device).train()
    mcfg = cfg.model_config()
    if "vocab_size" not in cfg.model_overrides and mcfg.text.vocab_size != vocab_size:
        d = mcfg.to_dict()
        d["text"]["vocab_size"] = vocab_size
        mcfg = ModelConfig.from_dict(d)
    model = build(mcfg, device="meta")
    model.to_empty(device=device)
    model.init_buffers(device)
    model.init_weights(cfg.seed)
    return model.train()


class Trainer:
    """Owns model, optimizer, schedule, data and balancer for one run in `cfg.out`."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: nn.Module | None = None,
        objective: Objective = cross_entropy_objective,
        sft: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        refuse_multi_process()
        self.cfg, self.objective, self.log = cfg, objective, log
        self.out = Path(cfg.out)
        self.device = resolve_device(cfg.device)
        self.bf16 = use_bf16(cfg.dtype, self.device)
        torch.manual_seed(cfg.seed)

        self.tokenizer_path = tokenizer_path_for(cfg, cfg.model)
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        if model is None:
            model = build_model(cfg, self.device, self.tokenizer.vocab_size)
        self.model = model
        vocab = self.model.config.text.vocab_size
        if self.tokenizer.vocab_size > vocab:
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocabulary is {vocab}: "
                "train a smaller tokenizer (`llama4 tokenizer train`) or pick a larger model"
            )
        if cfg.lora_rank > 0:
            from llama4.train.lora import apply_lora

            apply_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        self.model = parallelize(self.model, mesh=None)

        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        )
        # The bias is a buffer of the model; an adapter does not carry it, so LoRA leaves it alone.
        self.balancer = ExpertBalancer(self.model, cfg.balance_gamma if cfg.lora_rank == 0 else 0.0)
        tok_id = tokenizer_fingerprint(self.tokenizer_path, self.tokenizer)
        self.data: Data = build_data(cfg, self.tokenizer, tok_id, sft=sft, log=log)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0

    # -- state ------------------------------------------------------------------------------------
    def _saved_names(self) -> set[str]:
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        buffers = {n for n, _ in self.model.named_buffers()}
        return (trainable | buffers) & set(self.model.state_dict())

    def save(self) -> Path:
        names = self._saved_names()
        state = {k: v for k, v in self.model.state_dict().items() if k in names}
        trainer_state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed,
            "data": self.data.train.state_dict(),
            "expert_window": self.balancer.window_state(),
            "scheduler": self.scheduler.state_dict(),
            "config": self.cfg.to_dict(),
            "model_config": self.model.config.to_dict(),
        }
        return save_checkpoint(
            self.out / "checkpoints",
            self.step,
            state,
            self.optimizer.state_dict(),
            trainer_state,
            self.cfg.keep_last,
        )

    def restore(self, path: Path) -> None:
        ck = load_checkpoint(path, self.device)
        missing, unexpected = self.model.load_state_dict(ck["model"], strict=False)
        if unexpected or set(missing) & self._saved_names():
            raise ValueError(
                f"checkpoint {path} does not fit: unexpected {unexpected[:10]}, missing {missing[:10]}"
            )
        self.optimizer.load_state_dict(ck["optimizer"])
        t = ck["trainer"]
        self.scheduler.load_state_dict(t["scheduler"])
        self.data.train.load_state_dict(t["data"])
        self.balancer.load_window_state(t.get("expert_window", {}))  # absent in older checkpoints
        self.step, self.tokens_seen, self.elapsed = t["step"], t["tokens_seen"], t["elapsed_s"]
        set_rng_state(ck["rng"])
        self.log(f"resumed from {path} at step {self.step}")

    # -- loop -------------------------------------------------------------------------------------
    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.data.val:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for inputs, targets in self.data.val:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.autocast():
                total += cross_entropy_sum(self.model, inputs, targets).item()
            count += int((targets != IGNORE).sum())
        self.model.train()
        return total / max(1, count)

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        micro = [self.data.train.next() for _ in range(cfg.grad_accum)]
        n_targets = max(1, sum(int((t != IGNORE).sum()) for _, t in micro))
        loss_total, extras_total = 0.0, {}
        for inputs, targets in micro:
            inputs, targets = inputs.to(self.device), targets.to(self.device)
            with self.autocast():
                loss_sum, extras = self.objective(self.model, inputs, targets)
            self.balancer.observe()
            loss = loss_sum / n_targets
            if cfg.balance_loss > 0:
                loss = (
                    loss
                    + cfg.balance_loss * sequence_balance_loss(self.model, inputs.shape[0]) / cfg.grad_accum
                )
            loss.backward()
            loss_total += loss_sum.item()
            for k, v in extras.items():
                extras_total[k] = extras_total.get(k, 0.0) + float(v)
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip).item() if cfg.grad_clip > 0 else 0.0
        )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.balancer.update()
        self.step += 1
        self.tokens_seen += sum(i.numel() for i, _ in micro)
        out = {"loss": loss_total / n_targets, "lr": lr, "grad_norm": grad_norm}
        out.update({k: v / n_targets for k, v in extras_total.items()})
        return out

    def fit(self) -> dict[str, Any]:
        """Train to cfg.steps (resuming if asked); returns the last metrics record."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        metrics_file = self.out / "metrics.jsonl"
        if cfg.resume and (ck := latest_checkpoint(self.out / "checkpoints")) is not None:
            self.restore(ck)
            _truncate_metrics(metrics_file, self.step)
        elif metrics_file.exists():
            metrics_file.unlink()
        (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1) + "\n")

        from tqdm.auto import tqdm

        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not cfg.progress, unit="step", dynamic_ncols=True
        )
        window_tokens, window_start = 0, time.perf_counter()
        record: dict[str, Any] = {}
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            tokens_before = self.tokens_seen
            stats = self.train_step()
            self.elapsed += time.perf_counter() - t0
            window_tokens += self.tokens_seen - tokens_before
            last = self.step == cfg.steps
            val_loss = None
            if last or (cfg.eval_every > 0 and self.step % cfg.eval_every == 0):
                val_loss = self.evaluate()
            if last or val_loss is not None or self.step % cfg.log_every == 0:
                now = time.perf_counter()
                record = {
                    "step": self.step,
                    **{k: round(v, 6) if k != "lr" else v for k, v in stats.items()},
                    "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1),
                    "tokens": self.tokens_seen,
                    "elapsed_s": round(self.elapsed, 3),
                }
                if val_loss is not None:
                    record["val_loss"] = round(val_loss, 6)
                experts = self.balancer.stats()
                if experts:
                    record["experts"] = experts
                with open(metrics_file, "a") as f:
                    f.write(json.dumps(record) + "\n")
                window_tokens, window_start = 0, time.perf_counter()
            bar.set_postfix(
                loss=f"{stats['loss']:.3f}", tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False
            )
            bar.update(1)
            if last or (cfg.save_every > 0 and self.step % cfg.save_every == 0):
                self.save()
        bar.close()
        self.finish()
        return record

    def finish(self) -> None:
        """Final artefacts: OUT/model (HF format + tokenizer.model), or OUT/adapter for LoRA."""
        import llama4

        targets = []
        if self.cfg.lora_rank > 0:
            from llama4.train.lora import merge_lora, save_adapter

            save_adapter(self.model, self.out / "adapter", base_model=self.cfg.model)
            targets.append(self.out / "adapter")
            if self.cfg.save_merged:
                merge_lora(self.model)
        if self.cfg.lora_rank == 0 or self.cfg.save_merged:
            llama4.save(self.model, self.out / "model")
            targets.append(self.out / "model")
        tok = self.tokenizer_path or default_tokenizer_file()
        for target in targets:
            if tok is not None:
                shutil.copyfile(tok, target / "tokenizer.model")
        self.log(f"wrote {', '.join(str(t) for t in targets)}")


def default_tokenizer_file() -> str | None:
    """The file behind `Tokenizer.default()`, copied next to models trained with it."""
    from llama4.tokenizer import _installed_llama4_model  # the path Tokenizer.default() reads

    path = _installed_llama4_model()
    return None if path is None else str(path)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines past `step` (written after the checkpoint a resumed run starts from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))
