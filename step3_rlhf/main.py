"""Step 3: RLHF. PPO with four DeepSpeed engines (DeepSpeed-Chat's recipe), or GRPO / RLOO / REINFORCE.

    deepspeed step3_rlhf/main.py --actor_model_name_or_path STEP1_DIR --critic_model_name_or_path STEP2_DIR ...
Writes OUTPUT_DIR/actor, OUTPUT_DIR/critic (PPO) and OUTPUT_DIR/actor_ema (--enable_ema) in HF format.
"""
import os
import sys

if __package__ in (None, ""):  # `python step3_rlhf/main.py` from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # before torch is imported: re-exec once under tcmalloc where the machine has it
    from utils.allocator import use_tcmalloc
    use_tcmalloc()

import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

from step3_rlhf.config import RLHFConfig  # noqa: E402
from step3_rlhf.engines import build_engines  # noqa: E402
from step3_rlhf.evaluate import eval_scalars, evaluate_policy, run_summary, summary_lines  # noqa: E402
from step3_rlhf.experience_maker import ExperienceMaker  # noqa: E402
from step3_rlhf.prompt_data import collate_prompts, load_prompts, ptx_batches  # noqa: E402
from step3_rlhf.loop import fit  # noqa: E402
from step3_rlhf.plan import rlhf_plan  # noqa: E402
from step3_rlhf.tokenizer_check import check_step3_tokenizers  # noqa: E402
from step3_rlhf.trainer import RLTrainer  # noqa: E402
from utils.models import load_tokenizer, save_hf_model, save_hf_state, unwrap  # noqa: E402
from utils.options import parse_config  # noqa: E402
from utils.report_tables import before_after_table  # noqa: E402
from utils.plan import dry_run  # noqa: E402
from utils.stage import finish_stage, run_main, start_stage  # noqa: E402


def plan_steps(cfg, n_prompts, world_size):
    """(RL steps, optimizer updates of the actor, of the critic) for the schedules: one engine micro-step per
    micro-batch (two for the actor with PTX), one optimizer update per --gradient_accumulation_steps of them."""
    batches = math.ceil(math.ceil(n_prompts / world_size) / cfg.per_device_generation_batch_size)
    steps = cfg.max_steps or cfg.num_train_epochs * math.ceil(batches / cfg.generation_batches)
    micro = cfg.generation_batches * cfg.per_device_generation_batch_size * cfg.num_generations \
        // cfg.per_device_training_batch_size
    critic_micro_steps = steps * cfg.ppo_epochs * micro
    actor_micro_steps = critic_micro_steps * (2 if cfg.unsupervised_dataset_name else 1)
    accum = cfg.gradient_accumulation_steps
    return steps, math.ceil(actor_micro_steps / accum), math.ceil(critic_micro_steps / accum)


def main(argv=None):
    cfg = parse_config(RLHFConfig, argv)
    if cfg.dry_run:  # plan + memory estimate, no training (utils/plan.py)
        return dry_run(cfg, rlhf_plan)
    ctx = start_stage(cfg)
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.actor_model_name_or_path, cfg.trust_remote_code)
    bridge = check_step3_tokenizers(cfg, tokenizer, ctx.log)  # before any model loads: a critic of another family
    train_items, eval_items = load_prompts(cfg, tokenizer, ctx.log)
    eval_items = eval_items[: cfg.eval_prompts]
    steps, actor_updates, critic_updates = plan_steps(cfg, len(train_items), ctx.world_size)
    engines = build_engines(cfg, ctx, actor_updates, ctx.log, critic_updates)
    engines.reward_fn.bridge = bridge
    ptx = ptx_batches(cfg, tokenizer, cfg.per_device_training_batch_size, cfg.max_prompt_seq_len
                      + cfg.max_answer_seq_len, ctx.rank, ctx.world_size) if cfg.unsupervised_dataset_name else None
    maker = ExperienceMaker(cfg, engines, tokenizer, ctx,
                            functools.partial(collate_prompts, pad_id=tokenizer.pad_token_id))
    trainer = RLTrainer(cfg, engines, ctx, ptx)
    ctx.log.info(f"{len(train_items)} training prompts, {len(eval_items)} held-out prompts, {steps} steps of "
                 f"{cfg.generation_batches * cfg.per_device_generation_batch_size * cfg.num_generations} samples")

    heldout = functools.partial(evaluate_policy, maker, eval_items,
                                cfg.per_device_eval_batch_size or cfg.per_device_generation_batch_size, cfg.seed + 1)
    before_path = os.path.join(cfg.output_dir, "eval_before.json")
    before = None
    if eval_items:
        if os.path.exists(before_path) and not cfg.no_resume:  # resumed: measured before the crash
            with open(before_path) as f:
                before = json.load(f)
        else:
            before = heldout()
            ctx.log.write_json(before_path, before)
        ctx.log.scalars(eval_scalars(before), 0)  # the first point of the eval/* curve

    history = fit(maker, trainer, train_items, steps, heldout if eval_items else None)

    after = heldout() if eval_items else None
    if after and history:  # the last point of the eval/* curve
        ctx.log.scalars(eval_scalars(after), len(history))
    save_hf_model(engines.actor, tokenizer, os.path.join(cfg.output_dir, "actor"), rank=ctx.rank)
    if engines.critic is not None:
        save_hf_model(engines.critic, tokenizer, os.path.join(cfg.output_dir, "critic"), rank=ctx.rank)
    if trainer.ema is not None:
        save_hf_state(unwrap(engines.actor), trainer.ema.shadow, tokenizer, os.path.join(cfg.output_dir, "actor_ema"),
                      ctx.rank, dtype=ctx.dtype)
    detectors = run_summary(history, before, after, cfg.detector_window, cfg.detector_kl_growth)
    summary = {"stage": cfg.stage_name, "algo": cfg.algo, "steps": len(history), "history": history,
               "before": before, "after": after, "detectors": detectors, "wall_seconds": ctx.log.elapsed()}
    if before and after and ctx.rank == 0:
        print(before_after_table(before, after), flush=True)
    finish_stage(ctx, cfg, summary, summary_lines(detectors) + [
        f"saved actor{'/critic' if engines.critic is not None else ''}"
        f"{'/actor_ema' if trainer.ema is not None else ''} (HF format) under {cfg.output_dir}"])


if __name__ == "__main__":
    run_main(main)
