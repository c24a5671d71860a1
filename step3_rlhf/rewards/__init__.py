"""Rule-based rewards and R1-Zero style tasks (Countdown, GSM8K) for step 3. Pure Python, no torch."""
from step3_rlhf.rewards.countdown import countdown_reward, extract_answer, generate_tasks, solution_text, solve
from step3_rlhf.rewards.format import format_reward, length_reward
from step3_rlhf.rewards.gsm8k import extract_model_answer, extract_reference, gsm8k_reward, numbers_equal
from step3_rlhf.rewards.prompts import (TaskPrompt, countdown_prompt, gsm8k_prompt, load_countdown_jsonl,
                                        load_gsm8k_jsonl)
from step3_rlhf.rewards.registry import ModelRewardSpec, RuleRewards, RuleSpec, parse_reward_specs, split_specs
from step3_rlhf.rewards.safe_arith import UnsafeExpression, safe_eval

__all__ = [
    "countdown_reward", "extract_answer", "generate_tasks", "solution_text", "solve",
    "format_reward", "length_reward",
    "extract_model_answer", "extract_reference", "gsm8k_reward", "numbers_equal",
    "TaskPrompt", "countdown_prompt", "gsm8k_prompt", "load_countdown_jsonl", "load_gsm8k_jsonl",
    "ModelRewardSpec", "RuleRewards", "RuleSpec", "parse_reward_specs", "split_specs",
    "UnsafeExpression", "safe_eval",
]
