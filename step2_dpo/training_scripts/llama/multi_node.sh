#!/usr/bin/env bash
# DPO of the Llama-2-7b step-1 actor across nodes listed in a DeepSpeed hostfile ("host slots=8" per line), ZeRO-3
# (policy and reference sharded). Run on the first node; every node needs this checkout, the step-1 model and
# the data at the same path. Usage: multi_node.sh STEP1_DIR [OUTPUT] [ZERO_STAGE]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
ACTOR=${1:?step-1 output dir (the model DPO starts from)}; OUTPUT=${2:-./output/step2_dpo_llama2_7b}
ZERO_STAGE=${3:-3}; HOSTFILE=${HOSTFILE:-/job/hostfile}
mkdir -p "$OUTPUT"
deepspeed --hostfile="$HOSTFILE" "$REPO/step2_dpo/main.py" \
  --model_name_or_path "$ACTOR" \
  --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
  --data_split 2,4,4 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --max_seq_len 512 \
  --learning_rate 9.65e-6 --weight_decay 0.1 --num_train_epochs 1 --disable_dropout --gradient_accumulation_steps 1 \
  --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 --beta 0.1 --loss_type sigmoid \
  --gradient_checkpointing \
  --zero_stage "$ZERO_STAGE" --dtype auto --enable_tensorboard --save_interval 500 \
  --output_dir "$OUTPUT" "${@:4}" 2>&1 | tee "$OUTPUT/training.log"
