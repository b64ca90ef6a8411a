"""Where parallelism will be applied to the model, from outside: identity on one device today.

The model code never imports torch.distributed. A multi-GPU trainer will build a device mesh
and call `parallelize(model, mesh)` after the model is built (and LoRA / activation
checkpointing are attached) and before the optimizer is created, the same seam as torchtitan's
`models/llama4/infra/parallelize.py`:

- FSDP2: `fully_shard(block, mesh=mesh["dp"])` for each `model.layers[i]`, then on the root;
- expert parallelism: shard `experts.gate_up_proj` / `experts.down_proj` on dim 0 (E) over
  mesh["ep"] and replace the token reordering in `MoE.forward` with all-to-all dispatch;
- tensor parallelism: colwise q/k/v_proj and gate/up, rowwise o_proj and down_proj.

Everything the trainer needs from a parallel model (state_dict, parameters, forward) keeps
working for the identity case, so the trainer has no second code path to test.
"""

from __future__ import annotations

import os

from torch import nn


def refuse_multi_process() -> None:
    """Training runs in one process until `parallelize` does something: under a multi-process
    launcher (torchrun sets WORLD_SIZE) each rank would train its own copy of the model and write
    over the others' checkpoints and metrics. Called first thing, before a model is built."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise ValueError(
            f"training runs in one process; this one was launched as 1 of {world} (WORLD_SIZE, e.g. by "
            "torchrun), which is not supported yet: run it without a launcher"
        )


def parallelize(model: nn.Module, mesh=None) -> nn.Module:
    """Apply data/expert/tensor parallelism over `mesh`; single device (mesh None): unchanged."""
    if mesh is not None:
        raise NotImplementedError("multi-device training is not implemented yet; see this module's docstring")
    return model
