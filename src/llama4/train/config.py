"""One typed run config for every training verb, filled from defaults < TOML file < flags.

`llama4 train`, `llama4 finetune` and `llama4 distill` share `TrainConfig`; each verb declares
only the flags that mean something for it. A run config file (TOML) may hold any field, with
the field names below (dashes or underscores); a `[model]` table overrides fields of the
preset's text config (e.g. `dim = 128`, `moe = { num_experts = 8 }`). See `recipes/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama4.config import PRESETS, ModelConfig, get_preset

PRESET_NAMES = frozenset(PRESETS)
DEFAULT_CACHE_DIR = str(Path.home() / ".cache" / "llama4" / "tokens")


@dataclass
class TrainConfig:
    # -- model -----------------------------------------------------------------------------------
    preset: str | None = None  # named preset for a freshly initialised model (train, distill student)
    model: str | None = None  # checkpoint to start from (finetune, more pretraining, distill student)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # TOML [model]: text-config fields
    tokenizer: str | None = None  # tokenizer file; default: the checkpoint's, else Llama 4's own
    # -- data ------------------------------------------------------------------------------------
    data: list[str] = field(default_factory=list)  # files, folders, globs; finetune: JSONL and text
    val_data: list[str] = field(default_factory=list)  # held-out files; empty: split off val_fraction
    val_fraction: float = 0.02  # share of packed sequences held out when val_data is empty
    cache_dir: str = DEFAULT_CACHE_DIR  # tokenised corpora, memory-mapped, keyed by content + tokenizer
    # -- run -------------------------------------------------------------------------------------
    out: str = "runs/default"  # OUT: metrics.jsonl, checkpoints/, model/, plots/
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256  # tokens per sequence
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # linear warmup; None: 5% of steps (at least 1)
    weight_decay: float = 0.1  # AdamW; never on norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm (0: off)
    dtype: str = "auto"  # auto (bf16 autocast where supported, CUDA), bf16 or fp32
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    activation_checkpointing: bool = False  # recompute each block in the backward pass
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_every: int = 100  # steps between validation losses (0: only at the end)
    eval_batches: int = 8  # validation micro-batches per evaluation
    save_every: int = 0  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # complete checkpoints kept
    seed: int = 0  # model init and data order
    resume: bool = False  # continue from the latest complete checkpoint in OUT/checkpoints
    progress: bool = True  # tqdm progress bar
    # -- MoE load balancing ---------------------------------------------------------------------
    balance_gamma: float = 1e-3  # aux-loss-free bias step per optimizer step (0: off)
    balance_loss: float = 0.0  # weight of the sequence-level balance loss (0: off)
    # -- LoRA (finetune) -------------------------------------------------------------------------
    lora_rank: int = 0  # 0: full fine-tuning
    lora_alpha: float = 16.0  # delta is scaled by alpha / rank
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    )
    save_merged: bool = False  # LoRA: also write the merged model to OUT/model
    # -- distillation ----------------------------------------------------------------------------
    teacher: str | None = None  # HF checkpoint directory of the teacher
    temperature: float = 1.0  # softening of both distributions in the KL term (2.0 hurt: see distill.py)
    weighting: str = "dynamic"  # hard, fixed or dynamic (see llama4.train.distill)
    soft_weight: float | None = None  # fixed: weight of the soft term (0.5); dynamic: its maximum (1.0)

    def __post_init__(self) -> None:
        assert self.steps >= 1, f"steps={self.steps} must be >= 1"
        assert self.batch_size >= 1 and self.grad_accum >= 1, (
            f"batch_size={self.batch_size}, grad_accum={self.grad_accum} must be >= 1"
        )
        assert self.dtype in ("auto", "bf16", "fp32"), f"dtype={self.dtype!r} not in auto/bf16/fp32"
        assert self.weighting in ("hard", "fixed", "dynamic"), (
            f"weighting={self.weighting!r} not in hard/fixed/dynamic"
        )
        assert 0.0 <= self.val_fraction < 1.0, f"val_fraction={self.val_fraction} not in [0, 1)"
        if self.soft_weight is None:
            self.soft_weight = {"hard": 0.0, "fixed": 0.5, "dynamic": 1.0}[self.weighting]

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)

    def model_config(self) -> ModelConfig:
        """The architecture of a fresh model: the preset with the [model] overrides applied."""
        if self.preset is None:
            raise ValueError("a fresh model needs --preset (or `preset = ...` in the run config)")
        return apply_overrides(get_preset(self.preset), self.model_overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def apply_overrides(cfg: ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    """A copy of `cfg` with text-config fields replaced (nested `moe` merged)."""
    if not overrides:
        return cfg
    text = cfg.to_dict()["text"]
    unknown = set(overrides) - set(text)
    if unknown:
        raise ValueError(f"unknown [model] fields {sorted(unknown)}; valid: {sorted(text)}")
    # Layer-id lists derive from the layer count and intervals unless given explicitly.
    structural = {"n_layers", "nope_interval", "moe"}
    if structural & set(overrides):
        text["global_layers"] = overrides.get("global_layers")
        text["moe_layers"] = overrides.get("moe_layers")
    for key, value in overrides.items():
        text[key] = {**text[key], **value} if key in ("moe", "rope_scaling") and text[key] else value
    return ModelConfig.from_dict({**cfg.to_dict(), "text": text})


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The fields of a TOML run config, validated by name."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name == "model" and isinstance(value, dict):
            values["model_overrides"] = value
            continue
        if name not in FIELDS:
            raise ValueError(f"{path}: unknown run-config key {key!r}; valid: {sorted(FIELDS)}")
        values[name] = value
    return values


def make_config(args: argparse.Namespace, **verb_values: Any) -> TrainConfig:
    """defaults < the TOML file of --config < flags given on the command line < verb_values."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(read_run_config(args.config))
    for name in FIELDS:
        flag_value = getattr(args, name, None)
        if flag_value is not None:
            values[name] = flag_value
    values.update(verb_values)
    for name in ("data", "val_data", "lora_targets"):  # TOML may give a single string
        if isinstance(values.get(name), str):
            values[name] = [values[name]]
    return TrainConfig(**values)


# -- flags ---------------------------------------------------------------------------------------
# Every flag defaults to None so that "not given" can be told from "given the default value".


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """Flags every training verb understands."""
    d = TrainConfig
    p.add_argument("--config", help="TOML run config holding any of these flags (flags override it)")
    p.add_argument("--data", nargs="+", help="training data: files, folders or globs")
    p.add_argument("--val-data", nargs="+", help="held-out validation files (default: split off)")
    p.add_argument("--val-fraction", type=float, help=f"held-out share without --val-data ({d.val_fraction})")
    p.add_argument("--out", help="output directory")
    p.add_argument("--tokenizer", help="tokenizer file (default: the checkpoint's, else Llama 4's)")
    p.add_argument("--cache-dir", help="where tokenised data is cached (~/.cache/llama4/tokens)")
    p.add_argument("--steps", type=int, help=f"optimizer steps ({d.steps})")
    p.add_argument("--batch-size", type=int, help=f"sequences per micro-batch ({d.batch_size})")
    p.add_argument("--grad-accum", type=int, help=f"micro-batches per step ({d.grad_accum})")
    p.add_argument("--seq-len", type=int, help=f"tokens per sequence ({d.seq_len})")
    p.add_argument("--lr", type=float, help=f"peak learning rate ({d.lr})")
    p.add_argument("--min-lr-ratio", type=float, help=f"final lr / peak lr ({d.min_lr_ratio})")
    p.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 5%% of --steps)")
    p.add_argument("--weight-decay", type=float, help=f"AdamW weight decay ({d.weight_decay})")
    p.add_argument("--grad-clip", type=float, help=f"max gradient norm, 0 = off ({d.grad_clip})")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], help="bf16 autocast or fp32 (auto)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N (auto)")
    p.add_argument(
        "--activation-checkpointing", action=argparse.BooleanOptionalAction, help="recompute blocks"
    )
    p.add_argument("--log-every", type=int, help=f"steps between metrics lines ({d.log_every})")
    p.add_argument("--eval-every", type=int, help=f"steps between validations ({d.eval_every})")
    p.add_argument("--eval-batches", type=int, help=f"validation micro-batches ({d.eval_batches})")
    p.add_argument("--save-every", type=int, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--keep-last", type=int, help=f"checkpoints kept ({d.keep_last})")
    p.add_argument("--seed", type=int, help=f"model init and data order ({d.seed})")
    p.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, help="continue from the last checkpoint"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="show a progress bar")
    p.add_argument("--balance-gamma", type=float, help=f"expert-bias step, 0 = off ({d.balance_gamma})")
    p.add_argument("--balance-loss", type=float, help="sequence-level balance loss weight (0)")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="named preset for a fresh model (e.g. debug)")
