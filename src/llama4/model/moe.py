"""The mixture-of-experts FFN: router, grouped routed experts, shared expert.

Shape legend: N tokens (batch and time flattened), D model dim, E routed experts,
F expert hidden dim, k experts per token.

The router picks top-k experts from the raw logits and gates each chosen expert with
sigmoid(logit). The gate multiplies the token BEFORE it enters the expert (SwiGLU is not
linear, so this is not the same model as gating the output). Every token also goes through
the shared expert.

`MoE.forward` dispatches each token only to its chosen experts. `MoE.forward_dense` is the
slow, obvious twin (every expert on every token, unchosen ones gated to zero, as the
reference implementations do); tests hold one against the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llama4.config import TextConfig
from llama4.model.layers import FeedForward, glu_linear, linear

# Up to this many (token, expert) pairs, inference on CPU loops over the chosen experts
# (MoE._forward_few) instead of sorting tokens into a grouped GEMM.
FEW_TOKENS = 64


@dataclass
class Routing:
    """The router's decision for N tokens."""

    logits: torch.Tensor  # (N, E) float32 raw router logits
    experts: torch.Tensor  # (N, k) chosen expert ids
    gates: torch.Tensor  # (N, k) float32 sigmoid(logit) of the chosen experts


class Router(nn.Module):
    """Top-k over raw logits; sigmoid gates. `bias` steers the choice only (load balancing)."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        # Auxiliary-loss-free balancing (DeepSeek-V3): added to the logits for the top-k choice
        # only, never to the gate. Zero unless a trainer nudges it; saved with the model.
        self.register_buffer("bias", torch.zeros(num_experts), persistent=True)

    def forward(self, x: torch.Tensor) -> Routing:  # x: (N, D)
        f32 = torch.float32
        x32 = x if x.dtype == f32 else x.float()
        w32 = self.weight if self.weight.dtype == f32 else self.weight.float()
        if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # autocast would cast back
            with torch.autocast(x.device.type, enabled=False):
                logits = linear(x32, w32)  # the router runs in float32
        else:
            logits = linear(x32, w32)
        # Adding the (usually zero) bias unconditionally: testing it first would cost a device
        # sync per layer per step on GPU.
        experts = (logits + self.bias).topk(self.top_k, dim=-1).indices  # (N, k)
        gates = torch.sigmoid(logits.gather(-1, experts))
        return Routing(logits, experts, gates)


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights (the layout of HF checkpoints)."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))  # (E, D, 2F)
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))  # (E, F, D)

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: (M, D) tokens sorted by expert, counts: (E,) tokens per expert -> (M, D)."""
        if (x.is_cuda or x.dtype == torch.float32) and self._grouped_mm_fits(x):
            # One grouped GEMM per weight: no Python loop, no per-expert launches.
            offsets = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(x, self.gate_up_proj, offs=offsets)
            gate, up = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(gate) * up, self.down_proj, offs=offsets)
        return self.forward_loop(x, counts)

    def _grouped_mm_fits(self, x: torch.Tensor) -> bool:
        """torch._grouped_mm wants every row stride a multiple of 16 bytes: D, 2F and F elements."""
        D, F = self.down_proj.shape[-1], self.down_proj.shape[-2]
        return all(n * x.element_size() % 16 == 0 for n in (D, 2 * F, F))

    def forward_loop(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Same as forward_grouped with a loop over the non-empty experts."""
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n:
                out[start : start + n] = self.forward_one(x[start : start + n], e)
                start += n
        return out

    def forward_one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on tokens x (n, D) -> (n, D). (Weights stored transposed, as
        `prepare_for_inference` does on CPU, take the faster few-row kernel.)"""
        return glu_linear(linear(x, self.gate_up_proj[e].t()), self.down_proj[e].t())

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every token: (E, N, D) -> (E, N, D)."""
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down_proj)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        m = cfg.moe
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.router = Router(cfg.dim, m.num_experts, m.top_k)
        self.experts = Experts(m.num_experts, cfg.dim, m.hidden_dim)
        self.shared_expert = FeedForward(cfg.dim, m.hidden_dim)
        self.last_routing: Routing | None = None  # kept for load statistics and balancing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, D)
        routing = self.router(x)
        self.last_routing = routing
        if (
            x.shape[0] * self.top_k <= FEW_TOKENS
            and x.device.type == "cpu"
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()  # it reads the routing on the host
        ):
            return self._forward_few(x, routing).view(shape)
        flat_experts = routing.experts.flatten()  # (N*k,)
        order = flat_experts.argsort(stable=True)
        token_of = order // self.top_k  # which token each sorted slot belongs to
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        gates = routing.gates.flatten()[order, None].to(x.dtype)
        routed = self.experts.forward_grouped(x[token_of] * gates, counts)  # (N*k, D)
        out = self.shared_expert(x)
        out = out.index_add(0, token_of, routed.to(out.dtype))
        return out.view(shape)

    def _forward_few(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Decode-sized inputs on CPU: each chosen expert on its tokens, straight from the
        routing (a few small products; no sort, no grouped GEMM over mostly empty groups)."""
        out = self.shared_expert(x)
        gates = routing.gates if routing.gates.dtype == x.dtype else routing.gates.to(x.dtype)
        if x.shape[0] == 1:  # one token (batch-1 decoding): its k experts, no gather or scatter
            for j, e in enumerate(routing.experts[0].tolist()):
                out += self.experts.forward_one(x * gates[:, j, None], e)
            return out
        chosen: dict[int, tuple[list[int], list[int]]] = {}  # expert -> (tokens, which of k)
        for n, row in enumerate(routing.experts.tolist()):
            for j, e in enumerate(row):
                tokens, slots = chosen.setdefault(e, ([], []))
                tokens.append(n)
                slots.append(j)
        for e, (tokens, slots) in chosen.items():
            # A token picks an expert at most once, so `tokens` has no repeats.
            y = self.experts.forward_one(x[tokens] * gates[tokens, slots, None], e)
            out[tokens] += y.to(out.dtype)
        return out

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Reference formulation: all experts on all tokens, scores zero where not chosen."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        routing = self.router(x)
        scores = torch.zeros_like(routing.logits).scatter(-1, routing.experts, routing.gates)  # (N, E)
        routed_in = x[None] * scores.T[:, :, None].to(x.dtype)  # (E, N, D)
        routed = self.experts.forward_all(routed_in).sum(0)
        return (self.shared_expert(x) + routed).view(shape)
