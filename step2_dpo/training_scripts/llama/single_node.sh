#!/usr/bin/env bash
# DPO of the Llama-2-7b step-1 actor on one node with all its GPUs, ZeRO-3 with offload (DeepSpeed-Chat's
# step2_dpo llama2/run_llama2_7b.sh options). Usage: single_node.sh STEP1_DIR [OUTPUT] [ZERO_STAGE]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
ACTOR=${1:?step-1 output dir (the model DPO starts from)}; OUTPUT=${2:-./output/step2_dpo_llama2_7b}
ZERO_STAGE=${3:-3}
# the optimizer state and the reference's parameters go to the CPU only under ZeRO-3 (else both are rejected)
OFFLOAD=(); if [ "$ZERO_STAGE" = 3 ]; then OFFLOAD=(--offload --offload_reference_model); fi
mkdir -p "$OUTPUT"
deepspeed "$REPO/step2_dpo/main.py" \
  --model_name_or_path "$ACTOR" \
  --data_path Dahoas/rm-static --data_split 2,4,4 \
  --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_seq_len 512 \
  --learning_rate 9.65e-6 --weight_decay 0.1 --num_train_epochs 1 --disable_dropout --gradient_accumulation_steps 1 \
  --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 --beta 0.1 --loss_type sigmoid \
  --gradient_checkpointing ${OFFLOAD[@]+"${OFFLOAD[@]}"} \
  --zero_stage "$ZERO_STAGE" --dtype auto --enable_tensorboard --save_interval 500 \
  --output_dir "$OUTPUT" "${@:4}" 2>&1 | tee "$OUTPUT/training.log"
