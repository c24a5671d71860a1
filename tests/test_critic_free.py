"""Critic-free RL (GRPO, RLOO, REINFORCE) and PPO with rule rewards: the math on known numbers, then short
end-to-end step-3 runs on a tiny random model where the reward has to rise, and the warm-start data."""
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from step3_rlhf.algorithms import compute_advantages, policy_loss
from step3_rlhf.config import RLHFConfig
from step3_rlhf.main import main as rl_main
from step3_rlhf.tasks.countdown import countdown_prompt
from step3_rlhf.tasks.gsm8k import gsm8k_solution
from step3_rlhf.warm_start import build_rows, countdown_rows, rendering_matches, write_jsonl
from utils.data.readers import read_source
from utils.options import ConfigError, build_parser


def my_rule(prompt, response, meta):
    """A rule a random tiny model can learn fast: the number of "a" characters in the response ("a" is one
    token of the tiny vocabulary and part of ~10 word tokens, so it is sampled often from the start)."""
    return float(response.count("a"))


def _cfg(**kw):
    base = dict(algo="grpo", num_generations=4, scale_rewards=True, kl_ctl=0.1, clip_reward_value=5.0, gamma=1.0,
                lam=0.95, whiten_advantages=False, cliprange=0.2, beta=0.0, loss_agg="seq-mean-token-mean",
                max_answer_seq_len=2)
    base.update(kw)
    return SimpleNamespace(**base)


def _exp(scores, rows=None, width=2):
    n = len(scores)
    return SimpleNamespace(scores=torch.tensor(scores, dtype=torch.float), action_mask=torch.ones(rows or n, width),
                           advantages=None, returns=None)


# ------------------------------------------------------------------ advantages
def test_group_advantages_on_a_known_group():
    # Two groups of G=4: [1, 0, 0, 1] and [2, 2, 2, 2].
    # group 1: mean 0.5; unbiased std = sqrt((4 * 0.25) / 3) = 0.577350; adv = +-0.5 / (0.577350 + 1e-4)
    #          = +-0.866875 (eps 1e-4 as in losses.group_advantages);  group 2: all equal -> all 0.
    exp = _exp([1, 0, 0, 1, 2, 2, 2, 2])
    compute_advantages(exp, _cfg(algo="grpo"))
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert torch.allclose(exp.advantages, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)
    # Dr. GRPO (--no-scale_rewards): only the mean is removed -> +-0.5.
    compute_advantages(exp, _cfg(algo="grpo", scale_rewards=False))
    assert torch.allclose(exp.advantages, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    # REINFORCE (Reinforce-Lite) uses the same group-normalised advantage as GRPO.
    compute_advantages(exp, _cfg(algo="reinforce"))
    assert torch.allclose(exp.advantages, torch.tensor([a, -a, -a, a, 0, 0, 0, 0]), atol=1e-6)
    # RLOO: r_i - mean(other three). r=1: 1 - (0+0+1)/3 = 2/3;  r=0: 0 - (1+0+1)/3 = -2/3;  group 2: 0.
    compute_advantages(exp, _cfg(algo="rloo"))
    assert torch.allclose(exp.advantages, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))


def test_evaluation_batches_get_zero_advantages():
    # Evaluation generates one sample per prompt (group_size 1): no group to compare with, so 0 (not an error).
    exp = _exp([1.0, 0.0, 3.0])
    compute_advantages(exp, _cfg(algo="grpo", num_generations=4), group_size=1)
    assert exp.advantages.tolist() == [0.0, 0.0, 0.0]


def test_ppo_advantages_through_compute_advantages():
    # One response of 2 tokens, score 1, values [0.5, 0.2], logp [-1, -1], ref [-1.5, -1], kl_ctl 0.1,
    # gamma 1, lam 0.95.  Rewards: r0 = -0.1 * (-1 - -1.5) = -0.05;  r1 = -0.1 * 0 + 1 = 1.
    # t=1: delta = 1 + 0 - 0.2 = 0.8 -> A1 = 0.8;  t=0: delta = -0.05 + 0.2 - 0.5 = -0.35 -> A0 = -0.35 + 0.95*0.8
    # = 0.41.  returns = A + V = [0.91, 1.0].
    exp = SimpleNamespace(scores=torch.tensor([1.0]), action_mask=torch.ones(1, 2),
                          logprobs=torch.tensor([[-1.0, -1.0]]), ref_logprobs=torch.tensor([[-1.5, -1.0]]),
                          values=torch.tensor([[0.5, 0.2]]), advantages=None, returns=None)
    compute_advantages(exp, _cfg(algo="ppo"))
    assert torch.allclose(exp.advantages, torch.tensor([[0.41, 0.8]]), atol=1e-6)
    assert torch.allclose(exp.returns, torch.tensor([[0.91, 1.0]]), atol=1e-6)


# ------------------------------------------------------------------ policy losses
def _batch():
    # 2 sequences x 2 tokens; old log-probs 0, new ones give ratios [[1.5, 0.9], [0.5, 1.1]];
    # advantages +1 (row 0) and -1 (row 1); the last token of row 1 is padding (mask 0).
    logp = torch.log(torch.tensor([[1.5, 0.9], [0.5, 1.1]]))
    mb = SimpleNamespace(logprobs=torch.zeros(2, 2), ref_logprobs=logp.clone(), advantages=torch.tensor([1.0, -1.0]),
                         action_mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    return mb, logp


def test_grpo_loss_equals_the_ppo_clip_formula():
    mb, logp = _batch()
    # Per token max(-A r, -A clip(r, 0.8, 1.2)):
    #   row 0 (A=+1): r=1.5 -> max(-1.5, -1.2) = -1.2;  r=0.9 -> max(-0.9, -0.9) = -0.9
    #   row 1 (A=-1): r=0.5 -> max(0.5, 0.8) = 0.8;     (r=1.1 is masked)
    # seq-mean-token-mean: ((-1.2 - 0.9) / 2 + 0.8 / 1) / 2 = (-1.05 + 0.8) / 2 = -0.125
    loss, stats = policy_loss(mb, logp, _cfg(algo="grpo", loss_agg="seq-mean-token-mean"))
    assert loss.item() == pytest.approx(-0.125, abs=1e-6)
    # 2 of the 3 real tokens are clipped (r=1.5 with A>0, r=0.5 with A<0).
    assert stats["clipfrac"].item() == pytest.approx(2 / 3, abs=1e-6)
    # token-mean: (-1.2 - 0.9 + 0.8) / 3 = -0.433333
    loss, _ = policy_loss(mb, logp, _cfg(algo="grpo", loss_agg="token-mean"))
    assert loss.item() == pytest.approx(-1.3 / 3, abs=1e-6)
    # Dr. GRPO seq-mean-token-sum-norm with max_len 2: ((-2.1) / 2 + 0.8 / 2) / 2 = -0.325
    loss, _ = policy_loss(mb, logp, _cfg(algo="grpo", loss_agg="seq-mean-token-sum-norm"))
    assert loss.item() == pytest.approx(-0.325, abs=1e-6)
    # RLOO uses the same clipped objective.
    loss, _ = policy_loss(mb, logp, _cfg(algo="rloo", loss_agg="token-mean"))
    assert loss.item() == pytest.approx(-1.3 / 3, abs=1e-6)


def test_grpo_kl_term_is_beta_times_k3():
    mb, logp = _batch()
    # Reference 2x more likely than the policy on token (0, 0): d = ref - logp = ln 2,
    # k3 = e^d - d - 1 = 2 - ln 2 - 1 = 0.306853; elsewhere ref = logp -> 0.  beta = 0.1:
    # row 0 = (-1.2 + 0.0306853 - 0.9) / 2 = -1.0346574; loss = (-1.0346574 + 0.8) / 2 = -0.1173287
    mb.ref_logprobs[0, 0] += math.log(2.0)
    loss, stats = policy_loss(mb, logp, _cfg(algo="grpo", beta=0.1))
    assert loss.item() == pytest.approx(-0.1173287, abs=1e-6)
    assert stats["kl"].item() == pytest.approx((1 - math.log(2)) / 3, abs=1e-6)


def test_reinforce_loss_has_no_ratio_and_no_clip():
    mb, logp = _batch()
    logp = logp.clone().requires_grad_(True)
    # -A * logp per token: row 0: -ln 1.5 = -0.405465, -ln 0.9 = 0.105361;  row 1: +ln 0.5 = -0.693147.
    # seq-mean-token-mean: ((-0.405465 + 0.105361) / 2 + -0.693147) / 2 = -0.421599
    loss, _ = policy_loss(mb, logp, _cfg(algo="reinforce"))
    assert loss.item() == pytest.approx(-0.421599, abs=1e-6)
    # Unclipped: the gradient reaches the r=1.5 token too (d loss / d logp = -A / 2 / 2 = -0.25).
    loss.backward()
    assert logp.grad[0, 0].item() == pytest.approx(-0.25)
    assert logp.grad[1, 1].item() == 0.0


# ------------------------------------------------------------------ config
def _config(argv):
    cfg = RLHFConfig(**vars(build_parser(RLHFConfig).parse_args(argv)))
    cfg.validate()
    return cfg


def test_config_defaults_for_rule_rewards(tiny_model_dir):
    base = ["--actor_model_name_or_path", tiny_model_dir, "--reward", "format"]
    cfg = _config(base + ["--algo", "ppo"])
    assert cfg.critic_model_name_or_path == tiny_model_dir  # TinyZero: the critic starts from the actor
    with pytest.raises(ConfigError, match="num_generations"):
        _config(base + ["--algo", "grpo"])
    with pytest.raises(ConfigError, match="--task countdown"):
        _config(["--actor_model_name_or_path", tiny_model_dir, "--reward", "countdown",
                                  "--algo", "grpo", "--num_generations", "2"])
    with pytest.raises(ConfigError, match="critic_model_name_or_path"):
        _config(["--actor_model_name_or_path", tiny_model_dir, "--algo", "ppo"])


# ------------------------------------------------------------------ end to end
RISE = {  # algo -> flags; each run has 10 steps at a high learning rate on 8-token answers
    "grpo": ["--num_generations", "4", "--per_device_generation_batch_size", "8",
             "--per_device_training_batch_size", "16", "--beta", "0.04"],
    "rloo": ["--num_generations", "4", "--per_device_generation_batch_size", "8",
             "--per_device_training_batch_size", "16", "--beta", "0.04"],
    "reinforce": ["--num_generations", "4", "--per_device_generation_batch_size", "8",
                  "--per_device_training_batch_size", "16", "--beta", "0"],
    "ppo": ["--per_device_generation_batch_size", "16", "--per_device_training_batch_size", "8",
            "--ppo_epochs", "2", "--critic_learning_rate", "1e-2"],
}
BUILT = {"grpo": "grpo: built actor, reference, rules", "rloo": "rloo: built actor, reference, rules",
         "reinforce": "reinforce: built actor, rules", "ppo": "ppo: built actor, reference, critic, rules"}


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The runs below use --threads 1 (a 32-wide model gains nothing from a second thread, and spinning OpenMP
    threads slow a busy machine down a lot); put the process-wide setting back for the tests that follow."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _run(argv, out):
    rl_main(argv + ["--output_dir", str(out), "--dtype", "fp32", "--threads", "1", "--disable_progress_bar",
                    "--no_resume"])
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("algo", ["grpo", "rloo", "reinforce", "ppo"])
def test_reward_rises_end_to_end(algo, tiny_model_dir, tmp_path, capsys):
    argv = ["--actor_model_name_or_path", tiny_model_dir, "--algo", algo, "--reward", "tests.test_critic_free:my_rule",
            "--data_path", "synthetic:150", "--data_split", "1,1,1", "--max_prompt_seq_len", "32",
            "--max_answer_seq_len", "8", "--min_answer_seq_len", "8", "--max_steps", "10", "--eval_prompts", "0",
            "--actor_learning_rate", "1e-2", "--lr_scheduler_type", "constant", *RISE[algo]]
    summary = _run(argv, tmp_path / algo)
    log = capsys.readouterr().err
    # Only the engines the algorithm needs: no reward model anywhere, a critic for PPO only, and no
    # reference when the KL weight is 0 (REINFORCE here).
    assert BUILT[algo] + " ['tests.test_critic_free:my_rule']" in log
    assert "reward model" not in log.split("built", 1)[1].splitlines()[0]
    assert os.path.isdir(tmp_path / algo / "critic") == (algo == "ppo")
    rewards = [s["reward/mean"] for s in summary["history"]]
    assert len(rewards) == 10 and all(math.isfinite(r) for r in rewards)
    # The untrained model writes ~0.4-0.8 "a" per 8-token answer; after 10 steps it must write clearly more:
    # the mean of the last 3 steps is at least the first 2 steps' mean + 1.
    start, end = sum(rewards[:2]) / 2, sum(rewards[-3:]) / 3
    assert end > start + 1.0, rewards


def test_countdown_prompts_flow_through(tiny_model_dir, tmp_path, capsys):
    argv = ["--actor_model_name_or_path", tiny_model_dir, "--algo", "grpo", "--num_generations", "2",
            "--task", "countdown", "--data_path", "generate", "--reward", "countdown", "format=0.5",
            "--max_prompt_seq_len", "512", "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "2",
            "--per_device_training_batch_size", "4", "--max_steps", "2", "--eval_prompts", "2"]
    summary = _run(argv, tmp_path / "cd")
    assert "grpo: built actor, reference, rules ['countdown', 'format']" in capsys.readouterr().err
    step = summary["history"][0]
    assert {"reward/countdown", "reward/format"} <= set(step)
    sample = summary["before"]["samples"][0]
    # The R1-Zero chat prompt, rendered with the chat template, ends inside the think block.
    assert "Using the numbers" in sample["prompt"] and sample["prompt"].endswith("<|im_start|>assistant\n<think>")
    # A random model writes no <answer> tag: countdown and format both score 0.
    assert step["reward/countdown"] == 0.0 and step["reward/format"] == 0.0


# ------------------------------------------------------------------ warm-start data
def test_warm_start_rows_match_the_step3_prompt(tiny_tokenizer, tmp_path):
    tasks = [{"target": 62, "nums": [95, 37, 4]}, {"target": 1000, "nums": [1, 2, 3]}]  # the 2nd has no solution
    rows = countdown_rows(tasks)
    assert len(rows) == 1
    assert rows[0]["response"].startswith("<think>") and rows[0]["response"].endswith(
        "<answer>(95 - 37) + 4</answer>")
    # Step 1's tokens start with exactly the step-3 prompt tokens (same chat rendering + "<think>").
    assert rendering_matches(tiny_tokenizer, countdown_prompt(tasks[0]), rows[0])
    # ... and the data layer reads the file as SFT-only rows (no rejected reply).
    path = str(tmp_path / "warm.jsonl")
    write_jsonl(rows + build_rows("countdown", "generate", n=3, seed=1, num_count=3), path)
    src = read_source(path, on_bad_rows="error")
    assert len(src.train.rows) == 4 and all(r.rejected is None for r in src.train.rows)
    assert src.train.rows[0].chosen == rows[0]["response"]


def test_gsm8k_warm_start_solution():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 1,072"
    assert gsm8k_solution(answer) == ("<think> Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips. "
                                      "</think> <answer>1072</answer>")


def test_search_trace_shows_honest_failed_attempts_then_the_solution():
    import re
    from fractions import Fraction

    from step3_rlhf.tasks.countdown import countdown_reward, search_solution_text, solution_text
    rows = build_rows("countdown", "generate", n=40, seed=5, num_count=3, trace="search", max_tries=2)
    assert len(rows) == 40 and rows == build_rows("countdown", "generate", n=40, seed=5, num_count=3,
                                                  trace="search", max_tries=2)  # same tasks, same text
    n_failed = []
    for row in rows:
        task = re.search(r"numbers \[(.*?)\], create an equation that equals (\d+)", row["prompt"][-1]["content"])
        nums, target = [int(x) for x in task.group(1).split(",")], int(task.group(2))
        reply = row["response"]
        assert countdown_reward(reply, target, nums) == 1.0
        think = reply.split("</think>")[0]
        for a, op, b, r in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", think):  # every integer step is right
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b),
                    "/": Fraction(int(a), int(b))}[op] == int(r), think
        failed = re.findall(r"= (\d+), not (\d+)\.", think)
        assert all(int(got) != target and int(t) == target for got, t in failed)
        assert think.rstrip().endswith(f"That reaches {target} using each number once.")
        n_failed.append(len(failed))
    assert set(n_failed) == {0, 1, 2}  # 0..max_tries attempts, drawn per task
    assert search_solution_text([95, 37, 4], 62, max_tries=0) == solution_text([95, 37, 4], 62)
    tasks = [{"nums": [95, 37, 4], "target": 62}, {"nums": [44, 19, 35], "target": 98}] * 10
    capped = [len(re.findall(r", not \d+\.", r["response"])) for r in countdown_rows(tasks, trace="search", max_tries=1)]
    assert len(capped) == 20 and max(capped) == 1  # countdown_rows passes the cap on
    from step3_rlhf.tasks import get_task
    from step3_rlhf.warm_start import task_rows
    with pytest.raises(ValueError, match="no search trace"):
        task_rows(get_task("gsm8k"), [], trace="search")
