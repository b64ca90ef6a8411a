"""The training verbs of `llama4` (train, finetune, distill, merge, plot).

Each module declares its flags and imports torch only inside `run`, so `llama4 --help` stays fast.
"""
