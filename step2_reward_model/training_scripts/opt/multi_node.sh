#!/usr/bin/env bash
# OPT-350m reward model across nodes listed in a DeepSpeed hostfile ("host slots=8" per line), ZeRO-3.
# Run on the first node; every node needs this checkout and the data at the same path.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
OUTPUT=${1:-./output/step2_opt350m}; ZERO_STAGE=${2:-3}; HOSTFILE=${HOSTFILE:-/job/hostfile}
mkdir -p "$OUTPUT"
deepspeed --hostfile="$HOSTFILE" "$REPO/step2_reward_model/main.py" \
  --model_name_or_path facebook/opt-350m \
  --data_path Dahoas/rm-static Dahoas/full-hh-rlhf Dahoas/synthetic-instruct-gptj-pairwise yitingxie/rlhf-reward-datasets \
  --data_split 2,4,4 --per_device_train_batch_size 4 --per_device_eval_batch_size 4 --max_seq_len 512 \
  --learning_rate 5e-5 --weight_decay 0.0 --num_train_epochs 1 --disable_dropout --gradient_accumulation_steps 1 \
  --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 \
  --zero_stage "$ZERO_STAGE" --dtype auto --enable_tensorboard --save_interval 500 \
  --output_dir "$OUTPUT" "${@:3}" 2>&1 | tee "$OUTPUT/training.log"
