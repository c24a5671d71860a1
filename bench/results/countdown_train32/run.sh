#!/bin/bash
# Can GRPO raise greedy accuracy on the very tasks it trains on? 32 training tasks (train32.jsonl: the first 32 rows of
# the RL tasks bench/countdown_algorithms.py wrote), each drawn about 16 times in 45 minutes of RL. /tmp/cd1/sft is that
# bench's warm start (--heldout val --warm_trace search --max_tries 1; see countdown_val_search1.json), /tmp/cd1/heldout.jsonl
# its 200 validation tasks. Afterwards, for MODEL in the warm start and /tmp/cd4/mem32/actor, TASKS in both files:
#   python bench/countdown_r1.py --phase eval MODEL TASKS OUT.json 16 128 2
cd /work/main
python step3_rlhf/main.py --actor_model_name_or_path /tmp/cd1/sft --algo grpo --task countdown \
 --data_path /tmp/cd4/train32.jsonl /tmp/cd4/train32.jsonl --reward countdown format=0.5 \
 --max_prompt_seq_len 256 --max_answer_seq_len 128 --num_generations 8 --per_device_generation_batch_size 4 \
 --per_device_training_batch_size 16 --actor_learning_rate 5e-6 --beta 0.04 --lr_scheduler_type constant \
 --max_steps 100000 --max_train_seconds 2700 --eval_prompts 32 --eval_interval 8 --eval_temperature 0 \
 --per_device_eval_batch_size 16 --seed 1234 --dtype auto --threads 2 --disable_progress_bar --no_resume \
 --cliprange_high 0.28 --enable_tensorboard --output_dir /tmp/cd4/mem32 > /tmp/cd4/mem32.log 2>&1
echo rc=$? >> /tmp/cd4/mem32.log
