"""Step 3's tokenizer check at start (utils/tokenizer_bridge.py does the comparing and re-tokenising): the
critic must share the actor's tokenizer (it gives a value per actor token); a reward model of another
tokenizer family scores through a RewardBridge instead of silently reading the actor's token ids."""
from __future__ import annotations

from utils.models import load_tokenizer
from utils.options import ConfigError
from utils.tokenizer_bridge import RewardBridge, compare, describe, max_positions, reward_checkpoint_problem


def check_step3_tokenizers(cfg, actor_tokenizer, log) -> RewardBridge | None:
    """At step 3's start, before any model loads: a RewardBridge when the reward model's tokenizer differs from
    the actor's (None when they match or no reward model is used); a critic of another tokenizer is refused."""
    trust = getattr(cfg, "trust_remote_code", False)
    actor_name = cfg.tokenizer_name_or_path or cfg.actor_model_name_or_path
    if cfg.needs_critic and cfg.critic_model_name_or_path not in ("", cfg.actor_model_name_or_path):
        critic_tok = load_tokenizer(cfg.critic_model_name_or_path, trust)
        why = compare(actor_tokenizer, critic_tok)
        if why:
            raise ConfigError(f"the critic needs a value per actor token, but --critic_model_name_or_path "
                              f"{describe(critic_tok)} and the actor {actor_name}, {describe(actor_tokenizer)} "
                              f"use different tokenizers ({why}); start the critic from a model of the actor's "
                              "family and pass the reward model as --reward model:PATH")
    paths = cfg.reward_model_paths()
    if not paths:
        return None
    problem = reward_checkpoint_problem(paths[0])
    if problem:
        log.info(f"warning: {problem}")
    reward_tok = load_tokenizer(getattr(cfg, "reward_tokenizer", "") or paths[0], trust)
    why = compare(actor_tokenizer, reward_tok)
    if why is None:
        return None
    log.info(f"the reward model {paths[0]} uses another tokenizer than the actor ({why}): its scores come from "
             f"the actor's samples decoded and re-tokenised with {describe(reward_tok)}")
    return RewardBridge(actor_tokenizer, reward_tok, max_positions(paths[0]))
