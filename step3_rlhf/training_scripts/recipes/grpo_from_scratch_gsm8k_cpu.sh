#!/usr/bin/env bash
# GRPO-from-scratch's setting (GRPO, G=12, beta 0.04, epsilon 0.1, lr 5e-6, GSM8K correctness x2 + format)
# at CPU size: SmolLM2-135M-Instruct (offline default), 2 steps of 1 question x 12 samples, 64-token answers.
# DATA: a local GSM8K JSONL {"question", "answer"} (offline), or the Hub name openai/gsm8k.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
DATA=${1:-openai/gsm8k}; MODEL=${2:-smollm2-135m-instruct}; OUTPUT=${3:-./output/recipes/grpo_from_scratch_gsm8k_cpu}
STEPS=${STEPS:-2}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$OUTPUT"
# shellcheck disable=SC2086
python "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$MODEL" --algo grpo --num_generations 12 --beta 0.04 --cliprange 0.1 \
  --task gsm8k --prompt_style chat --data_path $DATA --reward gsm8k=2.0 format=0.8 \
  --actor_learning_rate 5e-6 --lr_scheduler_type constant --max_steps "$STEPS" --ppo_epochs 1 \
  --max_prompt_seq_len 512 --max_answer_seq_len 64 \
  --per_device_generation_batch_size 1 --per_device_training_batch_size 12 \
  --dtype auto --eval_prompts 4 --no_resume --output_dir "$OUTPUT" 2>&1 | tee "$OUTPUT/training.log"
