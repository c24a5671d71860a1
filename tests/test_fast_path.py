"""Equal learning: every speed lever of step 3 gives what the straightforward path gives (issue "Speed and memory").

- our decode loop (step3_rlhf/rollout/decode_loop.py) picks generate()'s tokens: greedy and, with the same seed and
  generate()'s draw (sampler="multinomial"), sampled (T=1 and T/top-k/top-p), on tiny Llama and OPT with left
  padding, EOS and min_new_tokens; its default draw samples the same distribution (checked by counting);
- a GRPO group's prompt run once and its KV cache shared gives the tokens of G separate prefills;
- the log-probs the loop reports equal response_logprobs of a full forward;
- one PPO update with the experience-time actor forward reused as the update's forward gives the losses
  and the weights of the two-forward path; a GRPO step with shared prefixes gives its losses too;
- the fallbacks (ZeRO-3 parameters, several processes, hybrid engine, unknown families) keep generate().
"""
import functools
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from step3_rlhf.config import RLHFConfig
from step3_rlhf.engines import build_engines
from step3_rlhf.experience import response_logprobs
from step3_rlhf.experience_maker import ExperienceMaker
from step3_rlhf.rollout.decode_loop import draw, fast_decode_ok, sample
from step3_rlhf.prompt_data import collate_prompts, load_prompts
from step3_rlhf.trainer import RLTrainer
from utils.data.synthetic import make_synthetic_preferences, write_jsonl
from utils.models import load_tokenizer, load_value_model, unwrap
from utils.options import parse_config
from utils.stage import start_stage


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _prompts(tok, n=4, width=12, seed=0):
    """Left-padded random prompts: row 0 has 5 pads, row 2 has 3, the others none."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, len(tok), (n, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2 % n, :3] = 0
    return ids.masked_fill(mask == 0, tok.pad_token_id), mask


def _hf(model, tok, ids, mask, **kw):
    out = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=tok.pad_token_id,
                         eos_token_id=[tok.eos_token_id], **kw)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("static", [False, True])
def test_greedy_decode_matches_generate(arch, static, tiny_model_dir, tiny_opt_dir):
    path = tiny_model_dir if arch == "llama" else tiny_opt_dir
    model, tok = _model(path), AutoTokenizer.from_pretrained(path)
    ids, mask = _prompts(tok)
    with torch.no_grad():
        want = _hf(model, tok, ids, mask, max_new_tokens=20, do_sample=False)
    got = sample(model, ids, mask, max_new_tokens=20, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id,
                 temperature=0, static_cache=static)
    assert got.shape == want.shape and torch.equal(got, want)


@pytest.mark.parametrize("warp", [dict(temperature=1.0), dict(temperature=0.7, top_k=20, top_p=0.9)])
def test_sampled_decode_matches_generate_with_the_same_seed(warp, tiny_model_dir):
    model, tok = _model(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = _prompts(tok, n=6)
    eos = tok.eos_token_id
    # min_new_tokens 4: EOS is forbidden for the first 4 tokens in both (the logits processor / our index_fill)
    torch.manual_seed(11)
    with torch.no_grad():
        want = _hf(model, tok, ids, mask, max_new_tokens=16, min_new_tokens=4, do_sample=True,
                   top_k=warp.get("top_k"), top_p=warp.get("top_p"), temperature=warp["temperature"])
    torch.manual_seed(11)
    got = sample(model, ids, mask, max_new_tokens=16, min_new_tokens=4, eos_ids=[eos], pad_id=tok.pad_token_id,
                 temperature=warp["temperature"], top_k=warp.get("top_k", 0), top_p=warp.get("top_p", 1.0),
                 sampler="multinomial")
    assert torch.equal(got, want)
    assert not (got[:, :4] == eos).any()


def test_draw_samples_the_distribution_and_never_a_filtered_token():
    """`draw` (the default sampler) against probabilities set by hand: 200k rows of one distribution, whose zero
    entries (first, middle, last: what top-k/top-p leave) are never drawn, and each frequency within 5 standard
    errors of its probability."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    n = 200_000
    torch.manual_seed(0)
    tok = draw(probs.expand(n, -1).contiguous())
    freq = torch.bincount(tok, minlength=len(probs)).double() / n
    assert freq[0] == 0 and freq[2] == 0 and freq[6] == 0
    se = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * se + 1e-12).all(), freq
    # a row with one possible token draws it every time, at either end of the vocabulary
    assert draw(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])).tolist() == [2, 0]
    with pytest.raises(RuntimeError, match="NaN or inf"):  # a diverged model is named, as multinomial does
        draw(torch.tensor([[0.5, float("nan"), 0.5]]))


def test_sampled_decode_draws_generates_distribution(tiny_model_dir):
    """The default sampler and generate()'s draw give the same first-token distribution (2000 copies of one
    prompt, T=0.7, top-k 5: the five allowed tokens only, frequencies within 0.05 of each other)."""
    model, tok = _model(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = _prompts(tok, n=1)
    ids, mask = ids.expand(2000, -1), mask.expand(2000, -1)
    kw = dict(max_new_tokens=1, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id, temperature=0.7, top_k=5)
    counts = {}
    for sampler in ("cdf", "multinomial"):
        torch.manual_seed(5)
        first = sample(model, ids, mask, sampler=sampler, **kw)[:, 0]
        counts[sampler] = torch.bincount(first, minlength=len(tok)).double() / len(first)
    with torch.no_grad():
        allowed = model(input_ids=ids[:1], attention_mask=mask[:1],
                        position_ids=(mask[:1].cumsum(-1) - 1).clamp(min=0)).logits[0, -1].topk(5).indices
    outside = torch.ones(len(tok), dtype=torch.bool)
    outside[allowed] = False
    assert counts["cdf"][outside].sum() == 0 and (counts["cdf"][allowed] > 0).sum() >= 2
    assert (counts["cdf"] - counts["multinomial"]).abs().max() < 0.05


def test_eos_ends_a_row_and_pads_after(tiny_model_dir):
    """Declare as EOS a token that sampling emits mid-answer: with the same seed that row ends there and then
    emits pad, in generate() and in our loop alike."""
    model, tok = _model(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = _prompts(tok)
    kw = dict(max_new_tokens=10, pad_id=tok.pad_token_id, temperature=1.0, sampler="multinomial")
    torch.manual_seed(2)
    free = sample(model, ids, mask, eos_ids=[tok.eos_token_id], **kw)
    # the first (row, position >= 3) whose token did not occur earlier in its row: that row must end there
    r, pos = next((r, p) for r in range(free.shape[0]) for p in range(3, 9) if free[r, p] not in free[r, :p])
    eos = int(free[r, pos])
    torch.manual_seed(2)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=tok.pad_token_id, eos_token_id=[eos],
                              max_new_tokens=10, do_sample=True, top_k=None, top_p=None)[:, ids.shape[1]:]
    torch.manual_seed(2)
    got = sample(model, ids, mask, eos_ids=[eos], **kw)
    assert torch.equal(got, want)
    row = got[r].tolist()
    assert row.index(eos) == pos and all(t == tok.pad_token_id for t in row[pos + 1:])  # EOS kept, pad after
    assert torch.equal(got[r, :pos], free[r, :pos])


def test_group_shared_prefix_gives_the_tokens_of_separate_prefills(tiny_model_dir):
    model, tok = _model(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, mask = _prompts(tok, n=3)
    g = 4  # group-major: rows 0..3 are prompt 0, rows 4..7 prompt 1, rows 8..11 prompt 2
    ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
    kw = dict(max_new_tokens=12, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id)
    separate = sample(model, ids, mask, temperature=0, **kw)
    shared = sample(model, ids, mask, temperature=0, group_size=g, **kw)
    assert torch.equal(shared, separate)
    torch.manual_seed(3)
    separate = sample(model, ids, mask, temperature=1.0, **kw)
    torch.manual_seed(3)
    shared = sample(model, ids, mask, temperature=1.0, group_size=g, **kw)  # the default sampler, same stream
    assert torch.equal(shared, separate)
    assert not torch.equal(shared[0], shared[1])  # samples of one group differ (the test is not trivial)
    # rows that are not copies of one prompt: the loop sees it and prefills every row
    mixed = sample(model, ids.flip(0), mask.flip(0), temperature=0, group_size=5, **kw)
    assert torch.equal(mixed, sample(model, ids.flip(0), mask.flip(0), temperature=0, **kw))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_decode_logprobs_equal_a_full_forward(arch, tiny_model_dir, tiny_opt_dir):
    path = tiny_model_dir if arch == "llama" else tiny_opt_dir
    model, tok = _model(path), AutoTokenizer.from_pretrained(path)
    ids, mask = _prompts(tok)
    torch.manual_seed(5)
    resp, logp = sample(model, ids, mask, max_new_tokens=10, min_new_tokens=10, eos_ids=[tok.eos_token_id],
                        pad_id=tok.pad_token_id, temperature=0.8, return_logprobs=True)
    seq = torch.cat([ids, resp], 1)
    attn = torch.cat([mask, torch.ones_like(resp)], 1)
    with torch.no_grad():
        full = response_logprobs(model, seq, attn, resp.shape[1], temperature=0.8)
    # the same log p(token) computed two ways (one token at a time with a cache vs all at once): equal to
    # float32 rounding; a real log-prob here is around log(1 / vocab) ~ -4.6, so 1e-5 is 7 significant digits
    assert logp.shape == full.shape and (logp - full).abs().max() < 1e-5
    assert logp.min() < -1.0


def test_fallbacks_keep_generate(tiny_model_dir):
    model = _model(tiny_model_dir)
    assert fast_decode_ok(model)
    assert not fast_decode_ok(model, synced_gpus=True)  # several processes under ZeRO-3
    assert not fast_decode_ok(model, use_hybrid=True)   # DeepSpeed's hybrid engine generates
    p = next(model.parameters())
    p.ds_id = 0  # what ZeRO-3 puts on a partitioned parameter
    assert not fast_decode_ok(model)
    del p.ds_id
    model.config.model_type = "some_new_family"
    assert not fast_decode_ok(model)


# ----------------------------------------------------------------------------- whole updates, both paths
@pytest.fixture(scope="module")
def rl_setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_rl")
    data = str(root / "pref.jsonl")
    write_jsonl(make_synthetic_preferences(64, seed=3), data)
    torch.manual_seed(0)
    load_value_model(tiny_model_dir, head_init_std=1.0).save_pretrained(str(root / "rm"))
    load_tokenizer(tiny_model_dir).save_pretrained(str(root / "rm"))
    return tiny_model_dir, str(root / "rm"), data, root


def _trainer(rl_setup, name, *extra, **cfg_overrides):
    actor, rm, data, root = rl_setup
    argv = ["--actor_model_name_or_path", actor, "--critic_model_name_or_path", rm, "--data_path", data,
            "--data_split", "0,0,1", "--output_dir", str(root / name), "--max_prompt_seq_len", "24",
            "--max_answer_seq_len", "8", "--dtype", "fp32", "--threads", "1", "--disable_progress_bar",
            "--no_resume", "--actor_learning_rate", "1e-2", "--critic_learning_rate", "1e-2", *extra]
    cfg = parse_config(RLHFConfig, argv)
    for k, v in cfg_overrides.items():
        setattr(cfg, k, v)
    ctx = start_stage(cfg)
    tok = load_tokenizer(actor)
    items, _ = load_prompts(cfg, tok, ctx.log)
    engines = build_engines(cfg, ctx, 10, ctx.log)
    maker = ExperienceMaker(cfg, engines, tok, ctx, functools.partial(collate_prompts, pad_id=tok.pad_token_id))
    return SimpleNamespace(maker=maker, trainer=RLTrainer(cfg, engines, ctx), e=engines, cfg=cfg), items


# Weights after one update of two paths that compute the same numbers in a different order. Adam's first step moves
# every weight by about lr (1e-2 here) whatever its gradient's size, so a gradient near Adam's eps that differs in
# its last bits moves its weight a little differently: allow 1% of one step (a wrong path differs by whole steps).
ONE_ADAM_STEP_TOL = 1e-4


def _one_step(run, items, n):
    torch.manual_seed(7)  # same samples on both paths
    exp = run.maker.make(items[:n])
    stats = run.trainer.train_on([exp], step=1)
    weights = {k: v.detach().clone() for k, v in unwrap(run.e.actor).state_dict().items()}
    return exp, stats, weights


def test_ppo_update_reusing_the_experience_forward_equals_two_forwards(rl_setup):
    batch = ["--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4"]
    fast, items = _trainer(rl_setup, "fast", *batch)
    slow, _ = _trainer(rl_setup, "slow", *batch, reuse_policy_forward=False)
    assert fast.maker.reuses_policy_forward(4) and not slow.maker.reuses_policy_forward(4)
    before = {k: v.detach().clone() for k, v in unwrap(fast.e.actor).state_dict().items()}
    exp_f, st_f, w_f = _one_step(fast, items, 4)
    exp_s, st_s, w_s = _one_step(slow, items, 4)
    assert torch.equal(exp_f.sequences, exp_s.sequences)
    # actor == reference at step 1: the reused (grad-enabled) forward still gives KL exactly 0
    assert torch.equal(exp_f.logprobs * exp_f.action_mask, exp_f.ref_logprobs * exp_f.action_mask)
    assert torch.allclose(exp_f.logprobs, exp_s.logprobs, atol=1e-6)
    assert torch.allclose(exp_f.advantages, exp_s.advantages, atol=1e-6)
    for k in ("loss/policy", "loss/value", "entropy", "clipfrac/policy", "kl/approx_old_new"):
        assert abs(st_f[k] - st_s[k]) < 1e-6, k
    assert st_f["loss/policy"] != 0.0  # a real update happened (lr 1e-2): the weights below moved
    for k in w_f:
        assert torch.allclose(w_f[k], w_s[k], atol=1e-6), k
    assert max((w_f[k] - before[k]).abs().max().item() for k in w_f) > 1e-4


def test_reuse_is_off_where_it_would_change_the_update(rl_setup):
    trainer, _ = _trainer(rl_setup, "cond", "--per_device_generation_batch_size", "4",
                          "--per_device_training_batch_size", "2")
    assert not trainer.maker.reuses_policy_forward(4)     # two micro-batches: the second sees updated weights
    trainer.cfg.per_device_training_batch_size = 4
    assert trainer.maker.reuses_policy_forward(4)
    assert not trainer.maker.reuses_policy_forward(4, sample=False)  # evaluation batches are never trained on
    trainer.cfg.ppo_epochs = 2
    assert not trainer.maker.reuses_policy_forward(4)     # the second epoch needs the first epoch's old log-probs


def test_grpo_step_with_shared_prefixes_equals_the_straightforward_step(rl_setup, monkeypatch):
    import step3_rlhf.rollout.decode_loop as decode_loop
    import step3_rlhf.shared_prefix as shared_prefix
    grpo = ["--algo", "grpo", "--num_generations", "4", "--per_device_generation_batch_size", "2",
            "--per_device_training_batch_size", "4"]
    shared, items = _trainer(rl_setup, "grpo_shared", *grpo)
    exp_sh, st_shared, w_shared = _one_step(shared, items, 2)
    # the straightforward step: every prompt prefilled per row, every forward over whole rows
    real_sample = decode_loop.sample
    monkeypatch.setattr(decode_loop, "sample", lambda *a, **kw: real_sample(*a, **{**kw, "group_size": 1}))
    monkeypatch.setattr(shared_prefix, "shared_group", lambda *a, **kw: 1)
    separate, _ = _trainer(rl_setup, "grpo_separate", *grpo)
    exp_sep, st_sep, w_sep = _one_step(separate, items, 2)
    assert torch.equal(exp_sh.sequences, exp_sep.sequences)
    for name in ("logprobs", "ref_logprobs", "scores", "advantages"):
        a, b = getattr(exp_sh, name), getattr(exp_sep, name)
        assert torch.allclose(a, b, atol=1e-5), name
    assert exp_sh.advantages.abs().max() > 0.1  # the group's samples differ, so the update is not a no-op
    for k in ("loss/policy", "entropy", "kl/approx_old_new"):
        assert abs(st_shared[k] - st_sep[k]) < 1e-5, k
    assert all(torch.allclose(w_shared[k], w_sep[k], atol=ONE_ADAM_STEP_TOL) for k in w_shared)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_shared_prefix_forward_and_its_gradient_equal_full_rows(arch, tiny_model_dir, tiny_opt_dir):
    from step3_rlhf.experience import response_logits
    from step3_rlhf.shared_prefix import shared_group, shared_prefix_logits
    path = tiny_model_dir if arch == "llama" else tiny_opt_dir
    model, tok = _model(path), AutoTokenizer.from_pretrained(path)
    ids, mask = _prompts(tok, n=2)
    g, R = 3, 6
    ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
    resp = torch.randint(6, len(tok), (ids.shape[0], R), generator=torch.Generator().manual_seed(1))
    seq, attn = torch.cat([ids, resp], 1), torch.cat([mask, torch.ones_like(resp)], 1)
    attn[1, -2:] = 0  # a response that ended early
    assert shared_group(model, seq, attn, ids.shape[1], g) == g
    mixed = torch.tensor([0, 3, 1, 4, 2, 5])  # prompts alternate: no run of 3 (or 2) copies
    assert shared_group(model, seq[mixed], attn[mixed], ids.shape[1], g) == 1
    grads = []
    for shared in (True, False):
        model.zero_grad()
        logits = shared_prefix_logits(model, seq, attn, ids.shape[1], R, g) if shared else \
            response_logits(model, seq, attn, R)
        (logits.float().logsumexp(-1) * attn[:, -R:]).sum().backward()
        grads.append(({k: p.grad.clone() for k, p in model.named_parameters()}, logits.detach()))
    (g_sh, l_sh), (g_full, l_full) = grads
    assert torch.allclose(l_sh, l_full, atol=1e-5)
    # the prompt ran once for 3 rows, and autograd sums the 3 rows' gradients through the copied cache
    for k in g_full:
        assert torch.allclose(g_sh[k], g_full[k], atol=1e-5, rtol=1e-4), k


def test_ppo_update_on_the_lean_paths_equals_the_plain_one(rl_setup):
    """Length groups without padding columns, grouped-matmul attention and the lean RMSNorm/SwiGLU autograd
    give the same experience, losses and updated weights as one padded batch through SDPA and plain layers."""
    batch = ["--per_device_generation_batch_size", "4", "--per_device_training_batch_size", "4"]
    lean, items = _trainer(rl_setup, "lean", *batch, "--attn_implementation", "grouped_matmul",
                           "--length_groups", "3")
    plain, _ = _trainer(rl_setup, "plain", *batch, "--attn_implementation", "sdpa", "--no-fused_layers",
                        "--length_groups", "1")
    actor = unwrap(lean.e.actor)
    assert actor.config._attn_implementation == "grouped_matmul"
    assert hasattr(actor.model.norm, "_plain_forward") and not hasattr(unwrap(plain.e.actor).model.norm,
                                                                        "_plain_forward")
    items = sorted(items, key=lambda it: len(it["prompt_input_ids"]))  # prompts of different lengths
    picked = items[:2] + items[-2:]
    assert len(picked[0]["prompt_input_ids"]) < len(picked[-1]["prompt_input_ids"])
    exp_l, st_l, w_l = _one_step(lean, picked, 4)
    exp_p, st_p, w_p = _one_step(plain, picked, 4)
    assert torch.equal(exp_l.sequences, exp_p.sequences)
    for name in ("logprobs", "ref_logprobs", "values", "scores", "advantages"):
        assert torch.allclose(getattr(exp_l, name), getattr(exp_p, name), atol=1e-5), name
    for k in ("loss/policy", "loss/value", "entropy"):
        assert abs(st_l[k] - st_p[k]) < 1e-5, k
    assert st_l["loss/policy"] != 0.0
    for k in w_l:
        assert torch.allclose(w_l[k], w_p[k], atol=ONE_ADAM_STEP_TOL), k
