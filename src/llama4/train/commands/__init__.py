"""The training verbs of `llama4` (train, finetune, distill, merge, plot).

Each module declares its flags and imports torch only inside `run`, so `llama4 --help` stays fast.
"""


def build_or_exit(verb: str, build):
    """`build()` (a trainer from the run config), or exit with ``llama4 VERB: message`` on a
    ValueError or FileNotFoundError: a bad flag, file or combination of them, not a traceback."""
    try:
        return build()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"llama4 {verb}: {e}") from None
