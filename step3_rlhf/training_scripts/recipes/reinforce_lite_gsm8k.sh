#!/usr/bin/env bash
# "Reinforce-Lite": REINFORCE with a group-relative advantage, 10 samples per prompt, no KL term (so no
# reference model is built), no ratio and no clipping, no critic: the lightest RL step this toolkit has.
#
# Seed setting -> flags here: --algo reinforce (loss -A * log p, A = (r - group mean) / group std),
# --num_generations 10, --beta 0. Model, task (GSM8K), learning rate and batch sizes are this recipe's own
# choices, not the seed's: a 1.5B instruct model, lr 1e-6, 8 questions x 10 samples per GPU per step.
#
# Data: GSM8K as JSONL {"question", "answer"} ("TRAIN.jsonl TEST.jsonl"), or the Hub name openai/gsm8k.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
MODEL=${1:-Qwen/Qwen2.5-1.5B-Instruct}; DATA=${2:-openai/gsm8k}; OUTPUT=${3:-./output/recipes/reinforce_lite_gsm8k}
NUM_GPUS=${NUM_GPUS:-1}
mkdir -p "$OUTPUT"
# shellcheck disable=SC2086
deepspeed --num_gpus "$NUM_GPUS" "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$MODEL" --algo reinforce --num_generations 10 --beta 0 --scale_rewards \
  --task gsm8k --prompt_style chat --data_path $DATA --reward gsm8k format=0.2 \
  --actor_learning_rate 1e-6 --lr_scheduler_type constant --max_steps 500 --ppo_epochs 1 \
  --max_prompt_seq_len 512 --max_answer_seq_len 512 --temperature 1.0 \
  --per_device_generation_batch_size 8 --per_device_training_batch_size 10 \
  --actor_zero_stage 2 --actor_gradient_checkpointing --dtype bf16 \
  --eval_prompts 128 --save_interval 50 --enable_tensorboard \
  --output_dir "$OUTPUT" 2>&1 | tee "$OUTPUT/training.log"
