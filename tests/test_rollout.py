"""The rollout plug-in point (step3_rlhf/rollout): which backend runs and why, the hybrid engine's call order,
and every backend sampling from the same distribution whatever the model's generation_config says.

DeepSpeed's real hybrid engine needs a GPU; here a stand-in engine records the calls the real one reacts to
(its eval() swaps the inference kernels in, train() swaps them out), which is what the order is about.
"""
import functools
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from step3_rlhf.config import RLHFConfig
from step3_rlhf.engines import build_engines
from step3_rlhf.prompt_data import collate_prompts, load_prompts
from step3_rlhf.rollout import build_rollout, choose_backend, planned_backend
from step3_rlhf.rollout import hybrid_engine
from step3_rlhf.rollout.hybrid_engine import grouped_query_reason, hybrid_kernels_missing, layer_contract_reason
from step3_rlhf.experience_maker import ExperienceMaker
from utils.data.synthetic import make_synthetic_preferences, write_jsonl
from utils.models import load_tokenizer, unwrap
from utils.options import parse_config
from utils.stage import start_stage


class StandInEngine(torch.nn.Module):
    """Records eval/train/generate/forward the way DeepSpeedHybridEngine sees them: `kernels` is on from its
    eval() to its next train(True) (train(False) swaps nothing, as DeepSpeed's)."""

    def __init__(self, model):
        super().__init__()
        self.module, self.calls, self.kernels = model, [], False

    def eval(self):
        self.calls.append("eval")
        self.kernels = True
        self.module.train(False)
        return self

    def train(self, mode=True):
        self.calls.append("train" if mode else "train(False)")
        self.kernels = self.kernels and not mode
        self.module.train(mode)
        return self

    def generate(self, *args, **kwargs):
        self.calls.append("generate" if self.kernels else "generate without kernels")
        return self.module.generate(*args, **kwargs)

    def forward(self, *args, **kwargs):
        self.calls.append("forward on inference kernels" if self.kernels else "forward")
        return self.module(*args, **kwargs)


class Lines:
    def __init__(self):
        self.lines = []

    def info(self, msg):
        self.lines.append(msg)


def _cfg(**kw):
    base = dict(max_answer_seq_len=12, min_answer_seq_len=0, temperature=1.0, top_p=1.0, top_k=0,
                generation_backend="auto", enable_hybrid_engine=False, actor_zero_stage=0)
    return SimpleNamespace(**{**base, **kw})


def _tiny_qwen2(tok):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _prompts(tok, n=4, width=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, len(tok), (n, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids.masked_fill(mask == 0, tok.pad_token_id), mask


def _kernels_assumed_usable(mp):
    """The stand-in engine runs no kernels, so the tiny Llama (grouped-query attention) may pass as a model
    DeepSpeed's kernels could run, under any transformers: only the choice and the call order are under test."""
    mp.setattr(hybrid_engine, "grouped_query_reason", lambda model: None)
    mp.setattr(hybrid_engine, "layer_contract_reason", lambda model: None)


# ----------------------------------------------------------------------------- the choice
def test_backend_choice_and_its_reason(tiny_model_dir, tiny_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    name, why = choose_backend(_cfg(), model)
    assert name == "fast" and "not hybrid: no hybrid engine (--enable_hybrid_engine, on a GPU" in why
    assert choose_backend(_cfg(generation_backend="hf"), model) == ("hf", "--generation_backend hf")
    with pytest.MonkeyPatch.context() as mp:
        _kernels_assumed_usable(mp)
        assert choose_backend(_cfg(), model, use_hybrid=True)[0] == "hybrid"   # Llama: DeepSpeed has kernels
    name, why = choose_backend(_cfg(), model, use_hybrid=True)  # ... but not for grouped-query attention
    assert name == "hf" and "not hybrid: DeepSpeed's inference kernels assume one key/value head" in why
    name, why = choose_backend(_cfg(), model, synced_gpus=True)            # ZeRO-3 across processes
    assert name == "hf" and "not fast: ZeRO-3 across several processes" in why
    name, why = choose_backend(_cfg(generation_backend="fast"), model, use_hybrid=True)
    assert name == "hf" and "not fast: DeepSpeed's hybrid engine generates" in why
    next(model.parameters()).ds_id = 0  # a ZeRO-3 partitioned parameter
    assert choose_backend(_cfg(), model)[0] == "hf"
    # the run logs the choice once, in one line
    log = Lines()
    rollout = build_rollout(_cfg(generation_backend="hf"), model, tiny_tokenizer, log=log)
    assert rollout.name == "hf" and log.lines == ["generation backend: hf (--generation_backend hf)"]


def test_the_plan_names_the_backend_before_any_weights_load(tiny_model_dir):
    cfg = _cfg(actor_model_name_or_path=tiny_model_dir, trust_remote_code=False)
    assert planned_backend(cfg)[0] == "fast"
    name, why = planned_backend(_cfg(**{**vars(cfg), "enable_hybrid_engine": True}), device_type="cuda")
    assert name == "fast" and why.endswith("(DeepSpeed's inference kernels assume one key/value head per query "
                                           "head; this model has 2 for 4 (grouped-query attention))")
    with pytest.MonkeyPatch.context() as mp:
        _kernels_assumed_usable(mp)
        assert planned_backend(_cfg(**{**vars(cfg), "enable_hybrid_engine": True}), device_type="cuda")[0] == "hybrid"
    name, why = planned_backend(_cfg(**{**vars(cfg), "actor_zero_stage": 3}))
    assert name == "hf" and "ZeRO-3 partitioned parameters" in why


def test_a_family_without_hybrid_kernels_falls_back_to_generate(tiny_tokenizer):
    tok = tiny_tokenizer
    engine = StandInEngine(_tiny_qwen2(tok))
    log = Lines()
    rollout = build_rollout(_cfg(generation_backend="hybrid", enable_hybrid_engine=True), engine, tok, log=log,
                            use_hybrid=True)
    assert rollout.name == "hf"
    assert len(log.lines) == 1 and "no inference kernels for model type 'qwen2'" in log.lines[0]
    ids, mask = _prompts(tok)
    seq, action_mask = rollout.generate(ids, mask)
    assert seq.shape[0] == 4 and action_mask.shape == (4, seq.shape[1] - ids.shape[1])
    assert "generate" not in engine.calls  # the engine's generate would raise (no _generate without containers)
    # a built DeepSpeedHybridEngine answers from its own inference containers
    built = SimpleNamespace(module=engine.module, _inference_containers=[])
    assert "no inference kernels" in hybrid_kernels_missing(built)
    with pytest.MonkeyPatch.context() as mp:
        _kernels_assumed_usable(mp)
        assert hybrid_kernels_missing(SimpleNamespace(module=engine.module, _inference_containers=[object()])) is None


class _TupleContractModel(torch.nn.Module):
    """A model whose forward reads a tuple from each layer (the contract DeepSpeed's layers keep)."""

    def forward(self, hidden_states, decoder_layer):
        layer_outputs = decoder_layer(hidden_states)
        return layer_outputs[0]


class _TensorContractModel(torch.nn.Module):
    """A model whose forward takes each layer's return value as the hidden states (newer transformers)."""

    def forward(self, hidden_states, decoder_layer):
        hidden_states = decoder_layer(hidden_states)
        return hidden_states


def test_what_the_hybrid_kernels_get_wrong_is_found_before_an_engine_is_built():
    # measured on an H200 (bench/gpu_check.py): grouped-query attention ends the process with a CUDA
    # misaligned-address error; a layer caller that expects a tensor fails on DeepSpeed's tuple
    assert layer_contract_reason(_TupleContractModel()) is None
    assert "return a tuple" in layer_contract_reason(_TensorContractModel())
    gqa = SimpleNamespace(config=SimpleNamespace(num_attention_heads=9, num_key_value_heads=3))
    assert grouped_query_reason(gqa) == ("DeepSpeed's inference kernels assume one key/value head per query head; "
                                         "this model has 3 for 9 (grouped-query attention)")
    for config in (SimpleNamespace(num_attention_heads=8, num_key_value_heads=8),
                   SimpleNamespace(num_attention_heads=8, num_key_value_heads=None),  # older configs: MHA
                   SimpleNamespace(num_attention_heads=8)):
        assert grouped_query_reason(SimpleNamespace(config=config)) is None


def test_config_refuses_what_the_hybrid_engine_gets_wrong(tiny_model_dir, capsys):
    base = ["--actor_model_name_or_path", tiny_model_dir, "--critic_model_name_or_path", tiny_model_dir]
    for extra, message in ((["--enable_hybrid_engine", "--actor_lora_dim", "4"], "would generate with the base"),
                           (["--generation_backend", "hybrid"], "needs --enable_hybrid_engine")):
        with pytest.raises(SystemExit) as exit_info:
            parse_config(RLHFConfig, base + extra)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert parse_config(RLHFConfig, base + ["--generation_backend", "hf"]).generation_backend == "hf"


# ----------------------------------------------------------------------------- hybrid engine call order
@pytest.fixture(scope="module")
def hybrid_maker(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout_rl")
    data = str(root / "pref.jsonl")
    write_jsonl(make_synthetic_preferences(16, seed=3), data)
    argv = ["--actor_model_name_or_path", tiny_model_dir, "--algo", "reinforce", "--beta", "0", "--reward",
            "length", "--num_generations", "2", "--per_device_generation_batch_size", "2",
            "--per_device_training_batch_size", "4", "--data_path", data, "--data_split", "0,0,1",
            "--output_dir", str(root / "out"), "--max_prompt_seq_len", "24", "--max_answer_seq_len", "6",
            "--dtype", "fp32", "--threads", "1", "--disable_progress_bar", "--no_resume", "--enable_hybrid_engine"]
    cfg = parse_config(RLHFConfig, argv)
    ctx = start_stage(cfg)
    tok = load_tokenizer(tiny_model_dir)
    items, _ = load_prompts(cfg, tok, ctx.log)
    engines = build_engines(cfg, ctx, 10, ctx.log)  # on CPU a plain engine: the stand-in plays the hybrid one
    engines.actor, engines.use_hybrid = StandInEngine(unwrap(engines.actor)), True
    with pytest.MonkeyPatch.context() as mp:
        _kernels_assumed_usable(mp)
        maker = ExperienceMaker(cfg, engines, tok, ctx, functools.partial(collate_prompts, pad_id=tok.pad_token_id))
    return maker, items


def test_hybrid_engine_generates_on_its_kernels_and_scores_on_training_forwards(hybrid_maker):
    maker, items = hybrid_maker
    assert maker.rollout.name == "hybrid"
    engine = maker.e.actor
    engine.calls.clear()
    torch.manual_seed(0)
    exp = maker.make(items[:2])
    calls = engine.calls
    # DeepSpeed-Chat's order: engine.eval() (kernels in), the engine's generate, engine.train() (kernels out)
    assert calls.index("eval") < calls.index("generate") < calls.index("train")
    forwards = [i for i, c in enumerate(calls) if c.startswith("forward")]
    assert forwards and all(calls[i] == "forward" for i in forwards)  # no log-prob on inference kernels
    last_eval = max(i for i, c in enumerate(calls) if c == "eval")
    assert all(any(c == "train" for c in calls[last_eval:i]) for i in forwards)
    assert exp.logprobs.shape == exp.action_mask.shape and torch.isfinite(exp.logprobs).all()


# ----------------------------------------------------------------------------- one distribution for all
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0),
                                      dict(temperature=0.8, top_k=20, top_p=0.9, min_answer_seq_len=4)])
def test_hf_and_fast_backends_ignore_generation_config_extras(sampling, tiny_model_dir, tiny_tokenizer):
    tok = tiny_tokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    model.generation_config.repetition_penalty = 10.0
    model.generation_config.no_repeat_ngram_size = 2
    cfg = _cfg(**sampling)
    ids, mask = _prompts(tok)
    log = Lines()
    outs = {}
    for backend in ("fast", "hf"):
        rollout = build_rollout(_cfg(**{**sampling, "generation_backend": backend}), model, tok, log=log)
        assert rollout.name == backend
        rollout.sampler = "multinomial"  # the fast backend's default draw samples the same distribution, other tokens
        torch.manual_seed(11)
        outs[backend] = rollout.generate(ids, mask)
    assert torch.equal(outs["fast"][0], outs["hf"][0]) and torch.equal(outs["fast"][1], outs["hf"][1])
    notices = [line for line in log.lines if "generation_config also sets" in line]
    assert len(notices) == 2 and "no_repeat_ngram_size=2, repetition_penalty=10.0" in notices[0]
    assert model.generation_config.repetition_penalty == 10.0  # the model's own config is back after the call
    # the extras do bite: generate() left to the model's generation_config samples other tokens
    torch.manual_seed(11)
    inherited = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=cfg.max_answer_seq_len,
                               min_new_tokens=cfg.min_answer_seq_len or None, do_sample=cfg.temperature > 0,
                               pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id])
    assert not torch.equal(inherited, outs["hf"][0])
