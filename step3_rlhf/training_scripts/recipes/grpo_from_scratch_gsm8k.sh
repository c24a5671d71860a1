#!/usr/bin/env bash
# "GRPO from scratch" (A. Burkov's notebook; Qwen2.5-1.5B-Instruct on GSM8K, multi-GPU data parallel).
#
# Seed setting -> flags here: GRPO, 12 generations per prompt, beta 0.04, epsilon (clip) 0.1, lr 5e-6, one
# policy update per rollout (mu = 1), 7 questions per step, completions up to 400 tokens, rewards =
# correctness (2.0) + format; here the GSM8K rule (final number, commas and $ removed) weighted 2 and the R1
# format rule weighted 0.8 (the seed gives up to 0.8 for its tags), chat prompt ending in "<think>".
# The seed counts 500 steps of 7 questions on 8 GPUs; NUM_GPUS x 7 questions per step here.
#
# Data: GSM8K as JSONL {"question", "answer"} ("TRAIN.jsonl TEST.jsonl"), or the Hub name openai/gsm8k.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
MODEL=${1:-Qwen/Qwen2.5-1.5B-Instruct}; DATA=${2:-openai/gsm8k}; OUTPUT=${3:-./output/recipes/grpo_from_scratch_gsm8k}
NUM_GPUS=${NUM_GPUS:-8}
mkdir -p "$OUTPUT"
# shellcheck disable=SC2086
deepspeed --num_gpus "$NUM_GPUS" "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$MODEL" --algo grpo --num_generations 12 --beta 0.04 --cliprange 0.1 \
  --task gsm8k --prompt_style chat --data_path $DATA --reward gsm8k=2.0 format=0.8 \
  --actor_learning_rate 5e-6 --lr_scheduler_type constant --max_steps 500 --ppo_epochs 1 \
  --max_prompt_seq_len 512 --max_answer_seq_len 400 --temperature 1.0 \
  --per_device_generation_batch_size 7 --per_device_training_batch_size 12 \
  --actor_zero_stage 2 --actor_gradient_checkpointing --dtype bf16 \
  --eval_prompts 128 --save_interval 50 --enable_tensorboard \
  --output_dir "$OUTPUT" 2>&1 | tee "$OUTPUT/training.log"
