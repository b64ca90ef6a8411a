"""Encode speed: llama4's tokenizer vs Meta's reference (pip llama-models), same text, same ids.

Both use the same tiktoken core; the difference is the cutting of long inputs into pieces, which
the reference does with a Python loop over every character and llama4 with a near-free block
test (the exact regex runs only where a run of 25k+ (non-)whitespace characters may exist).

    python benchmarks/tokenizer_speed.py [PATH ...] [--repeats 3]

PATH is a text file or a folder of .txt files (default: ../shared/data/text, the data checkout beside the repo); missing paths are
skipped with a note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common import best_times

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"


def text_files(paths: list[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(path.glob("*.txt"))
        elif path.is_file():
            files.append(path)
        else:
            print(f"skipping {path}: not found", file=sys.stderr)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[DEFAULT_PATH])
    parser.add_argument("--repeats", type=int, default=3, help="best of N timings per file and tokenizer")
    args = parser.parse_args()

    from llama4.tokenizer import Tokenizer

    try:
        from llama_models.llama4.tokenizer import Tokenizer as Reference
    except ImportError:
        print("pip llama-models is not installed: nothing to compare with", file=sys.stderr)
        return 1

    files = text_files(args.paths)
    if not files:
        print("no text files to encode", file=sys.stderr)
        return 1
    ours, ref = Tokenizer.default(), Reference.get_instance()

    print(
        f"{'file':<28} {'MB':>6} {'tokens':>9} {'llama4 MB/s':>12} {'llama-models MB/s':>18} {'ratio':>6}  same ids"
    )
    total_mb = total_ours = total_ref = 0.0
    for path in files:
        text = path.read_text(encoding="utf-8")
        mb = len(text.encode("utf-8")) / 1e6
        ids = ours.encode(text)
        same = ids == ref.encode(text, bos=False, eos=False)
        t_ours, t_ref = best_times(
            lambda text=text: ours.encode(text),
            lambda text=text: ref.encode(text, bos=False, eos=False),
            args.repeats,
        )
        total_mb, total_ours, total_ref = total_mb + mb, total_ours + t_ours, total_ref + t_ref
        print(
            f"{path.name:<28} {mb:>6.2f} {len(ids):>9} {mb / t_ours:>12.2f} {mb / t_ref:>18.2f} "
            f"{t_ref / t_ours:>5.2f}x  {'yes' if same else 'NO'}"
        )
    print(
        f"{'all':<28} {total_mb:>6.2f} {'':>9} {total_mb / total_ours:>12.2f} {total_mb / total_ref:>18.2f} "
        f"{total_ref / total_ours:>5.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
