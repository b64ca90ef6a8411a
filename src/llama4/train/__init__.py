"""Training: data -> batches -> one trainer for pretraining, fine-tuning (full, LoRA), distillation.

data.py        files -> cached memory-mapped tokens -> packed sequences -> seeded, resumable batches
trainer.py     the loop: AdamW, warmup + cosine, clipping, accumulation, bf16 autocast, metrics
balance.py     MoE load balancing: aux-loss-free expert bias, sequence-level balance loss
checkpoint.py  atomic, exactly resumable checkpoints
lora.py        LoRA parametrizations (attention, stacked experts), adapter files, merging
distill.py     soft + hard targets with a dynamic per-token weighting
parallel.py    the seam where FSDP2 / expert parallelism will be applied (identity today)
plot.py        charts from metrics.jsonl
commands/      the CLI verbs: train, finetune, distill, merge, plot
"""
