"""Checks of a nano model directory: validation bits per byte, samples, chat stop, image naming.

    python scripts/nano/evaluate.py MODEL_DIR [--images runs/nano/data/vision_eval.jsonl] [--json OUT]

- bits per byte on austen_persuasion.txt (the validation text; `llama4.eval`);
- greedy continuation of "It is a truth universally acknowledged";
- chat: greedy replies to a few user turns, and whether each ends with <|eot|> within 96 tokens;
- image naming (models with a vision tower): greedy answer to "What is this?" + image, exact
  match (case-insensitive) with the name, per held-out split of the eval JSONL
  (fashion_test: held-out Fashion-MNIST test images; emoji_heldout_views: new augmented views,
  pixels never seen, of the emoji learned in training).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import llama4
from llama4.chat import ChatFormat
from llama4.eval import evaluate_text
from llama4.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"  # the data checkout beside the repo

VALIDATION = DATA / "text/austen_persuasion.txt"
PROMPT = "It is a truth universally acknowledged"
CHAT_TURNS = [
    "Tell me about the weather this morning.",
    "Who is Mr. Darcy?",
    "What shall we do today?",
    "The king sent his messengers to the city.",
]


def continuation(model, tok, text: str, n: int = 48) -> str:
    ids = tok.encode(text, bos=True)
    out = llama4.generate(model, [ids], n)[0]
    return tok.decode(out)


def chat_reply(model, tok, fmt: ChatFormat, user: str, n: int = 96) -> tuple[str, bool, int]:
    prompt = fmt.encode_dialog([{"role": "user", "content": user}])
    out = llama4.generate(model, [prompt], n, stop_ids=[tok.eot_id])[0]
    stopped = bool(out) and out[-1] == tok.eot_id
    return tok.decode([t for t in out if t != tok.eot_id]), stopped, len(out)


def image_accuracy(model, tok, path: Path, per_split: int, seed: int = 0) -> dict[str, dict]:
    from llama4.image import preprocess_image
    from llama4.train.multimodal import image_parts, load_image_ref

    vision = model.config.vision
    fmt = ChatFormat(tok)
    by_split: dict[str, list] = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        by_split.setdefault(rec["split"], []).append(rec)
    results = {}
    for split, recs in sorted(by_split.items()):
        recs = random.Random(seed).sample(recs, min(per_split, len(recs)))
        correct, examples = 0, []
        for b in range(0, len(recs), 16):
            prompts, feats, answers = [], [], []
            for rec in recs[b : b + 16]:
                user = rec["messages"][0]
                img = preprocess_image(
                    load_image_ref(image_parts([user])[0]),
                    tile_size=vision.image_size,
                    max_tiles=vision.max_tiles,
                )
                prompts.append(
                    fmt.encode_dialog([user], image_grids=[img.grid], tokens_per_tile=vision.tokens_per_tile)
                )
                with torch.no_grad():
                    feats.append(model.image_features(img.pixel_values))
                answers.append(rec["messages"][1]["content"])
            outs = llama4.generate(model, prompts, 12, stop_ids=[tok.eot_id], image_features=feats)
            for out, want, rec in zip(outs, answers, recs[b : b + 16]):
                got = tok.decode([t for t in out if t != tok.eot_id]).strip()
                ok = got.lower().rstrip(".") == want.lower()
                correct += ok
                if len(examples) < 6:
                    examples.append(
                        {"image": image_parts([rec["messages"][0]])[0], "answer": got, "name": want}
                    )
        results[split] = {"accuracy": correct / len(recs), "n": len(recs), "examples": examples}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--images", type=Path, help="vision eval JSONL (scripts/nano/derive_data.py)")
    ap.add_argument("--per-split", type=int, default=200, help="images scored per split (200)")
    ap.add_argument("--skip-bpb", action="store_true")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    model = llama4.load(args.model, dtype=torch.float32)
    tok = Tokenizer.find(args.model)
    report: dict = {"model": str(args.model)}
    t0 = time.time()
    if not args.skip_bpb:
        report["validation"] = evaluate_text(model, tok, VALIDATION.read_text(encoding="utf-8"))
        print(json.dumps({"validation": report["validation"]}), flush=True)
    report["continuation"] = {"prompt": PROMPT, "greedy": continuation(model, tok, PROMPT)}
    print(json.dumps(report["continuation"]), flush=True)
    fmt = ChatFormat(tok)
    report["chat"] = []
    for user in CHAT_TURNS:
        reply, stopped, n = chat_reply(model, tok, fmt, user)
        report["chat"].append({"user": user, "assistant": reply, "ended_with_eot": stopped, "tokens": n})
        print(json.dumps(report["chat"][-1]), flush=True)
    if args.images and model.config.vision is not None:
        report["images"] = image_accuracy(model, tok, args.images, args.per_split)
        print(json.dumps({k: (v["accuracy"], v["n"]) for k, v in report["images"].items()}), flush=True)
    report["eval_seconds"] = round(time.time() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
