#!/usr/bin/env bash
# Offline default, CPU: PPO with the four models (actor and reference from step 1, critic and reward from step 2).
# Rollouts sample at 0.7: at 1.0 a 135M model's replies are mostly code-like noise (entropy ~1.9 nats a token),
# which the reward model can only rank among themselves, so PPO learned from noise. The held-out table is greedy,
# as the driver's rule-checked held-out section scores.
# Usage: demo.sh STEP1_DIR STEP2_DIR [OUTPUT_DIR] (extra flags after them are passed through)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
ACTOR=${1:-output/demo/step1}; CRITIC=${2:-output/demo/step2}; OUTPUT=${3:-output/demo/step3}
shift 3 || shift $# || true
python3 "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
  --data_path synthetic --data_split 2,4,4 \
  --max_prompt_seq_len 96 --max_answer_seq_len 32 \
  --per_device_generation_batch_size 8 --per_device_training_batch_size 8 --generation_batches 1 --ppo_epochs 1 \
  --actor_learning_rate 1e-5 --critic_learning_rate 3e-5 --lr_scheduler_type constant --max_steps 24 \
  --temperature 0.7 --eval_temperature 0 \
  --kl_ctl 0.05 --dtype auto --threads 2 --eval_prompts 16 \
  --enable_tensorboard --output_dir "$OUTPUT" "$@"
