#!/usr/bin/env bash
# PPO: Llama-2-7b actor + Llama-2-7b critic/reward on one node (all GPUs), ZeRO-2, hybrid engine, EMA.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
ACTOR=${1:?step-1 output dir}; CRITIC=${2:?step-2 output dir}; OUTPUT=${3:-./output/step3_llama2_7b}
ACTOR_ZERO_STAGE=${4:-2}; CRITIC_ZERO_STAGE=${5:-2}
# the reference model's parameters can live on the CPU only under ZeRO-3 (at ZeRO-2 the flag is rejected)
REF_OFFLOAD=(); if [ "$ACTOR_ZERO_STAGE" = 3 ]; then REF_OFFLOAD=(--offload_reference_model); fi
mkdir -p "$OUTPUT"
deepspeed "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
  --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
  --data_split 2,4,4 --actor_zero_stage "$ACTOR_ZERO_STAGE" --critic_zero_stage "$CRITIC_ZERO_STAGE" \
  --per_device_generation_batch_size 16 --per_device_training_batch_size 16 --generation_batches 1 --ppo_epochs 1 \
  --max_answer_seq_len 256 --max_prompt_seq_len 256 \
  --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 --actor_weight_decay 0.1 --critic_weight_decay 0.1 \
  --num_train_epochs 1 --lr_scheduler_type cosine --num_warmup_steps 100 --gradient_accumulation_steps 1 --seed 1234 \
  --actor_gradient_checkpointing --critic_gradient_checkpointing ${REF_OFFLOAD[@]+"${REF_OFFLOAD[@]}"} \
  --actor_dropout 0.0 --enable_hybrid_engine --enable_ema --dtype auto \
  --enable_tensorboard --save_interval 200 --output_dir "$OUTPUT" "${@:6}" 2>&1 | tee "$OUTPUT/training.log"
