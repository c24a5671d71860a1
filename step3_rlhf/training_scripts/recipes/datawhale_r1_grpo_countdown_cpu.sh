#!/usr/bin/env bash
# Datawhale-R1's setting (GRPO, G=8, beta 0.001, lr 5e-7 cosine, format + Countdown rewards, chat prompt) at
# CPU size: SmolLM2-135M-Instruct (offline default), 3 steps of 1 prompt x 8 samples, 64-token answers.
# From the base model every reward is 0 (no learning signal); smollm2_warm_start_countdown_cpu.sh fixes that.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
MODEL=${1:-smollm2-135m-instruct}; DATA=${2:-generate:400}; OUTPUT=${3:-./output/recipes/datawhale_r1_grpo_cpu}
STEPS=${STEPS:-3}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$OUTPUT"
# shellcheck disable=SC2086
python "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$MODEL" --algo grpo --num_generations 8 --beta 0.001 \
  --task countdown --prompt_style chat --data_path $DATA --reward countdown format \
  --actor_learning_rate 5e-7 --lr_scheduler_type cosine --max_steps "$STEPS" \
  --cliprange 0.2 --ppo_epochs 1 --loss_agg seq-mean-token-mean --scale_rewards \
  --max_prompt_seq_len 256 --max_answer_seq_len 64 \
  --per_device_generation_batch_size 1 --per_device_training_batch_size 8 \
  --dtype auto --eval_prompts 4 --no_resume --output_dir "$OUTPUT" 2>&1 | tee "$OUTPUT/training.log"
