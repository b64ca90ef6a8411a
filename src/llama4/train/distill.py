"""`llama4 distill`: a student learns from a teacher's soft targets and the data's hard targets.

Meta codistilled Maverick from Behemoth with a loss that "dynamically weights soft and hard
targets"; the exact form is unpublished. This is ours.

For each target token t (label y_t), with student logits s_t, teacher logits z_t, temperature
tau, student and teacher probabilities of the label p_S(y_t) and p_T(y_t) (at temperature 1):

    hard_t = -log softmax(s_t)[y_t]                                  (cross-entropy, data)
    soft_t = tau^2 * KL( softmax(z_t / tau) || softmax(s_t / tau) )   (teacher's distribution)
    loss   = sum_t [ w_t * soft_t + (1 - w_t) * hard_t ] / (number of target tokens)

and the soft weight w_t is

- `hard`:    0 (plain cross-entropy: the baseline);
- `fixed`:   a constant w (`--soft-weight`, default 0.5), the classic Hinton et al. mix;
- `dynamic`: w_t = w_max * p_T(y_t) / (p_T(y_t) + p_S(y_t)), computed without gradient
             (`--soft-weight` sets w_max, default 1).

The dynamic weight is the teacher's share of the probability the two models put on the right
token: how much more the teacher knows about *this* token than the student does *now*.

- Per token: where the teacher is right and the student is not, w_t -> w_max and the student
  learns the teacher's whole distribution (its "dark knowledge" about the alternatives); where
  the teacher is confidently wrong, p_T(y) is small, w_t -> 0 and the data's label wins.
- Over training, with no schedule to tune: at the start the student is near uniform
  (p_S(y) ~ 1/V), so nearly every token follows the teacher; as the student catches up the
  weight falls toward w_max / 2, and on tokens where it has overtaken the teacher it falls to
  0, so the teacher can no longer pull the student back to its own mistakes.

The tau^2 factor keeps the soft term's gradient on the scale of the hard term's (Hinton et al.
2015). The teacher runs under `torch.inference_mode`, once per micro-batch; validation loss is
always the plain cross-entropy, so runs with any weighting compare directly. Logits are
computed a chunk of positions at a time (see `DistillObjective`), so a 202k vocabulary fits.

Measured (`benchmarks/distill_experiment.py`: a 4.5M-parameter teacher, a 0.7M-parameter
student, 614k training tokens per student, validation loss on a book never trained on):
hard targets 4.48 nats/token; fixed 0.5 mix 4.09; dynamic 4.05 (teacher: 3.77), all at
temperature 1. The dynamic weight ended at a mean of 0.59, and a fixed 0.6 mix matched it
(4.03): at this scale its gain over the 0.5 mix comes from finding a good overall soft weight
without tuning it (it led the fixed mixes early: 4.69 vs 4.75 at a third of the run), not from
the per-token allocation. At temperature 2 both soft variants did worse than hard targets alone
(fixed 4.66, dynamic 4.90): a small student spends its capacity on the flattened tail, so the
default temperature is 1.

Shapes: B batch, T tokens, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llama4.train.data import IGNORE


def soft_weights(
    weighting: str, soft_weight: float, p_teacher: torch.Tensor, p_student: torch.Tensor
) -> torch.Tensor:
    """w_t (N,) for the label probabilities of teacher and student (N,); no gradient."""
    if weighting == "hard":
        return torch.zeros_like(p_teacher)
    if weighting == "fixed":
        return torch.full_like(p_teacher, soft_weight)
    return soft_weight * p_teacher / (p_teacher + p_student).clamp_min(1e-12)


def distillation_loss(
    student_logits: torch.Tensor,  # (N, V)
    teacher_logits: torch.Tensor,  # (N, V), no grad
    targets: torch.Tensor,  # (N,) with IGNORE where no loss is taken
    *,
    temperature: float,
    weighting: str,
    soft_weight: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(sum over target tokens of the weighted loss, sums of its parts for the metrics)."""
    valid = targets != IGNORE
    s, z, y = student_logits[valid].float(), teacher_logits[valid].float(), targets[valid]
    log_ps = F.log_softmax(s, dim=-1)
    hard = -log_ps.gather(-1, y[:, None]).squeeze(-1)  # (n,)
    with torch.no_grad():
        log_pt = F.log_softmax(z, dim=-1)
        p_teacher = log_pt.gather(-1, y[:, None]).squeeze(-1).exp()
        w = soft_weights(weighting, soft_weight, p_teacher, (-hard).exp())
    if weighting == "hard":
        soft = torch.zeros_like(hard)
    else:
        log_pt_tau = F.log_softmax(z / temperature, dim=-1)
        log_ps_tau = F.log_softmax(s / temperature, dim=-1)
        soft = (log_pt_tau.exp() * (log_pt_tau - log_ps_tau)).sum(-1) * temperature**2  # (n,)
    loss = (w * soft + (1 - w) * hard).sum()
    parts = {
        "ce": hard.detach().sum(),
        "kl": soft.detach().sum() / temperature**2,
        "soft_weight": w.sum(),
        "teacher_ce": -p_teacher.log().sum(),
    }
    return loss, parts


class DistillObjective:
    """The trainer's objective: teacher and student hidden states once per micro-batch, then
    `distillation_loss` on chunks of positions.

    Both models' logits are computed chunk by chunk (``chunk_rows`` positions at a time; by
    default the trainer's `logit_rows`), the student's recomputed in the backward pass, as the
    trainer's own cross-entropy does (`trainer.sum_over_chunks`).
    """

    def __init__(
        self,
        teacher: nn.Module,
        temperature: float,
        weighting: str,
        soft_weight: float,
        chunk_rows: int | None = None,
    ) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.weighting, self.soft_weight = temperature, weighting, soft_weight
        self.chunk_rows = chunk_rows

    def __call__(self, model, inputs, targets):
        from llama4.train.trainer import logit_rows, sum_over_chunks

        with torch.inference_mode():
            teacher_h = self.teacher.hidden(inputs).flatten(0, 1)
        teacher_h = teacher_h.clone()  # a normal tensor: inference tensors can't enter autograd
        student_h = model.hidden(inputs).flatten(0, 1)  # (N, D)
        rows = self.chunk_rows or logit_rows(model.config.text.vocab_size)

        def chunk(h, teacher_h, y):
            with torch.no_grad():
                teacher_logits = self.teacher.output(teacher_h).float()
            return distillation_loss(
                model.output(h),
                teacher_logits,
                y,
                temperature=self.temperature,
                weighting=self.weighting,
                soft_weight=self.soft_weight,
            )

        return sum_over_chunks(chunk, rows, student_h, teacher_h, targets.flatten())


def distill(cfg, *, sft: bool = False, log=print) -> dict:
    """Train cfg's student (preset or cfg.model) on cfg.teacher and cfg.data; the last metrics record."""
    import llama4
    from llama4.train.trainer import Trainer, resolve_device, tokenizer_path_for

    if not cfg.teacher:
        raise ValueError("distillation needs a teacher checkpoint (--teacher)")
    cfg.tokenizer = tokenizer_path_for(cfg, cfg.model or cfg.teacher)
    teacher = llama4.load(cfg.teacher, dtype=torch.float32, device=resolve_device(cfg.device))
    objective = DistillObjective(teacher, cfg.temperature, cfg.weighting, cfg.soft_weight)
    trainer = Trainer(cfg, objective=objective, sft=sft, log=log)
    t_vocab, s_vocab = teacher.config.text.vocab_size, trainer.model.config.text.vocab_size
    if t_vocab != s_vocab:
        raise ValueError(
            f"teacher vocabulary {t_vocab} != student vocabulary {s_vocab}: they must share a tokenizer"
        )
    return trainer.fit()
