#!/usr/bin/env bash
# DPO of the OPT-1.3b step-1 actor on one GPU, ZeRO-0 (DeepSpeed-Chat's step2_dpo opt/single_gpu/run_350m.sh
# options; a lower learning rate for the larger model). Usage: single_gpu.sh STEP1_DIR [OUTPUT] [ZERO_STAGE]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
ACTOR=${1:?step-1 output dir (the model DPO starts from)}; OUTPUT=${2:-./output/step2_dpo_opt1.3b}; ZERO_STAGE=${3:-0}
mkdir -p "$OUTPUT"
deepspeed --num_gpus 1 "$REPO/step2_dpo/main.py" \
  --model_name_or_path "$ACTOR" \
  --data_path Dahoas/rm-static --data_split 2,4,4 \
  --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --max_seq_len 512 \
  --learning_rate 5e-6 --weight_decay 0.1 --num_train_epochs 1 --disable_dropout --gradient_accumulation_steps 4 \
  --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 --beta 0.1 --loss_type sigmoid \
  --gradient_checkpointing \
  --zero_stage "$ZERO_STAGE" --dtype auto --enable_tensorboard --save_interval 500 \
  --output_dir "$OUTPUT" "${@:4}" 2>&1 | tee "$OUTPUT/training.log"
