#!/usr/bin/env bash
# Datawhale-R1 (after Philipp Schmid's Mini-R1; TRL GRPOTrainer + vLLM): Qwen2.5-3B-Instruct on Countdown.
#
# Seed setting -> flags here: GRPO, 8 generations per prompt, beta 0.001 (k3 KL to the reference as a loss
# term), lr 5e-7 with a cosine schedule and 3% warm-up, 450 steps, prompt 256 / completion 1024 tokens,
# format + equation rewards (here: the R1 format rule and the Countdown rule, whose 0.1 for a formatted
# wrong answer is the only difference from the seed's 0/1 equation reward), one update per rollout (TRL's
# ratio-1 GRPO), sequence-mean loss, group std scaling, the chat prompt ending in "<think>".
# Scale: the seed trains on 2 GPUs (+1 for vLLM) with per-device batch 1 x 8 accumulation; here each step
# generates 16 prompts x 8 samples per GPU and updates in micro-batches of 8 (no accumulation in step 3).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
MODEL=${1:-Qwen/Qwen2.5-3B-Instruct}; DATA=${2:-generate:100000}; OUTPUT=${3:-./output/recipes/datawhale_r1_grpo}
NUM_GPUS=${NUM_GPUS:-2}
mkdir -p "$OUTPUT"
# shellcheck disable=SC2086
deepspeed --num_gpus "$NUM_GPUS" "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$MODEL" --algo grpo --num_generations 8 --beta 0.001 \
  --task countdown --prompt_style chat --data_path $DATA --reward countdown format \
  --actor_learning_rate 5e-7 --lr_scheduler_type cosine --num_warmup_steps 14 --max_steps 450 \
  --cliprange 0.2 --ppo_epochs 1 --loss_agg seq-mean-token-mean --scale_rewards \
  --max_prompt_seq_len 256 --max_answer_seq_len 1024 --temperature 1.0 \
  --per_device_generation_batch_size 16 --per_device_training_batch_size 8 \
  --actor_zero_stage 3 --actor_gradient_checkpointing --dtype bf16 \
  --eval_prompts 128 --save_interval 50 --enable_tensorboard \
  --output_dir "$OUTPUT" 2>&1 | tee "$OUTPUT/training.log"
