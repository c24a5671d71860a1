"""Peer: TRL 1.16's GRPOTrainer on the prompts of workload W (G=8, 8 prompts x 8 samples per RL step).

    pip install --no-deps --target /tmp/trl1160 trl==1.16.0
    PYTHONPATH=/tmp/trl1160 python bench/peers/trl_grpo.py --policy DIR --reward DIR --prompts P.json --dtype bf16
Settings mirror our GRPO run: 8 prompts x G=8 = 64 completions per generation, exactly 64 new tokens
(min_new_tokens), T=1, beta 0.04 (so a reference model is built, as ours does), one optimizer step per 8
completions (steps_per_generation 8), one iteration, the reward model = the value-head checkpoint.
Prints one JSON line with seconds per RL step (8 optimizer steps; the warm-up step dropped).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import StepClock, load_prompt_ids, peer_args, report  # noqa: E402


def main():
    a = peer_args(__doc__, "--reward", 1, "timed RL steps after one warm-up step", "/tmp/trl_grpo_bench",
                  sizes=(("--prompts_per_step", 8), ("--group", 8)))
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    n = a.prompts_per_step * (a.steps + 1)
    texts = [tok.decode(ids) for ids in load_prompt_ids(a.prompts)[:n]]  # chat template already applied
    rows_per_step = a.prompts_per_step * a.group
    micro = 8
    cfg = GRPOConfig(output_dir=a.output_dir, per_device_train_batch_size=micro, gradient_accumulation_steps=1,
                     steps_per_generation=rows_per_step // micro, num_generations=a.group,
                     max_completion_length=a.new_tokens, generation_kwargs={"min_new_tokens": a.new_tokens},
                     temperature=1.0, beta=0.04, num_iterations=1, max_steps=(a.steps + 1) * rows_per_step // micro,
                     bf16=a.dtype == "bf16", fp16=False, use_cpu=True, report_to="none",
                     gradient_checkpointing=False, logging_steps=10 ** 6, save_strategy="no", seed=1234,
                     dataloader_num_workers=0, disable_tqdm=True, model_init_kwargs={"dtype": torch.float32},
                     log_completions=False)
    clock, optimizer_steps = StepClock(), [0]
    per_rl_step = rows_per_step // micro

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            optimizer_steps[0] += 1
            if optimizer_steps[0] % per_rl_step == 0:
                clock.tick()

    trainer = GRPOTrainer(model=a.policy, reward_funcs=a.reward, args=cfg,
                          train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tok,
                          reward_processing_classes=tok, callbacks=[Tick()])
    clock.__init__()
    trainer.train()
    wall, cpu = clock.timed()
    report("trl_grpo", a.dtype, rows_per_step, a.new_tokens, wall, cpu, {"trl_version": trl.__version__})


if __name__ == "__main__":
    main()
