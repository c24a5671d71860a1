#!/usr/bin/env bash
# Offline default, CPU: the reward model starts from the step-1 model (a new scalar head) on the synthetic pairs.
# Usage: demo.sh STEP1_DIR [OUTPUT_DIR] (extra flags after them are passed through)
# 96 steps (one epoch of its 720 pairs): at 32 the reward model scored wrong answers in the right form as high
# as right ones ("9 * 1000 = 900 grams" 4.84); at 96 (from the 120-step step 1) it ranks a right held-out answer
# above a wrong one 87% of the time (74% before), but still prefers "17 x 14 = 224." to "= 238." (#15).
# Since half the data's wrong answers trail off into chatter (2026-12-04) it scores the base model's "cookie" + a
# sentence about cookies -5.44 against 3.67 for "COOKIE" (2.28 against 2.13 before; same step 1, same held-out
# prompts); arithmetic it still cannot check (192, 224 and 238 for 17 x 14 all score about 6).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
BASE=${1:-output/demo/step1}; OUTPUT=${2:-output/demo/step2}; shift 2 || shift $# || true
python3 "$REPO/step2_reward_model/main.py" \
  --model_name_or_path "$BASE" \
  --data_path synthetic --data_split 2,4,4 \
  --max_seq_len 128 --per_device_train_batch_size 8 --per_device_eval_batch_size 16 \
  --learning_rate 5e-5 --lr_scheduler_type cosine --num_warmup_steps 2 --max_steps 96 \
  --max_eval_samples 96 --disable_dropout --dtype auto --threads 2 \
  --enable_tensorboard --output_dir "$OUTPUT" "$@"
