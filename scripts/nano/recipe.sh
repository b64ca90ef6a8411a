#!/usr/bin/env bash
# The whole recipe of the bundled nano Llama 4 (src/llama4/assets/nano), from the shared data:
#   bash scripts/nano/recipe.sh            (CPU; writes runs/nano/, then the package assets)
# Stages: data -> tokenizer -> text pretraining (MoE, plus the dense baseline of equal active
# parameters, the two run concurrently with one thread each) -> more pretraining of both (a
# re-warmed schedule from their weights) -> vision tower alone -> chat SFT (with plain text) ->
# vision (the tower fused into the chat model) -> anneal (text, chat and images at once, the
# rate decaying to almost nothing; at two peak rates side by side, then their mean) -> ship
# (bf16) -> checks. Wall time of each stage goes to runs/nano/times.txt.
#
# Measured for the shipped model (2 CPU cores, other work on the machine at times): data 26 s,
# tokenizer 95 s, pretraining 98 min and 52 min more (MoE and dense baseline at once, one
# thread each; 1600 + 1200 steps x 4096 tokens = 11.5M tokens each), tower 27 min (run beside
# the second pretraining stage), chat 542 s, vision 1314 s (both beside the dense run, one
# thread), anneal 50 min (its two runs at once, one thread each: 1500 steps of 4096 tokens, 3/4 of them text),
# ship a few seconds: about 4.3 hours. The evaluations after it take a few minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=runs/nano
mkdir -p $R
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
stage() { local name=$1; shift; local t0=$(date +%s); echo "== $name: $*"; "$@"; echo "$name $(( $(date +%s) - t0 )) s" | tee -a $R/times.txt; }
: > $R/times.txt

stage data python scripts/nano/derive_data.py --out $R/data
stage tokenizer llama4 tokenizer train --vocab-size 8192 --out $R/tokenizer.model \
  --text $(ls ../shared/data/text/*.txt | grep -v austen_persuasion.txt)

pretrain() {
  llama4 train --config recipes/nano.toml > $R/pretrain.log 2>&1 &
  local moe=$!
  llama4 train --config recipes/nano_dense.toml > $R/pretrain_dense.log 2>&1 &
  local dense=$!
  wait $moe
  wait $dense  # separate lines: under set -e a failure inside an && list does not stop the script
}
pretrain_more() {  # both runs again, from their stage-1 weights (a re-warmed schedule)
  llama4 train --config recipes/nano_more.toml > $R/pretrain_more.log 2>&1 &
  local moe=$!
  llama4 train --config recipes/nano_dense_more.toml > $R/pretrain_dense_more.log 2>&1 &
  local dense=$!
  wait $moe
  wait $dense  # separate lines: under set -e a failure inside an && list does not stop the script
}
stage pretrain pretrain
stage pretrain_more pretrain_more
OMP_NUM_THREADS=2 stage tower python -m llama4.train.multimodal --tower --config recipes/nano_tower.toml
OMP_NUM_THREADS=2 stage chat llama4 finetune --config recipes/nano_chat.toml
OMP_NUM_THREADS=2 stage vision python -m llama4.train.multimodal --config recipes/nano_vision.toml
anneal() {  # the same stage at two peak rates, side by side (one thread each), then their mean
  python -m llama4.train.multimodal --config recipes/nano_anneal.toml > $R/anneal.log 2>&1 &
  local high=$!
  python -m llama4.train.multimodal --config recipes/nano_anneal.toml --lr 4e-4 --out $R/anneal_low \
    > $R/anneal_low.log 2>&1 &
  local low=$!
  wait $high
  wait $low
  python scripts/nano/soup.py $R/final $R/anneal/model $R/anneal_low/model
}
stage anneal anneal
stage ship python scripts/nano/ship.py $R/final src/llama4/assets/nano

# The first checkpoint of pretraining (the run keeps only its last 3 checkpoints): its first 100
# steps are the warmup, the same whatever the total, so a 100-step run reproduces them.
stage first_run llama4 train --config recipes/nano.toml --steps 100 --out $R/first_run

# Validation bits per byte (austen_persuasion.txt, never trained on) and the checks.
for m in first_run/model pretrain/model pretrain_dense/model pretrain_more/model pretrain_dense_more/model \
  chat/model vision/model anneal/model anneal_low/model final; do
  echo "$m $(llama4 eval --model $R/$m --text ../shared/data/text/austen_persuasion.txt --json)" | tee -a $R/bpb.txt
done
stage checks python scripts/nano/evaluate.py src/llama4/assets/nano --images $R/data/vision_eval.jsonl \
  --json $R/checks.json
llama4 info src/llama4/assets/nano
