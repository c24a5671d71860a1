#!/usr/bin/env bash
# Llama-2-7b reward model on one GPU (DeepSpeed-Chat's training_scripts/opt/single_gpu/run_1.3b.sh, with LoRA).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
OUTPUT=${1:-./output/step2_llama2_7b}; ZERO_STAGE=${2:-3}
mkdir -p "$OUTPUT"
deepspeed --num_gpus 1 "$REPO/step2_reward_model/main.py" \
  --model_name_or_path meta-llama/Llama-2-7b-hf \
  --data_path Dahoas/rm-static --data_split 2,4,4 \
  --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --max_seq_len 512 \
  --learning_rate 1e-3 --weight_decay 0.1 --num_train_epochs 1 --disable_dropout --gradient_accumulation_steps 8 \
  --lr_scheduler_type cosine --num_warmup_steps 0 --seed 1234 \
  --offload --lora_dim 128 --lora_module_name layers. --only_optimize_lora \
  --zero_stage "$ZERO_STAGE" --dtype auto --enable_tensorboard --save_interval 500 \
  --output_dir "$OUTPUT" "${@:3}" 2>&1 | tee "$OUTPUT/training.log"
