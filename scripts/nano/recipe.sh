#!/usr/bin/env bash
# The whole recipe of the bundled nano Llama 4 (src/llama4/assets/nano), from the shared data:
#   bash scripts/nano/recipe.sh            (CPU; writes runs/nano/, then the package assets)
# Stages: data -> tokenizer -> text pretraining (MoE, plus the dense baseline of equal active
# parameters, the two run concurrently with one thread each) -> chat SFT -> vision -> checks ->
# ship (bf16). Wall time of each stage goes to runs/nano/times.txt.
#
# Measured for the shipped model (2 CPU cores shared with five other engineers' test runs, so
# slow and noisy): data 26 s, tokenizer 95 s, pretraining 1559 s (both runs at once, one thread
# each; 170 steps x 2048 tokens = 348k tokens each), chat 135 s, vision 847 s, ship 11 s:
# about 45 minutes. The evaluations after it take 4-10 minutes per full-file bits-per-byte run.
set -euo pipefail
cd "$(dirname "$0")/../.."
R=runs/nano
mkdir -p $R
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
stage() { local name=$1; shift; local t0=$(date +%s); echo "== $name: $*"; "$@"; echo "$name $(( $(date +%s) - t0 )) s" | tee -a $R/times.txt; }
: > $R/times.txt

stage data python scripts/nano/derive_data.py --out $R/data
stage tokenizer llama4 tokenizer train --vocab-size 8192 --out $R/tokenizer.model \
  --text $(ls /work/shared/data/text/*.txt | grep -v austen_persuasion.txt)

pretrain() {
  llama4 train --config recipes/nano.toml > $R/pretrain.log 2>&1 &
  local moe=$!
  llama4 train --config recipes/nano_dense.toml > $R/pretrain_dense.log 2>&1 &
  local dense=$!
  wait $moe && wait $dense
}
stage pretrain pretrain
stage chat llama4 finetune --config recipes/nano_chat.toml
stage vision python -m llama4.train.multimodal --config recipes/nano_vision.toml
stage ship python scripts/nano/ship.py $R/vision/model src/llama4/assets/nano

# Validation bits per byte (austen_persuasion.txt, never trained on) and the checks.
first=$(ls -d $R/pretrain/checkpoints/step_* | sort -t_ -k2 -n | head -1)
python scripts/nano/checkpoint_to_model.py "$first" $R/first_checkpoint
for m in first_checkpoint pretrain/model pretrain_dense/model; do
  echo "$m $(llama4 eval --model $R/$m --text /work/shared/data/text/austen_persuasion.txt --json)" | tee -a $R/bpb.txt
done
stage checks python scripts/nano/evaluate.py src/llama4/assets/nano --images $R/data/vision_eval.jsonl \
  --json $R/checks.json
llama4 info src/llama4/assets/nano
