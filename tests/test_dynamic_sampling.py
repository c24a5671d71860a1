"""DAPO's dynamic sampling and overlong handling (#14 point 2): which groups are kept, how batches of different
widths merge, the refill rounds (capped, agreed by two gloo ranks), the config checks, and end-to-end runs on a
tiny model (refills, the overlong penalty and filter, and a resume that repeats the uninterrupted run)."""
import datetime
import json
import os
import queue
import shutil
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from step3_rlhf.dynamic_sampling import concat_experiences, dynamic_sample, kept_rows, select_rows
from step3_rlhf.experience import Experience, response_logprobs
from step3_rlhf.main import main as rl_main
from tests.test_critic_free import _config
from tests.test_distributed import launch
from tests.test_guards import _free_port
from utils.options import ConfigError


def _exp(scores, P=1, R=1, seed=0):
    """An experience of len(scores) rows with random ids (P prompt + R response columns, all real tokens)."""
    g = torch.Generator().manual_seed(seed)
    n = len(scores)
    seq = torch.randint(5, 90, (n, P + R), generator=g)
    return Experience(seq, torch.ones(n, P + R, dtype=torch.long), torch.ones(n, R), P, -torch.rand(n, R, generator=g),
                      None, None, torch.tensor(scores, dtype=torch.float), torch.tensor(scores, dtype=torch.float),
                      responses=[f"r{i}" for i in range(n)], prompts=[f"p{i}" for i in range(n)],
                      components={"reward/rule": torch.tensor(scores, dtype=torch.float)},
                      truncated=torch.zeros(n, dtype=torch.bool))


def _cfg(**kw):
    base = dict(num_generations=2, generation_batches=1, per_device_generation_batch_size=2, max_refill_rounds=3,
                gradient_accumulation_steps=1, per_device_training_batch_size=2)
    return SimpleNamespace(**{**base, **kw})


# ---------------------------------------------------------------- keeping and merging
def test_kept_rows_and_select_rows():
    exp = _exp([1, 1, 0, 2, 3, 3, 0.5, 0])
    idx = kept_rows(exp.scores, 2)
    assert idx.tolist() == [2, 3, 6, 7]  # groups (0, 2) and (0.5, 0) have a reward spread
    sub = select_rows(exp, idx)
    assert sub.scores.tolist() == [0, 2, 0.5, 0] and sub.responses == ["r2", "r3", "r6", "r7"]
    assert torch.equal(sub.sequences, exp.sequences[idx]) and sub.components["reward/rule"].tolist() == [0, 2, 0.5, 0]


def test_concat_pads_prompts_left_and_responses_right():
    a, b = _exp([1, 2], P=2, R=2, seed=1), _exp([3, 4], P=3, R=1, seed=2)
    b.action_mask[1, 0] = 0  # nothing generated on this row's one column
    m = concat_experiences([a, b], pad_id=0)
    assert m.prompt_len == 3 and m.action_mask.shape == (4, 2) and m.sequences.shape == (4, 5)
    # a's rows: one pad column before the prompt; b's rows: one pad column after the response
    assert m.attention_mask.tolist() == [[0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert torch.equal(m.sequences[:2, 1:], a.sequences) and (m.sequences[:2, 0] == 0).all()
    assert torch.equal(m.sequences[2:, :4], b.sequences) and (m.sequences[2:, 4] == 0).all()
    assert m.action_mask.tolist() == [[1, 1], [1, 1], [1, 0], [0, 0]]
    assert torch.equal(m.logprobs[2:, 0], b.logprobs[:, 0]) and (m.logprobs[2:, 1] == 0).all()
    assert m.scores.tolist() == [1, 2, 3, 4] and m.responses == ["r0", "r1", "r0", "r1"]


def test_merged_rows_keep_their_logprobs(tiny_model_dir):
    """The extra padding of a merged batch changes no response log-prob (positions come from the mask)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    a, b = _exp([0, 1], P=3, R=4, seed=3), _exp([1, 0], P=6, R=2, seed=4)
    m = concat_experiences([a, b], pad_id=0)
    with torch.no_grad():
        la = response_logprobs(model, a.sequences, a.attention_mask, 4)
        lb = response_logprobs(model, b.sequences, b.attention_mask, 2)
        lm = response_logprobs(model, m.sequences, m.attention_mask, 4)
    assert torch.allclose(lm[:2], la, atol=1e-5) and torch.allclose(lm[2:, :2], lb, atol=1e-5)


# ---------------------------------------------------------------- refill rounds
class Source:
    """make_more(): the experiences of the next batches, in order, counting the calls."""

    def __init__(self, *batches):
        self.batches, self.calls = list(batches), 0

    def __call__(self):
        self.calls += 1
        return _exp(self.batches.pop(0), seed=self.calls)


def test_refill_until_full():
    src = Source([0, 2, 3, 3])
    train, made, stats = dynamic_sample([_exp([1, 1, 0, 1])], src, _cfg(), pad_id=0)
    assert src.calls == 1 and len(made) == 2
    assert stats == {"dynamic_sampling/refill_rounds": 1.0, "dynamic_sampling/trained_groups": 2.0,
                     "dynamic_sampling/short": 0.0}
    assert len(train) == 1 and train[0].scores.tolist() == [0, 1, 0, 2]
    # a full first batch makes no refill; extra kept groups beyond the step's size are not trained on
    src = Source()
    train, made, stats = dynamic_sample([_exp([0, 1, 0, 2])], src, _cfg(), pad_id=0)
    assert src.calls == 0 and train[0].scores.tolist() == [0, 1, 0, 2]
    src = Source([0, 1, 4, 5])
    train, _, _ = dynamic_sample([_exp([1, 1, 0, 2])], src, _cfg(), pad_id=0)
    assert train[0].scores.tolist() == [0, 2, 0, 1]


def test_the_cap_trains_on_what_there_is():
    src = Source([1, 1, 2, 2], [3, 3, 3, 3])
    train, made, stats = dynamic_sample([_exp([1, 1, 0, 1])], src, _cfg(max_refill_rounds=2), pad_id=0)
    assert src.calls == 2 and stats["dynamic_sampling/short"] == 1.0
    assert stats["dynamic_sampling/trained_groups"] == 1.0 and train[0].scores.tolist() == [0, 1]
    train, _, stats = dynamic_sample([_exp([1, 1, 2, 2])], Source(), _cfg(max_refill_rounds=0), pad_id=0)
    assert train == [] and stats["dynamic_sampling/trained_groups"] == 0.0  # nothing to learn from: no update


def test_whole_accumulation_windows():
    # micro-batch 2 x accumulation 2 = 4 rows = 2 groups of 2 per window: 3 kept groups train as 2
    cfg = _cfg(per_device_generation_batch_size=4, gradient_accumulation_steps=2, max_refill_rounds=0)
    train, _, stats = dynamic_sample([_exp([0, 1, 0, 2, 0, 3, 4, 4])], Source(), cfg, pad_id=0)
    assert stats["dynamic_sampling/trained_groups"] == 2.0 and len(train[0].scores) == 4


# ---------------------------------------------------------------- two ranks agree on the rounds
RANK_BATCHES = {0: ([0, 1, 0, 1], [[0, 1, 0, 1]] * 3),            # full from the start
                1: ([1, 1, 1, 1], [[0, 1, 1, 1], [0, 1, 0, 1], [2, 2, 2, 2]])}  # 0, then 1, then 2 more groups


def _on_two_ranks(rank, port, results):  # rank first: mp.start_processes passes it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    out = {}
    try:
        first, more = RANK_BATCHES[rank]
        for cap in (3, 1):
            src = Source(*more)
            train, _, stats = dynamic_sample([_exp(first)], src, _cfg(max_refill_rounds=cap), pad_id=0)
            out[cap] = (src.calls, stats, len(train[0].scores) if train else 0)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        results.put((rank, out))
        dist.destroy_process_group()


def test_ranks_run_the_same_rounds_and_train_the_same_rows():
    port = _free_port()
    results = mp.get_context("spawn").Queue()
    ranks = mp.start_processes(_on_two_ranks, args=(port, results), nprocs=2, join=False, start_method="spawn")
    got = {}
    try:
        while len(got) < 2:
            rank, out = results.get(timeout=240)
            got[rank] = out
    except queue.Empty:
        got = None
    for p in ranks.processes:
        p.join(timeout=30)
        p.kill() if p.is_alive() else None
    assert got is not None, "a rank did not report within 240 s (hung in a collective?)"
    assert "error" not in got[0] and "error" not in got[1], got
    for rank in range(2):
        # cap 3: rank 1 is short after rounds 0 and 1, so both ranks run 2 rounds (rank 0 full all along)
        calls, stats, rows = got[rank][3]
        assert calls == 2 and stats["dynamic_sampling/refill_rounds"] == 2.0 and rows == 4, (rank, got)
        # cap 1: rank 1 has 1 group after its one round, so both ranks train on 1 group (2 rows)
        calls, stats, rows = got[rank][1]
        assert calls == 1 and stats["dynamic_sampling/trained_groups"] == 1.0 and rows == 2, (rank, got)
        assert stats["dynamic_sampling/short"] == 1.0


# ---------------------------------------------------------------- config
def test_config_checks(tiny_model_dir):
    base = ["--actor_model_name_or_path", tiny_model_dir, "--reward", "format"]
    with pytest.raises(ConfigError, match="--dynamic_sampling.*--num_generations >= 2"):
        _config(base + ["--algo", "ppo", "--dynamic_sampling"])
    with pytest.raises(ConfigError, match="--overlong_buffer_len 300"):
        _config(base + ["--algo", "ppo", "--overlong_buffer_len", "300"])
    cfg = _config(base + ["--algo", "grpo", "--num_generations", "2"])
    assert not cfg.dynamic_sampling and not cfg.overlong_filter and cfg.overlong_buffer_len == 0  # off by default


# ---------------------------------------------------------------- end to end
def has_a(prompt, response, meta):
    """1 if the answer has an "a" anywhere: a random tiny model's 2 samples often agree (both 0 or both 1)."""
    return float("a" in response)


def _argv(model, out, *extra):
    return ["--actor_model_name_or_path", model, "--algo", "grpo", "--num_generations", "2", "--beta", "0.04",
            "--reward", f"{__name__}:has_a", "--data_path", "synthetic:120", "--data_split", "1,1,1",
            "--max_prompt_seq_len", "32", "--max_answer_seq_len", "6", "--per_device_generation_batch_size", "4",
            "--per_device_training_batch_size", "8", "--eval_prompts", "0", "--actor_learning_rate", "1e-2",
            "--lr_scheduler_type", "constant", "--output_dir", str(out), "--dtype", "fp32", "--threads", "1",
            "--disable_progress_bar", "--seed", "2", *extra]


def _summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_dynamic_sampling_end_to_end_and_resume(tiny_model_dir, tmp_path, capsys):
    ds = ["--dynamic_sampling", "--max_refill_rounds", "2", "--save_interval", "2"]
    rl_main(_argv(tiny_model_dir, tmp_path / "straight", "--max_steps", "4", "--no_resume", *ds))
    straight = _summary(tmp_path / "straight")
    hist = straight["history"]
    assert len(hist) == 4 and all("dynamic_sampling/refill_rounds" in h for h in hist)
    assert sum(h["dynamic_sampling/refill_rounds"] for h in hist) > 0  # the ties made refills happen
    assert all(h["dynamic_sampling/trained_groups"] <= 4 for h in hist)
    assert {"response/truncated_frac", "groups/zero_variance_frac", "logprob_mismatch/rollout_mean",
            "detect/hacking_trend"} <= set(hist[0])
    assert hist[0]["logprob_mismatch/rollout_max"] < 1e-3  # fast backend, fp32, same weights: the same numbers
    first_two = (hist[0]["reward/mean"] + hist[1]["reward/mean"]) / 2  # the summary's first window (4 steps: 2)
    assert straight["detectors"]["metrics"]["reward"]["first"] == pytest.approx(first_two)
    assert "detectors, first 2 vs last 2 step(s): reward" in capsys.readouterr().err
    # interrupted after step 2 (its checkpoint), then resumed: the same steps, prompts and weights
    rl_main(_argv(tiny_model_dir, tmp_path / "resumed", "--max_steps", "2", "--no_resume", *ds))
    rl_main(_argv(tiny_model_dir, tmp_path / "resumed", "--max_steps", "4", *ds))
    resumed = _summary(tmp_path / "resumed")
    assert [h["reward/mean"] for h in resumed["history"]] == [h["reward/mean"] for h in hist]
    assert [h["dynamic_sampling/refill_rounds"] for h in resumed["history"]] == \
        [h["dynamic_sampling/refill_rounds"] for h in hist]
    a = load_file(str(tmp_path / "straight" / "actor" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "actor" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_overlong_penalty_and_filter_end_to_end(tiny_model_dir, tmp_path):
    # 6-token answers, buffer 3: a random model rarely stops early, so most answers get the full -0.5
    rl_main(_argv(tiny_model_dir, tmp_path / "ol", "--max_steps", "2", "--no_resume", "--overlong_buffer_len", "3",
                  "--overlong_penalty_factor", "0.5", "--overlong_filter"))
    hist = _summary(tmp_path / "ol")["history"]
    for h in hist:
        assert -0.5 <= h["reward/overlong"] < 0
        assert h["reward/mean"] == pytest.approx(h[f"reward/{__name__}:has_a"] + h["reward/overlong"], abs=1e-6)
        assert h["response/truncated_frac"] > 0


@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_processes_zero3_refill_in_step(tiny_model_dir, tmp_path):
    """The product path: 2 ranks under ZeRO-3 (every forward gathers weights), each with its own prompt shard, so
    they keep different numbers of groups; the agreed rounds and row counts keep their collectives matched (a
    mismatch hangs or fails the gloo run)."""
    out = tmp_path / "ds2"
    launch("step3_rlhf/main.py", _argv(tiny_model_dir, out, "--max_steps", "3", "--no_resume", "--dynamic_sampling",
                                       "--max_refill_rounds", "2", "--actor_zero_stage", "3"))
    hist = _summary(out)["history"]
    assert len(hist) == 3 and all("dynamic_sampling/trained_groups" in h for h in hist)
    assert sum(h["dynamic_sampling/refill_rounds"] for h in hist) > 0  # the agreed refill rounds did run
