#!/usr/bin/env bash
# PPO: OPT-1.3b actor (step 1) + OPT-350m critic/reward (step 2) on one GPU, LoRA actor.
# No --enable_hybrid_engine here (DeepSpeed-Chat has it): its kernels do not see our LoRA weights and would sample
# from the base model, so step 3 refuses the pair; generation uses the model's generate() instead.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
ACTOR=${1:?step-1 output dir}; CRITIC=${2:?step-2 output dir}; OUTPUT=${3:-./output/step3_opt1.3b}
ACTOR_ZERO_STAGE=${4:-0}; CRITIC_ZERO_STAGE=${5:-0}
mkdir -p "$OUTPUT"
deepspeed --num_gpus 1 "$REPO/step3_rlhf/main.py" \
  --actor_model_name_or_path "$ACTOR" --critic_model_name_or_path "$CRITIC" \
  --data_path Dahoas/rm-static --data_split 2,4,4 \
  --actor_zero_stage "$ACTOR_ZERO_STAGE" --critic_zero_stage "$CRITIC_ZERO_STAGE" \
  --per_device_generation_batch_size 8 --per_device_training_batch_size 8 --generation_batches 1 --ppo_epochs 1 \
  --max_answer_seq_len 256 --max_prompt_seq_len 256 \
  --actor_learning_rate 9.65e-6 --critic_learning_rate 5e-6 --num_train_epochs 1 --lr_scheduler_type cosine \
  --num_warmup_steps 100 --gradient_accumulation_steps 1 --seed 1234 \
  --actor_lora_dim 128 --actor_lora_module_name decoder.layers. --only_optimize_lora \
  --actor_gradient_checkpointing --actor_dropout 0.0 --dtype auto \
  --enable_tensorboard --save_interval 200 --output_dir "$OUTPUT" "${@:6}" 2>&1 | tee "$OUTPUT/training.log"
