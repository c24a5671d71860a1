#!/usr/bin/env bash
# Offline default, CPU: DPO of the step-1 model on the synthetic pairs, against a frozen copy of it (instead of
# step 2's reward model and step 3). Usage: demo.sh STEP1_DIR [OUTPUT_DIR] (extra flags after them pass through)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BASE=${1:-output/demo/step1}; OUTPUT=${2:-output/demo/step2_dpo}; shift 2 || shift $# || true
python3 "$REPO/step2_dpo/main.py" \
  --model_name_or_path "$BASE" \
  --data_path synthetic --data_split 2,4,4 \
  --max_seq_len 128 --per_device_train_batch_size 8 --per_device_eval_batch_size 16 \
  --learning_rate 1e-5 --lr_scheduler_type cosine --num_warmup_steps 2 --max_steps 32 \
  --beta 0.1 --loss_type sigmoid \
  --max_eval_samples 96 --disable_dropout --dtype auto --threads 2 \
  --enable_tensorboard --output_dir "$OUTPUT" "$@"
