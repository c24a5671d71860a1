"""The models of step 3, each a DeepSpeed engine: actor (trained), reference (frozen), critic (trained),
reward model (frozen). Only the ones the algorithm needs are built: critic-free algorithms build no critic,
rule rewards need no reward model, and with actor LoRA the reference is the actor with adapters off.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from step3_rlhf.algorithms import algorithm
from step3_rlhf.experience import RewardFunction
from step3_rlhf.rollout.hybrid_engine import hybrid_kernels_missing
from step3_rlhf.tasks.rewards import RuleRewards, parse_reward_specs, split_specs
from utils.engine import build_frozen_engine, build_train_engine
from utils.lora import set_lora_enabled
from utils.models import TokenValues, load_causal_lm, load_value_model, unwrap


@dataclass
class Engines:
    actor: object
    reference: object | None      # None with reference_from_lora (then `reference_is_lora_off`) or when unused
    critic: object | None
    reward_fn: RewardFunction
    reference_is_lora_off: bool = False
    use_hybrid: bool = False


def _build_actor(cfg, ctx, common, log):
    """(actor engine, whether it is DeepSpeed's hybrid engine): only with --enable_hybrid_engine, on a GPU, for a
    model its kernels can run (hybrid_kernels_missing, decided before the engine is built, so a refused
    model gets a plain engine and the rollout backend any other run would get)."""
    actor = load_causal_lm(cfg.actor_model_name_or_path, dtype=ctx.dtype, trust_remote_code=cfg.trust_remote_code,
                           attention=cfg.attn_implementation, fused_layers=cfg.fused_layers, dropout=cfg.actor_dropout,
                           gradient_checkpointing=cfg.actor_gradient_checkpointing, lora_dim=cfg.actor_lora_dim,
                           lora_alpha=cfg.lora_alpha, lora_module_name=cfg.actor_lora_module_name,
                           lora_only=cfg.only_optimize_lora)
    use_hybrid = cfg.enable_hybrid_engine
    if use_hybrid:
        why_not = ("DeepSpeed's inference kernels need a GPU" if ctx.device.type != "cuda"
                   else hybrid_kernels_missing(actor))
        if why_not:
            log.info(f"--enable_hybrid_engine: {why_not}; a plain engine instead (the generation backend line says "
                     "who generates)")
            use_hybrid = False
    engine = build_train_engine(
        actor, lr=cfg.actor_learning_rate, weight_decay=cfg.actor_weight_decay, zero_stage=cfg.actor_zero_stage,
        offload=cfg.offload, lora_lr=cfg.actor_lora_learning_rate if cfg.actor_lora_dim else None,
        enable_hybrid_engine=use_hybrid, inference_tp_size=cfg.inference_tp_size,
        release_inference_cache=cfg.release_inference_cache, pin_parameters=not cfg.unpin_actor_parameters,
        tp_gather_partition_size=cfg.tp_gather_partition_size,
        max_out_tokens=cfg.max_prompt_seq_len + cfg.max_answer_seq_len, **common)
    return engine, use_hybrid


def build_engines(cfg, ctx, total_steps, log, critic_total_steps=None) -> Engines:
    """`total_steps` / `critic_total_steps`: optimizer updates of the actor / critic, the length of their LR
    schedules (they differ with PTX, which adds an actor micro-step per micro-batch). The trained engines get
    --gradient_accumulation_steps: their step() applies the optimizer (and the schedule) once per that many
    micro-steps, as in DeepSpeed-Chat."""
    algo = algorithm(cfg.algo)
    specs = parse_reward_specs(cfg.reward or [f"model:{cfg.critic_model_name_or_path}"])
    rule_specs, model_specs = split_specs(specs)
    if len(model_specs) > 1:
        raise ValueError("only one model: reward source is supported")
    micro = cfg.per_device_training_batch_size
    common = dict(world_size=ctx.world_size, dtype=ctx.dtype, total_steps=total_steps,
                  warmup_steps=cfg.num_warmup_steps, scheduler=cfg.lr_scheduler_type,
                  grad_accum=cfg.gradient_accumulation_steps,
                  grad_clip=cfg.grad_clip, micro_batch=micro)
    actor_engine, use_hybrid = _build_actor(cfg, ctx, common, log)

    # the trained models first: each one's optimizer set-up briefly holds zero gradients of its size, so
    # building the frozen models after them keeps that transient off their memory (a lower start-up peak)
    critic = None
    if algo.needs_critic:
        model = load_value_model(cfg.critic_model_name_or_path, dtype=ctx.dtype,
                                 trust_remote_code=cfg.trust_remote_code, dropout=cfg.critic_dropout,
                                 attention=cfg.attn_implementation, fused_layers=cfg.fused_layers,
                                 gradient_checkpointing=cfg.critic_gradient_checkpointing, lora_dim=cfg.critic_lora_dim,
                                 lora_alpha=cfg.lora_alpha, lora_module_name=cfg.critic_lora_module_name,
                                 lora_only=cfg.only_optimize_lora and cfg.critic_lora_dim > 0)
        critic = build_train_engine(TokenValues(model), lr=cfg.critic_learning_rate,
                                    weight_decay=cfg.critic_weight_decay, zero_stage=cfg.critic_zero_stage,
                                    offload=cfg.offload,
                                    lora_lr=cfg.critic_lora_learning_rate if cfg.critic_lora_dim else None,
                                    **{**common, "total_steps": critic_total_steps or total_steps})

    reference, lora_off = None, False
    if algo.needs_reference(cfg):
        if cfg.actor_lora_dim and cfg.reference_from_lora and cfg.only_optimize_lora:
            lora_off = True  # base weights are frozen, so actor-without-adapters IS the step-1 model
        else:
            ref = load_causal_lm(cfg.actor_model_name_or_path, dtype=ctx.dtype,
                                 trust_remote_code=cfg.trust_remote_code, disable_dropout=True,
                                 attention=cfg.attn_implementation,
                                 fused_layers=cfg.fused_layers)
            reference = build_frozen_engine(ref, micro_batch=micro, world_size=ctx.world_size,
                                            zero_stage=cfg.actor_zero_stage, offload=cfg.offload_reference_model,
                                            dtype=ctx.dtype)

    reward_engine, weight = None, 1.0
    if model_specs:
        rm = load_value_model(model_specs[0].path, dtype=ctx.dtype, trust_remote_code=cfg.trust_remote_code,
                              disable_dropout=True, attention=cfg.attn_implementation,
                              fused_layers=cfg.fused_layers)
        reward_engine = build_frozen_engine(TokenValues(rm), micro_batch=micro, world_size=ctx.world_size,
                                            zero_stage=cfg.critic_zero_stage, offload=cfg.offload_reward_model,
                                            dtype=ctx.dtype)
        weight = model_specs[0].weight
    rules = RuleRewards(rule_specs) if rule_specs else None
    built = ["actor"] + (["reference"] if reference is not None else []) + \
        (["reference = actor with LoRA off"] if lora_off else []) + (["critic"] if critic is not None else []) + \
        (["reward model"] if reward_engine is not None else []) + ([f"rules {[s.name for s in rule_specs]}"]
                                                                   if rules else [])
    log.info(f"{cfg.algo}: built {', '.join(built)}")
    return Engines(actor_engine, reference, critic, RewardFunction(reward_engine, weight, rules), lora_off, use_hybrid)


class ReferenceScope:
    """`with ReferenceScope(engines) as ref:` yields the model that gives reference log-probs."""

    def __init__(self, engines: Engines):
        self.engines = engines

    def __enter__(self):
        if self.engines.reference_is_lora_off:
            set_lora_enabled(unwrap(self.engines.actor), False)
            return self.engines.actor
        return self.engines.reference

    def __exit__(self, *exc):
        if self.engines.reference_is_lora_off:
            set_lora_enabled(unwrap(self.engines.actor), True)
        return False


class EMA:
    """Exponential moving average of the actor's (gathered) parameters, kept on CPU in fp32."""

    def __init__(self, model, decay):
        from utils.models import gathered_state_dict
        self.decay = decay
        self.shadow = {k: v.float().cpu() for k, v in gathered_state_dict(model).items()
                       if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model):
        from utils.models import gathered_state_dict
        for k, v in gathered_state_dict(model).items():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(v.float().cpu(), alpha=1 - self.decay)
