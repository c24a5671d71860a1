"""Step 3's plug-in points without models: the algorithm table decides every algorithm-dependent choice, and
the PTX batches give each rank its own deterministic, resumable shard of the unsupervised set."""
from types import SimpleNamespace

import pytest
import torch

import step3_rlhf.algorithms as algorithms
from step3_rlhf.algorithms import ALGORITHMS, Algorithm, compute_advantages, policy_loss
from step3_rlhf.config import ALGOS, RLHFConfig
from step3_rlhf.prompt_data import PtxBatches
from utils.options import ConfigError


# ------------------------------------------------------------------ the algorithm table
def test_table_holds_the_algorithms_and_their_needs():
    assert tuple(ALGORITHMS) == ALGOS == ("ppo", "grpo", "rloo", "reinforce", "reinforce_pp")
    assert [a.name for a in ALGORITHMS.values() if a.needs_critic] == ["ppo"]
    cfg = SimpleNamespace(kl_ctl=0.1, beta=0.0)
    # PPO's and REINFORCE++'s reference serves the KL penalty in the reward (kl_ctl), the group ones' the k3 loss
    # term (beta)
    assert ALGORITHMS["ppo"].needs_reference(cfg) and not ALGORITHMS["grpo"].needs_reference(cfg)
    assert ALGORITHMS["reinforce_pp"].needs_reference(cfg)
    cfg = SimpleNamespace(kl_ctl=0.0, beta=0.04)
    assert not ALGORITHMS["ppo"].needs_reference(cfg) and not ALGORITHMS["reinforce_pp"].needs_reference(cfg)
    assert all(ALGORITHMS[n].needs_reference(cfg) for n in ("grpo", "rloo", "reinforce"))
    # the place flags move the KL (and so the need of a reference) for every algorithm
    cfg = SimpleNamespace(kl_ctl=0.1, beta=0.0, kl_in_reward=True)
    assert all(a.needs_reference(cfg) for a in ALGORITHMS.values())
    cfg = SimpleNamespace(kl_ctl=0.1, beta=0.04, kl_in_reward=False, kl_in_loss=False)
    assert not any(a.needs_reference(cfg) for a in ALGORITHMS.values())
    assert {n for n, a in ALGORITHMS.items() if a.default_loss_agg == "token-mean"} == {"ppo", "reinforce_pp"}
    assert {ALGORITHMS[n].default_loss_agg for n in ("grpo", "rloo", "reinforce")} == {"seq-mean-token-mean"}
    assert ALGORITHMS["reinforce_pp"].min_generations == 1


def _toy(**kw):
    """A new algorithm as one table entry: advantages = the raw scores, loss = -A * mean logp."""
    base = dict(name="toy", summary="test entry", needs_critic=False, kl_in_reward=False,
                default_loss_agg="token-mean", min_generations=3,
                advantages=lambda exp, cfg, g: exp.scores * 10,
                loss=lambda mb, logp, cfg: (-(mb.advantages[:, None] * logp), {"seen": cfg.algo}))
    base.update(kw)
    return Algorithm(**base)


def test_a_new_entry_is_all_it_takes(monkeypatch, tmp_path):
    monkeypatch.setitem(ALGORITHMS, "toy", _toy())
    exp = SimpleNamespace(scores=torch.tensor([1.0, 2.0, 3.0]), advantages=None)
    compute_advantages(exp, SimpleNamespace(algo="toy", num_generations=3))
    assert exp.advantages.tolist() == [10.0, 20.0, 30.0]
    # fewer samples per prompt than the entry needs (evaluation batches): zero advantages, not an error
    compute_advantages(exp, SimpleNamespace(algo="toy", num_generations=3), group_size=2)
    assert exp.advantages.tolist() == [0.0, 0.0, 0.0]
    mb = SimpleNamespace(advantages=torch.tensor([1.0, 3.0]), action_mask=torch.ones(2, 4))
    toy_cfg = SimpleNamespace(algo="toy", max_answer_seq_len=6, beta=0.0, kl_ctl=0.0, loss_agg="token-mean")
    # per-token loss -A * logp = 2 (row 0) and 6 (row 1): token mean 4; the shared code aggregates it
    loss, stats = policy_loss(mb, torch.full((2, 4), -2.0), toy_cfg)
    assert loss.item() == 4.0 and stats == {"seen": "toy"}
    # the config's checks and defaults read the entry too
    cfg = RLHFConfig(actor_model_name_or_path=str(tmp_path), reward=["format"], algo="toy", num_generations=2)
    with pytest.raises(ConfigError, match="--algo toy compares samples of one prompt: set --num_generations >= 3"):
        cfg.validate()
    cfg = RLHFConfig(actor_model_name_or_path=str(tmp_path), reward=["format"], algo="toy", num_generations=3,
                     output_dir=str(tmp_path / "out"))
    cfg.validate()
    assert cfg.loss_agg == "token-mean" and not cfg.needs_critic
    assert cfg.critic_model_name_or_path == ""  # no critic: not defaulted to the actor as PPO's is
    monkeypatch.setitem(ALGORITHMS, "toy", _toy(needs_critic=True))
    cfg = RLHFConfig(actor_model_name_or_path=str(tmp_path), reward=["format"], algo="toy", num_generations=3,
                     output_dir=str(tmp_path / "out"))
    cfg.validate()
    assert cfg.needs_critic and cfg.critic_model_name_or_path == str(tmp_path)


def test_unknown_algorithm_is_one_clear_line():
    with pytest.raises(ValueError, match="unknown --algo 'nope'; expected one of ppo, grpo, rloo, reinforce, reinforce_pp"):
        algorithms.algorithm("nope")


def test_gradient_accumulation_must_close_its_window_within_a_ppo_epoch(tmp_path):
    def cfg(accum):
        return RLHFConfig(actor_model_name_or_path=str(tmp_path), reward=["format"], algo="grpo", num_generations=2,
                          per_device_generation_batch_size=4, per_device_training_batch_size=2,
                          gradient_accumulation_steps=accum, output_dir=str(tmp_path / "out"))
    cfg(4).validate()  # 4 x 2 / 2 = 4 micro-batches per epoch: one window of 4
    with pytest.raises(ConfigError, match="--gradient_accumulation_steps 3 must divide the 4 micro-batches"):
        cfg(3).validate()


# ------------------------------------------------------------------ PTX shards
def _ptx_items(n):
    return [{"input_ids": [i + 1], "labels": [i + 1]} for i in range(n)]


def _served(ptx, batches):
    return [int(t) for _ in range(batches) for t in next(ptx)["input_ids"][:, 0]]


def test_ptx_batches_give_each_rank_its_own_shard():
    items = _ptx_items(10)
    ranks = [PtxBatches(items, 2, 0, seed=5, rank=r, world_size=3) for r in range(3)]
    # 10 items padded to 12 (the first two of the seeded order repeat): 4 per rank, one pass = 2 batches of 2
    firsts = [_served(p, 2) for p in ranks]
    assert all(len(f) == 4 for f in firsts)
    assert set().union(*firsts) == set(range(1, 11))
    assert sum(len(set(a) & set(b)) for i, a in enumerate(firsts) for b in firsts[i + 1:]) <= 2  # the padding only
    # a rank cycles through its own shard only
    assert [_served(p, 2) for p in ranks] == firsts
    # one process: the whole seeded order, as before sharding
    whole = _served(PtxBatches(items, 2, 0, seed=5), 5)
    assert whole == [i + 1 for i in torch.randperm(10, generator=torch.Generator().manual_seed(5)).tolist()]
    with pytest.raises(ValueError, match="rank 3 is not in"):
        PtxBatches(items, 2, 0, seed=5, rank=3, world_size=3)


def test_ptx_shard_is_deterministic_and_resumable():
    items = _ptx_items(7)
    a = PtxBatches(items, 3, 0, seed=11, rank=1, world_size=2)
    _served(a, 3)
    state = a.state()
    rest = _served(a, 4)
    b = PtxBatches(items, 3, 0, seed=11, rank=1, world_size=2)
    b.load(state)
    assert _served(b, 4) == rest
    other = PtxBatches(items, 3, 0, seed=11, rank=0, world_size=2)
    assert _served(other, 1) != _served(PtxBatches(items, 3, 0, seed=11, rank=1, world_size=2), 1)
