#!/usr/bin/env bash
# TinyZero's setting (PPO + critic from the policy + Countdown rule, base-model prompt, kl_coef 0.001,
# gamma = lam = 1) at CPU size: SmolLM2-135M-Instruct (offline default), 3 steps of 4 prompts, 64-token answers.
# A model this small never writes the answer format on its own, so its reward stays 0 here; see
# smollm2_warm_start_countdown_cpu.sh for the warm start that gives it a learning signal.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
MODEL=${1:-smollm2-135m-instruct}; DATA=${2:-generate:400}; OUTPUT=${3:-./output/recipes/tinyzero_ppo_countdown_cpu}
STEPS=${STEPS:-3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # idle OpenMP threads yield (shared CPUs slow down a lot otherwise)
mkdir -p "$OUTPUT"
# shellcheck disable=SC2086
python "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$MODEL" --algo ppo --task countdown --prompt_style base \
  --data_path $DATA --reward countdown \
  --actor_learning_rate 1e-6 --critic_learning_rate 1e-5 --kl_ctl 0.001 --gamma 1.0 --lam 1.0 \
  --cliprange 0.2 --cliprange_value 0.5 --ppo_epochs 1 --max_steps "$STEPS" --lr_scheduler_type constant \
  --max_prompt_seq_len 256 --max_answer_seq_len 64 \
  --per_device_generation_batch_size 4 --per_device_training_batch_size 4 \
  --dtype auto --eval_prompts 4 --no_resume --output_dir "$OUTPUT" 2>&1 | tee "$OUTPUT/training.log"
