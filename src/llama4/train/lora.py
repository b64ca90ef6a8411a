"""LoRA adapters as parametrizations: the model code stays untouched.

A targeted weight W becomes W + (alpha / r) * delta, with a low-rank delta:

- a Linear weight (out, in):             delta = B @ A,  A (r, in), B (out, r)
- stacked expert weights (E, D, 2F):     delta = A @ B,  A (E, D, r), B (E, r, 2F)   per expert
  (and (E, F, D) for the experts' down projection: A (E, F, r), B (E, r, D))

A starts uniform in +-1/sqrt(fan_in) (PEFT's Kaiming init), B at zero, so training starts
exactly from the base model. Base weights are frozen; only A and B train. Targets are matched by the last
component of the module or parameter name: q_proj, k_proj, v_proj, o_proj (attention),
gate_up_proj, down_proj (routed experts; down_proj also names the shared expert's and dense
FFN's Linear), gate_proj, up_proj (shared expert, dense FFN), router.

The adapter is saved on its own: `adapter.safetensors` (keys `<param>.lora_A` / `.lora_B`) and
`adapter.json` (rank, alpha, targets, base model). `merge` folds the deltas into the weights;
`llama4 merge --model BASE --adapter DIR --out DIR` does it for saved files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize

from llama4.model.moe import Experts, Router

ADAPTER_FORMAT = "llama4-lora-1"


class LoRALinear(nn.Module):
    """Parametrization of a Linear weight (out, in): W + scale * B @ A."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        out_f, in_f = weight.shape
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, in_f, dtype=torch.float32, device=weight.device))
        self.B = nn.Parameter(torch.zeros(out_f, rank, dtype=torch.float32, device=weight.device))
        nn.init.uniform_(self.A, -1 / math.sqrt(in_f), 1 / math.sqrt(in_f))

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


class LoRAStacked(nn.Module):
    """Parametrization of stacked expert weights (E, I, O): W + scale * A @ B per expert."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float) -> None:
        super().__init__()
        E, n_in, n_out = weight.shape
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(E, n_in, rank, dtype=torch.float32, device=weight.device))
        self.B = nn.Parameter(torch.zeros(E, rank, n_out, dtype=torch.float32, device=weight.device))
        nn.init.uniform_(self.A, -1 / math.sqrt(n_in), 1 / math.sqrt(n_in))

    def delta(self) -> torch.Tensor:
        return self.scale * torch.bmm(self.A, self.B)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta().to(weight.dtype)


def _targets(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Module, str]]:
    """(parameter path, owning module, attribute) of every weight LoRA applies to."""
    found = []
    for mod_name, module in model.named_modules():
        if mod_name.startswith("vision") or parametrize.is_parametrized(module):
            continue
        leaf = mod_name.rsplit(".", 1)[-1]
        if isinstance(module, (nn.Linear, Router)) and leaf in targets:
            found.append((f"{mod_name}.weight", module, "weight"))
        elif isinstance(module, Experts):
            for attr in ("gate_up_proj", "down_proj"):
                if attr in targets:
                    found.append((f"{mod_name}.{attr}", module, attr))
    return found


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> dict[str, nn.Module]:
    """Freeze the model and attach LoRA parametrizations; returns {param path: LoRA module}."""
    assert rank >= 1, f"lora rank={rank} must be >= 1"
    for p in model.parameters():
        p.requires_grad_(False)
    adapters: dict[str, nn.Module] = {}
    for path, module, attr in _targets(model, targets):
        weight = getattr(module, attr)
        lora = (LoRAStacked if weight.dim() == 3 else LoRALinear)(weight, rank, alpha)
        parametrize.register_parametrization(module, attr, lora, unsafe=True)
        getattr(module.parametrizations, attr).original.requires_grad_(False)
        adapters[path] = lora
    if not adapters:
        raise ValueError(f"LoRA targets {targets} match no weight of the model")
    model.lora_config = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return adapters


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{param path: LoRA module} of a model with adapters attached."""
    found = {}
    for mod_name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():
                for p in plist:
                    if isinstance(p, (LoRALinear, LoRAStacked)):
                        found[f"{mod_name}.{attr}"] = p
    return found


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for path, lora in lora_modules(model).items():
        out[f"{path}.lora_A"] = lora.A.detach().contiguous().cpu()
        out[f"{path}.lora_B"] = lora.B.detach().contiguous().cpu()
    return out


def save_adapter(model: nn.Module, path: str | Path, base_model: str | None = None) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(path / "adapter.safetensors"), metadata={"format": ADAPTER_FORMAT})
    meta = {"format": ADAPTER_FORMAT, **model.lora_config, "base_model": base_model}
    (path / "adapter.json").write_text(json.dumps(meta, indent=2) + "\n")


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Attach the adapter saved in `path` to `model` (a base model without adapters)."""
    path = Path(path)
    meta = json.loads((path / "adapter.json").read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}/adapter.json: format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    adapters = apply_lora(model, meta["rank"], meta["alpha"], meta["targets"])
    state = load_file(str(path / "adapter.safetensors"))
    expected = {f"{p}.lora_{ab}" for p in adapters for ab in "AB"}
    if set(state) != expected:
        raise ValueError(
            f"adapter {path} does not fit the model: missing {sorted(expected - set(state))[:10]}, "
            f"unexpected {sorted(set(state) - expected)[:10]}"
        )
    for p, lora in adapters.items():
        lora.A.copy_(state[f"{p}.lora_A"])
        lora.B.copy_(state[f"{p}.lora_B"])


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W + delta) and remove the parametrizations."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for attr in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model
