"""Derive the nano model's training data from ../shared/data (nothing else is used).

    python scripts/nano/derive_data.py --out runs/nano/data

Writes
  pretrain/   the pretraining mixture: every text file except austen_persuasion.txt (the
              validation text), with the five other Austen novels written 3 times (an ~26%
              Austen share instead of ~10%: the short run sees ~1/8 of the corpus, and the
              validation text is Austen). Plain copies; `llama4 train` reads the folder.
  chat.jsonl  chat turns cut from the same training text: a passage of 1-3 sentences as the
              user turn, the next 1-3 sentences as the assistant turn (loss on the assistant
              turn and its <|eot|>): the model learns the turn structure and when to stop.
  text.jsonl  plain passages (4-12 consecutive sentences) of the same text, written with
              chat.jsonl (--only chat) and mixed into the chat stage with loss on every token:
              the model keeps its prose and learns that <|eot|> ends an assistant turn, not
              every sentence.
  vision_train.jsonl, vision_eval.jsonl
              image -> name dialogs ("What is this?" + image -> "dog face"). Images are
              referenced, not copied: "emoji:INDEX" (emoji64.npz) and "fashion:SPLIT:INDEX"
              (Fashion-MNIST), with an optional "@aug:SEED" augmented view
              (llama4.train.multimodal reads them). Emoji: the animals, plants and foods (248 of
              the 3010; most of the rest are skin-tone and flag variants a 64 px two-layer tower
              cannot tell apart in a CPU budget), each as drawn plus 39 augmented views. Held out
              for evaluation: one more augmented view of each of those emoji (shifted, scaled,
              recoloured: pixels never seen) and the Fashion-MNIST test split.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
from pathlib import Path

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # the data checkout beside the repo

TEXT = DATA / "text"
IMAGES = DATA / "images"
VALIDATION = "austen_persuasion.txt"
AUSTEN_REPEATS = 3
QUESTIONS = ["What is this?", "What is in this image?", "Name this picture.", "What do you see?"]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def training_texts() -> list[Path]:
    return sorted(p for p in TEXT.glob("*.txt") if p.name != VALIDATION)


def write_pretrain(out: Path) -> None:
    dst = out / "pretrain"
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for p in training_texts():
        repeats = AUSTEN_REPEATS if p.name.startswith("austen_") else 1
        for r in range(repeats):
            shutil.copyfile(p, dst / (p.name if r == 0 else f"{p.stem}.copy{r}.txt"))


_MOJIBAKE = re.compile("[\u00c2\u00e2\u00c3]")
_SENTENCE = re.compile(r"[^.!?]+[.!?]+[\"')\]]*\s*")


def sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    # Drop mojibake (the Jargon File's UTF-8 read as Latin-1 shows up as "Â " and "â\x80").
    return [
        s.strip() for s in _SENTENCE.findall(text) if 3 <= len(s.split()) <= 60 and not _MOJIBAKE.search(s)
    ]


def sentence_runs(seed: int, sizes: tuple[tuple[int, int], ...]):
    """Endless lists of runs of consecutive sentences, one run per (min, max) length in `sizes`,
    back to back in a training text picked Austen-heavy, like the pretraining mixture."""
    rng = random.Random(seed)
    pools = {p.name: sentences(p.read_text(encoding="utf-8", errors="replace")) for p in training_texts()}
    names = sorted(pools)
    weights = [AUSTEN_REPEATS if name.startswith("austen_") else 1 for name in names]
    while True:
        pool = pools[rng.choices(names, weights)[0]]
        ks = [rng.randint(lo, hi) for lo, hi in sizes]
        i = rng.randrange(0, len(pool) - sum(ks))
        runs = []
        for k in ks:
            runs.append(" ".join(pool[i : i + k]))
            i += k
        yield runs


def write_chat(out: Path, n: int, seed: int) -> None:
    runs = sentence_runs(seed, ((1, 3), (1, 3)))  # user turn, assistant turn
    with open(out / "chat.jsonl", "w") as f:
        for _ in range(n):
            user, reply = next(runs)
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            f.write(json.dumps({"messages": messages}) + "\n")


def write_text(out: Path, n: int, seed: int) -> None:
    runs = sentence_runs(seed + 1, ((4, 12),))
    with open(out / "text.jsonl", "w") as f:
        f.writelines(json.dumps({"text": next(runs)[0]}) + "\n" for _ in range(n))


def _dialog(image_ref: str, answer: str, question: str) -> dict:
    return {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image", "image": image_ref}, {"type": "text", "text": question}],
            },
            {"role": "assistant", "content": answer},
        ]
    }


def write_vision(
    out: Path, seed: int, fashion_train: int, fashion_test: int, emoji_aug: int, emoji_groups: list[str]
) -> None:
    rng = random.Random(seed)
    emoji = json.loads((IMAGES / "emoji64.json").read_text())
    chosen = [i for i, e in enumerate(emoji) if e["group"] in emoji_groups]
    train, evals = [], []
    for i in chosen:
        name = emoji[i]["name"]
        train.append(_dialog(f"emoji:{i}", name, rng.choice(QUESTIONS)))
        for _ in range(emoji_aug):
            train.append(_dialog(f"emoji:{i}@aug:{rng.randrange(1 << 30)}", name, rng.choice(QUESTIONS)))
        # Held out: a view of the same emoji never seen in training (its own augmentation seed).
        evals.append(
            {
                **_dialog(f"emoji:{i}@aug:{rng.randrange(1 << 30)}", name, QUESTIONS[0]),
                "split": "emoji_heldout_views",
            }
        )
    labels = _fashion_labels()
    for i in rng.sample(range(len(labels["train"])), fashion_train):
        train.append(
            _dialog(f"fashion:train:{i}", FASHION_CLASSES[labels["train"][i]], rng.choice(QUESTIONS))
        )
    for i in rng.sample(range(len(labels["test"])), fashion_test):
        evals.append(
            {
                **_dialog(f"fashion:test:{i}", FASHION_CLASSES[labels["test"][i]], QUESTIONS[0]),
                "split": "fashion_test",
            }
        )
    rng.shuffle(train)
    for name, rows in (("vision_train.jsonl", train), ("vision_eval.jsonl", evals)):
        with open(out / name, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def _fashion_labels() -> dict[str, list[int]]:
    import gzip

    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        with gzip.open(IMAGES / "fashion-mnist" / f"{prefix}-labels-idx1-ubyte.gz") as f:
            out[split] = list(f.read()[8:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/nano/data"))
    ap.add_argument("--only", choices=["pretrain", "chat", "vision"], nargs="*")
    ap.add_argument("--chat-examples", type=int, default=20000)
    ap.add_argument("--text-passages", type=int, default=10000)
    ap.add_argument("--fashion-train", type=int, default=2000)
    ap.add_argument("--fashion-test", type=int, default=1000)
    ap.add_argument("--emoji-augmentations", type=int, default=39)
    ap.add_argument(
        "--emoji-groups",
        nargs="*",
        default=["Animals & Nature", "Food & Drink"],
        help="emoji groups to learn (default: the 248 animals, plants and foods)",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    parts = args.only or ["pretrain", "chat", "vision"]
    if "pretrain" in parts:
        write_pretrain(args.out)
    if "chat" in parts:
        write_chat(args.out, args.chat_examples, args.seed)
        write_text(args.out, args.text_passages, args.seed)
    if "vision" in parts:
        write_vision(
            args.out,
            args.seed,
            args.fashion_train,
            args.fashion_test,
            args.emoji_augmentations,
            args.emoji_groups,
        )
    print(f"wrote {', '.join(parts)} under {args.out}")


if __name__ == "__main__":
    main()
