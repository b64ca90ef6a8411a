"""MoE load balancing: the auxiliary-loss-free expert bias and a sequence-level balance loss.

Both follow DeepSeek-V3 (arXiv 2412.19437, section 2.1.2); Meta's own method is unpublished.

- **Expert bias** (`ExpertBalancer`). Each router has a per-expert `bias` buffer that is added to
  the logits for the top-k *choice* only; the gate stays sigmoid(raw logit), so the bias steers
  traffic without changing what a chosen expert contributes. After each optimizer step the
  bias of every expert that received more than the mean number of tokens in that step goes
  down by gamma, and every under-loaded expert's goes up by gamma. No gradient is involved.
- **Sequence-level balance loss** (`sequence_balance_loss`). For each sequence,
  `sum_i f_i * P_i` with f_i = E / (k T) * (tokens of the sequence routed to expert i) and
  P_i = mean over the sequence of the normalised affinities s_i / sum_j s_j (s = sigmoid of the
  raw logits). f is a count (no gradient); P carries the gradient into the router weights.
  It is minimal (1) when the load is even. Use a small weight (DeepSeek-V3: 1e-4).

Shapes: N tokens (B*T), E experts, k experts per token.
"""

from __future__ import annotations

import torch
from torch import nn

from llama4.model.moe import MoE


def moe_layers(model: nn.Module) -> list[tuple[int, MoE]]:
    """(layer id, MoE module) of every MoE layer, in order."""
    return [(i, b.feed_forward) for i, b in enumerate(model.layers) if isinstance(b.feed_forward, MoE)]


class ExpertBalancer:
    """Counts tokens per expert over a step and nudges the routers' choice bias toward balance."""

    def __init__(self, model: nn.Module, gamma: float) -> None:
        self.layers = moe_layers(model)
        self.gamma = gamma
        self.step_counts = {i: None for i, _ in self.layers}  # (E,) this optimizer step
        self.window_counts = {i: None for i, _ in self.layers}  # (E,) since the last stats() call

    @torch.no_grad()
    def observe(self) -> None:
        """Add the routing of the latest forward pass (call after each training forward)."""
        for i, moe in self.layers:
            r = moe.last_routing
            if r is None:
                continue
            c = torch.bincount(r.experts.flatten(), minlength=moe.num_experts).to("cpu", torch.float64)
            for store in (self.step_counts, self.window_counts):
                store[i] = c if store[i] is None else store[i] + c

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: bias += gamma * sign(mean load - load), then reset the step."""
        for i, moe in self.layers:
            c = self.step_counts[i]
            if c is not None and self.gamma > 0:
                delta = self.gamma * torch.sign(c.mean() - c)
                moe.router.bias.add_(delta.to(moe.router.bias.device, moe.router.bias.dtype))
            self.step_counts[i] = None

    def window_state(self) -> dict[str, list[float]]:
        """The counts of the stats window, for a checkpoint (a resumed run then logs the same
        stats at its next log step as the unbroken run)."""
        return {str(i): c.tolist() for i, c in self.window_counts.items() if c is not None}

    def load_window_state(self, state: dict[str, list[float]]) -> None:
        for i, _ in self.layers:
            c = state.get(str(i))
            self.window_counts[i] = None if c is None else torch.tensor(c, dtype=torch.float64)

    def stats(self) -> list[dict[str, float | int]]:
        """Per MoE layer over the window since the last call: max and min load / mean, dead experts."""
        out = []
        for i, _ in self.layers:
            c = self.window_counts[i]
            if c is None:
                continue
            mean = c.mean().item()
            out.append(
                {
                    "layer": i,
                    "max_load": round(c.max().item() / mean, 4) if mean else 0.0,
                    "min_load": round(c.min().item() / mean, 4) if mean else 0.0,
                    "dead": int((c == 0).sum()),
                }
            )
            self.window_counts[i] = None
        return out


def sequence_balance_loss(model: nn.Module, batch_size: int) -> torch.Tensor:
    """Mean over MoE layers of the sequence-level balance loss of the latest forward pass."""
    losses = []
    for _, moe in moe_layers(model):
        r = moe.last_routing
        if r is None:
            continue
        N, E = r.logits.shape
        T, k = N // batch_size, r.experts.shape[1]
        scores = torch.sigmoid(r.logits).view(batch_size, T, E)  # (B, T, E)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
        chosen = torch.zeros(batch_size, T, E, device=r.logits.device)
        chosen.scatter_(-1, r.experts.view(batch_size, T, k), 1.0)
        f = chosen.sum(1) * (E / (k * T))  # (B, E)
        losses.append((f * p).sum(-1).mean())
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()
