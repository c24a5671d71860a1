#!/usr/bin/env bash
# The classic pipeline's answer to "a small model never writes the answer format, so every rule reward is 0":
# a step-1 warm start on solutions the project's own Countdown solver writes in the <think>/<answer> format
# (rendered exactly as step 3 renders its prompts), then GRPO with the Countdown rule + format reward.
# CPU size: SmolLM2-135M-Instruct (offline default). bench/countdown_r1.py measures what each stage gives.
#   DATA: a Countdown JSONL {"target", "nums"} (e.g. ../shared/data/countdown/train.jsonl) or "generate".
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../../.." && pwd)
DATA=${1:-generate}; MODEL=${2:-smollm2-135m-instruct}; OUTPUT=${3:-./output/recipes/smollm2_warm_start_countdown_cpu}
SFT_STEPS=${SFT_STEPS:-100}; RL_STEPS=${RL_STEPS:-8}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$OUTPUT"
python "$REPO/step3_rlhf/warm_start.py" --task countdown --data_path "$DATA" --num_count 3 --n 2000 \
  --out "$OUTPUT/warm_start.jsonl" --tokenizer "$MODEL"
python "$REPO/step1_sft/main.py" --model_name_or_path "$MODEL" --data_path "$OUTPUT/warm_start.jsonl" \
  --data_split 1,0,0 --max_seq_len 320 --per_device_train_batch_size 8 --learning_rate 1e-4 \
  --lr_scheduler_type cosine --num_warmup_steps 5 --max_steps "$SFT_STEPS" --max_eval_samples 64 \
  --dtype auto --no_resume --output_dir "$OUTPUT/step1" 2>&1 | tee "$OUTPUT/step1.log"
python "$REPO/step3_rlhf/main.py" --actor_model_name_or_path "$OUTPUT/step1" --algo grpo --num_generations 8 \
  --beta 0.001 --task countdown --data_path "$DATA" --reward countdown format=0.5 \
  --actor_learning_rate 5e-6 --lr_scheduler_type constant --max_steps "$RL_STEPS" \
  --max_prompt_seq_len 256 --max_answer_seq_len 128 \
  --per_device_generation_batch_size 4 --per_device_training_batch_size 16 \
  --dtype auto --eval_prompts 8 --no_resume --output_dir "$OUTPUT/step3" 2>&1 | tee "$OUTPUT/step3.log"
