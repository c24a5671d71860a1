"""Peer: TRL's experimental PPOTrainer (trl==1.12.0, the last release that ships it) on workload W.

Run with trl on PYTHONPATH from a separate target dir (never a dependency of the toolkit):
    pip install --no-deps --target /tmp/trl1120 trl==1.12.0
    PYTHONPATH=/tmp/trl1120 python bench/peers/trl_ppo.py --policy DIR --value DIR --prompts P.json --dtype bf16
Settings mirror W: batch 8, one mini-batch, 1 PPO epoch, exactly 64 new tokens (no stop token), T=1,
policy = reference = the same checkpoint, value = reward = the same value-head checkpoint, no gradient
checkpointing (TRL's default is on; off is faster), no sample generations, no logging sinks.
Prints one JSON line; seconds per step (warm-up step dropped) and generation seconds per step.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import StepClock, load_prompt_ids, peer_args, report  # noqa: E402


def main():
    a = peer_args(__doc__, "--value", 8, "timed steps after one warm-up step", "/tmp/trl_ppo_bench",
                  sizes=(("--batch", 8),))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import trl
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as ppo_module

    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in tok.get_vocab() else tok.unk_token  # TRL masks pad ids
    n = a.batch * (a.steps + 1)
    ids = load_prompt_ids(a.prompts)[:n]
    train = Dataset.from_dict({"input_ids": ids})
    cfg = PPOConfig(output_dir=a.output_dir, per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,
                    num_mini_batches=1, num_ppo_epochs=1, total_episodes=n, response_length=a.new_tokens,
                    temperature=1.0, stop_token=None, local_rollout_forward_batch_size=a.batch,
                    num_sample_generations=0, bf16=a.dtype == "bf16", fp16=False, use_cpu=True, report_to="none",
                    gradient_checkpointing=False, logging_steps=10 ** 6, save_strategy="no", seed=1234,
                    dataloader_num_workers=0, disable_tqdm=True)
    load = dict(dtype=torch.float32)  # TRL's bf16 is autocast over fp32 weights (its documented mode)
    policy = AutoModelForCausalLM.from_pretrained(a.policy, **load)
    ref = AutoModelForCausalLM.from_pretrained(a.policy, **load)
    value = AutoModelForSequenceClassification.from_pretrained(a.value, num_labels=1, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(a.value, num_labels=1, **load)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id

    clock, gen_seconds = StepClock(), []
    real_generation = ppo_module.batch_generation

    def timed_generation(*args, **kw):
        t = time.perf_counter()
        out = real_generation(*args, **kw)
        gen_seconds.append(time.perf_counter() - t)
        return out

    ppo_module.batch_generation = timed_generation

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=train, eval_dataset=train.select(range(a.batch)),
                         callbacks=[Tick()])
    clock.__init__()
    trainer.train()
    wall, cpu = clock.timed()
    gen = gen_seconds[1:len(wall) + 1]
    report("trl_ppo", a.dtype, a.batch, a.new_tokens, wall, cpu,
           {"trl_version": trl.__version__, "generation_sec_per_step": sum(gen) / max(len(gen), 1)})


if __name__ == "__main__":
    main()
