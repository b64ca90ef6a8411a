"""MoE load balancing: one expert takes over without it, the expert bias evens the load out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama4.model.moe import Routing
from llama4.train.balance import ExpertBalancer, moe_layers, sequence_balance_loss
from llama4.train.config import TrainConfig
from llama4.train.trainer import Trainer

DATA = Path(__file__).parent / "data"


pytestmark = pytest.mark.usefixtures("one_thread")


def skewed_run(tmp_path: Path, gamma: float) -> list[dict]:
    """Train 40 steps from a model whose routers all favour expert 0 on the typical token."""
    cfg = TrainConfig(
        preset="debug",
        data=[str(DATA / "emma_excerpt.txt")],
        tokenizer=str(DATA / "tokenizer_512.model"),
        out=str(tmp_path / f"gamma{gamma}"),
        cache_dir=str(tmp_path / "cache"),
        steps=40,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        log_every=5,
        eval_every=0,
        progress=False,
        balance_gamma=gamma,
    )
    trainer = Trainer(cfg, log=lambda _: None)
    model = trainer.model
    router_inputs = {}
    hooks = [
        block.ffn_norm.register_forward_hook(
            lambda m, i, out, k=k: router_inputs.__setitem__(k, out.flatten(0, 1))
        )
        for k, block in enumerate(model.layers)
    ]
    with torch.no_grad():
        model(trainer.data.train.seqs.get(list(range(8)))[0])
        for h in hooks:
            h.remove()
        for i, moe in moe_layers(model):
            mean = router_inputs[i].mean(0)
            moe.router.weight[0] += 2.0 * mean / mean.norm() ** 2  # expert 0: +2 on the mean input's logit
    return trainer.fit()["experts"]


def test_without_balancing_one_expert_takes_over_and_the_bias_evens_it_out(tmp_path):
    unbalanced = skewed_run(tmp_path, gamma=0.0)
    balanced = skewed_run(tmp_path, gamma=0.1)
    # max_load: the busiest expert's tokens over the mean over the last 5 steps; 4 = all on one of 4.
    worst_free = [e["max_load"] for e in unbalanced]
    worst_balanced = [e["max_load"] for e in balanced]
    assert min(worst_free) > 3.5, worst_free
    assert max(worst_balanced) < 2.0 and sum(worst_balanced) / len(worst_balanced) < 1.7, worst_balanced
    assert all(e["dead"] == 0 for e in balanced)


def test_bias_moves_against_the_load():
    from llama4.config import get_preset
    from llama4.model.transformer import Transformer

    model = Transformer(get_preset("debug"))
    balancer = ExpertBalancer(model, gamma=0.25)
    for _, moe in moe_layers(model):
        experts = torch.tensor([[0]] * 6 + [[1]] * 2 + [[2]] * 0 + [[3]] * 0)  # loads 6, 2, 0, 0: mean 2
        moe.last_routing = Routing(torch.zeros(8, 4), experts, torch.ones(8, 1))
    balancer.observe()
    balancer.update()
    for _, moe in moe_layers(model):
        assert moe.router.bias.tolist() == [-0.25, 0.0, 0.25, 0.25]
    stats = balancer.stats()
    assert stats[0] == {"layer": 0, "max_load": 3.0, "min_load": 0.0, "dead": 2}


def test_sequence_balance_loss_is_one_when_even_and_trains_the_router():
    from llama4.config import get_preset
    from llama4.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(get_preset("debug"))
    model.init_weights(0)
    # Perfectly even: every expert chosen equally, equal affinities -> f_i = 1, P_i = 1/E -> 1.
    for _, moe in moe_layers(model):
        moe.last_routing = Routing(torch.zeros(8, 4, requires_grad=True), torch.arange(8)[:, None] % 4, None)
    assert sequence_balance_loss(model, batch_size=2).item() == pytest.approx(1.0)
    # Skewed: every token on expert 0, which also has the highest affinity -> above 1.
    for _, moe in moe_layers(model):
        logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
        moe.last_routing = Routing(logits, torch.zeros(8, 1, dtype=torch.long), None)
    assert sequence_balance_loss(model, batch_size=2).item() > 1.5
    # On a real forward the loss is differentiable through the router weights.
    model(torch.randint(0, 512, (2, 16)))
    sequence_balance_loss(model, batch_size=2).backward()
    for _, moe in moe_layers(model):
        assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
