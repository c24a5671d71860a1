#!/usr/bin/env bash
# Every stage at ZeRO-3 with two processes through the deepspeed launcher, on the real SmolLM2-135M-Instruct,
# a few steps each: the tests' tiny models stay gathered under ZeRO-3, a real model is released and gathered
# again, and three bugs showed only so (README, "When something goes wrong"). About 12 minutes on 2 CPU cores
# (17 with another job beside it).
# Usage: scripts/zero3_smoke.sh DEMO_DIR [WORK_DIR]   (DEMO_DIR: a finished scripts/demo.sh output, whose
#        step1 and step2 models step 3 starts from). Prints one line per run: name, exit code, seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:?usage: scripts/zero3_smoke.sh DEMO_DIR [WORK_DIR]}; W=${2:-output/zero3_smoke}
mkdir -p "$W"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
COMMON="--dtype bf16 --threads 1 --disable_progress_bar"
SFT="step1_sft/main.py --model_name_or_path smollm2-135m-instruct --data_path synthetic --data_split 10,0,0
     --max_seq_len 128 --per_device_train_batch_size 4 --zero_stage 3"
RM="step2_reward_model/main.py --model_name_or_path smollm2-135m-instruct --data_path synthetic --data_split 0,10,0
    --max_seq_len 128 --per_device_train_batch_size 4 --max_eval_samples 16 --zero_stage 3 --max_steps 3"
DPO="step2_dpo/main.py --model_name_or_path smollm2-135m-instruct --data_path synthetic --data_split 0,10,0
     --max_seq_len 128 --per_device_train_batch_size 4 --max_eval_samples 8 --zero_stage 3 --max_steps 3"
RL="step3_rlhf/main.py --actor_model_name_or_path $DEMO/step1 --critic_model_name_or_path $DEMO/step2
    --data_path synthetic --data_split 2,4,4 --max_prompt_seq_len 96 --max_answer_seq_len 32
    --per_device_generation_batch_size 4 --per_device_training_batch_size 4 --max_steps 2 --eval_prompts 4
    --actor_zero_stage 3 --critic_zero_stage 3"
failed=0
port=29600
run() {  # run NAME STAGE-ARGS...: one launch, its log in $W/NAME.log
    local name=$1 start=$SECONDS; shift; port=$((port + 1))
    # shellcheck disable=SC2068 - the stage arguments are meant to split into words
    deepspeed --num_gpus 2 --master_port $port $@ $COMMON > "$W/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $((SECONDS - start))s $(grep -m1 -E 'Error|error:' "$W/$name.log" | cut -c1-160)"
    [ $rc -eq 0 ] || failed=1
}
run sft $SFT --max_steps 3 --output_dir "$W/sft" --no_resume
run sft_offload $SFT --offload --max_steps 2 --output_dir "$W/sft_offload" --no_resume
run sft_lora $SFT --lora_dim 8 --max_steps 2 --output_dir "$W/sft_lora" --no_resume
run sft_first2 $SFT --max_steps 2 --save_interval 1 --output_dir "$W/sft_resume" --no_resume
run sft_resume $SFT --max_steps 4 --save_interval 1 --output_dir "$W/sft_resume"
run reward_model $RM --lm_loss_coef 0.1 --output_dir "$W/rm" --no_resume
run dpo $DPO --output_dir "$W/dpo" --no_resume
run ppo $RL --algo ppo --output_dir "$W/ppo" --no_resume
run ppo_offload_frozen $RL --algo ppo --offload_reference_model --offload_reward_model --output_dir "$W/ppo_off" \
    --no_resume
run grpo $RL --algo grpo --num_generations 4 --output_dir "$W/grpo" --no_resume
grep -q "resuming from" "$W/sft_resume.log" || { echo "sft_resume: did not resume"; failed=1; }
exit $failed
