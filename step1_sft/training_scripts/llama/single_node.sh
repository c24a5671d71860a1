#!/usr/bin/env bash
# Llama-2-7b actor on one node with all its GPUs, ZeRO-3 (DeepSpeed-Chat's single_node/run_llama2_7b.sh).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
OUTPUT=${1:-./output/step1_llama2_7b}; ZERO_STAGE=${2:-3}
mkdir -p "$OUTPUT"
deepspeed "$REPO/step1_sft/main.py" \
  --model_name_or_path meta-llama/Llama-2-7b-hf \
  --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
  --data_split 2,4,4 --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_seq_len 512 \
  --learning_rate 9.65e-6 --gradient_checkpointing --weight_decay 0.0 --num_train_epochs 16 --gradient_accumulation_steps 1 \
  --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 \
  --zero_stage "$ZERO_STAGE" --dtype auto --enable_tensorboard --save_interval 500 \
  --output_dir "$OUTPUT" "${@:3}" 2>&1 | tee "$OUTPUT/training.log"
