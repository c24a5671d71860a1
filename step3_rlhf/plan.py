"""Step 3's part of `--dry_run` (utils/plan.py holds the shared arithmetic): the four models, the steps, the
generation backend step 3 will take and why, and the peak-memory estimate of its phases."""
from __future__ import annotations

from step3_rlhf.algorithms import algorithm
from step3_rlhf.rollout import planned_backend
from utils.models import load_tokenizer
from utils.plan import PlanLog, dtype_bytes, millions, model_shape, rlhf_memory


def rlhf_plan(cfg, world, dtype, device_type):
    """Step 3's part of a --dry_run plan: (plan lines, memory breakdown); nothing is loaded but configs and data."""
    from step3_rlhf.main import plan_steps
    from step3_rlhf.prompt_data import load_prompts
    tokenizer = load_tokenizer(cfg.tokenizer_name_or_path or cfg.actor_model_name_or_path, cfg.trust_remote_code)
    train_items, eval_items = load_prompts(cfg, tokenizer, PlanLog())
    steps, actor_updates, _ = plan_steps(cfg, len(train_items), world)
    actor = model_shape(cfg.actor_model_name_or_path, False, cfg.trust_remote_code)
    critic = model_shape(cfg.critic_model_name_or_path, True, cfg.trust_remote_code) if cfg.needs_critic else None
    reward_paths = cfg.reward_model_paths()
    reward = model_shape(reward_paths[0], True, cfg.trust_remote_code) if reward_paths else None
    reference = algorithm(cfg.algo).needs_reference(cfg) and not (cfg.actor_lora_dim and cfg.reference_from_lora and cfg.only_optimize_lora)
    backend, why = planned_backend(cfg, device_type, world)
    models = [f"actor {millions(actor.params)} (ZeRO {cfg.actor_zero_stage})"] + \
        (["reference (frozen copy)"] if reference else []) + \
        ([f"critic {millions(critic.params)} (ZeRO {cfg.critic_zero_stage})"] if critic else []) + \
        ([f"reward model {millions(reward.params)} (frozen)"] if reward else [])
    rows = cfg.per_device_generation_batch_size * cfg.num_generations
    lines = [f"{cfg.algo}: {', '.join(models)}; {actor.model_type}",
             f"prompts: {len(train_items)} training / {len(eval_items[: cfg.eval_prompts])} held-out ({cfg.task})",
             f"{steps} steps of {cfg.generation_batches} x {rows} samples per process, {cfg.ppo_epochs} PPO epoch(s), "
             f"micro-batch {cfg.per_device_training_batch_size}, {actor_updates} actor updates, "
             f"{cfg.max_prompt_seq_len} prompt + {cfg.max_answer_seq_len} answer tokens",
             f"generation: {backend} ({why})"]
    mem = rlhf_memory(actor, critic, nbytes=dtype_bytes(dtype), world=world, actor_zero=cfg.actor_zero_stage,
                      critic_zero=cfg.critic_zero_stage, reference=reference, reward_model=reward, gen_rows=rows,
                      train_rows=cfg.per_device_training_batch_size, prompt_len=cfg.max_prompt_seq_len,
                      answer_len=cfg.max_answer_seq_len, fused=cfg.fused_layers,
                      actor_checkpointing=cfg.actor_gradient_checkpointing,
                      critic_checkpointing=cfg.critic_gradient_checkpointing)
    return lines, mem
