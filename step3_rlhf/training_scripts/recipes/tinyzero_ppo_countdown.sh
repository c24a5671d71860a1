#!/usr/bin/env bash
# TinyZero (R1-Zero on Countdown with veRL PPO): Qwen2.5-3B base, 2 GPUs, rule reward, critic from the policy.
#
# Seed setting -> flags here: PPO with a critic that starts from the policy (veRL critic.model.path =
# the base model; our default when --reward has rules only), the TinyZero Countdown rule alone (1 correct,
# 0.1 formatted, 0 otherwise), KL in the per-token reward with kl_coef 0.001, actor lr 1e-6, critic lr 1e-5,
# 256 prompts per step (128 per GPU x 2 GPUs), prompt 256 / response 1024 tokens, gamma = lam = 1, one PPO
# epoch, 15 epochs, TinyZero's base-model prompt ("A conversation between User and Assistant ... <think>").
# Differences: veRL updates in mini-batches of 128 sequences built from micro-batches of 8 (gradient
# accumulation); here each --per_device_training_batch_size micro-batch is one optimizer step, so 64 per GPU
# gives the same 128-sequence updates (with gradient checkpointing). veRL's entropy bonus (0.001) is not used.
#
# Data: the rows of Jiayi-Pan/Countdown-Tasks-3to4 as JSONL ({"target", "nums"}), e.g.
#   python -c "import datasets; datasets.load_dataset('Jiayi-Pan/Countdown-Tasks-3to4', split='train').to_json('countdown.jsonl')"
# or "TRAIN.jsonl TEST.jsonl"; the default generates solvable 3-number tasks offline.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
MODEL=${1:-Qwen/Qwen2.5-3B}; DATA=${2:-generate:100000}; OUTPUT=${3:-./output/recipes/tinyzero_ppo_countdown}
NUM_GPUS=${NUM_GPUS:-2}
mkdir -p "$OUTPUT"
# shellcheck disable=SC2086  # DATA may hold two paths (train and test)
deepspeed --num_gpus "$NUM_GPUS" "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$MODEL" --algo ppo --task countdown --prompt_style base \
  --data_path $DATA --reward countdown \
  --actor_learning_rate 1e-6 --critic_learning_rate 1e-5 --kl_ctl 0.001 --gamma 1.0 --lam 1.0 \
  --cliprange 0.2 --cliprange_value 0.5 --ppo_epochs 1 --num_train_epochs 15 --lr_scheduler_type constant \
  --max_prompt_seq_len 256 --max_answer_seq_len 1024 --temperature 1.0 \
  --per_device_generation_batch_size 128 --per_device_training_batch_size 64 \
  --actor_zero_stage 2 --critic_zero_stage 2 --actor_gradient_checkpointing --critic_gradient_checkpointing \
  --dtype bf16 --eval_prompts 256 --save_interval 100 --enable_tensorboard \
  --output_dir "$OUTPUT" 2>&1 | tee "$OUTPUT/training.log"
