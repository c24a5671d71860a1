"""The speed/memory kernels against the straightforward computation: grouped-matmul attention vs SDPA, the lean
RMSNorm/SwiGLU autograd vs the plain modules, row groups without padding columns, the allocator re-exec."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from utils.allocator import find_tcmalloc, gpu_node, wanted
from utils.attention import grouped_matmul_attention
from utils.fused_layers import fuse_layers
from utils.padding import left_padding, row_groups, run_row_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Attn(torch.nn.Module):
    is_causal, num_key_value_groups = True, 3


def _qkv(B=3, H=6, KV=2, L=10, D=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    make = lambda h: torch.randn(B, h, L, D, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    mask = torch.ones(L, L, dtype=torch.bool).tril()[None, None].repeat(B, 1, 1, 1)
    mask[1, :, :, :3] = False              # row 1: three left-padding keys ...
    mask[1, :, :3, :] = False              # ... and three padding queries that attend to nothing
    return make(H), make(KV), make(KV), mask


def test_grouped_attention_and_its_gradients_equal_sdpa():
    q, k, v, mask = _qkv()
    g_out = torch.randn(3, 10, 6, 8)
    g_out[1, :3] = 0  # nothing downstream reads a padding query
    results = []
    for fn in (grouped_matmul_attention, sdpa_attention_forward):
        out, _ = fn(_Attn(), q, k, v, mask, scaling=8 ** -0.5)
        results.append((out, *torch.autograd.grad((out * g_out).sum(), (q, k, v))))
    real = torch.ones(3, 10, dtype=torch.bool)
    real[1, :3] = False
    assert torch.allclose(results[0][0][real], results[1][0][real], atol=1e-6)
    assert torch.isfinite(results[0][0]).all()          # fully masked rows stay finite (no NaN to backprop)
    for a, b, name in zip(results[0][1:], results[1][1:], "qkv"):
        assert torch.allclose(a, b, atol=1e-5), name


def test_grouped_attention_in_a_model_with_padding_and_cache():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50)).eval()
    ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ref = model(input_ids=ids, attention_mask=mask).logits
    gen_ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    from utils.models import set_attention
    set_attention(model, "grouped_matmul")
    assert model.config._attn_implementation == "grouped_matmul"
    out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(out[mask.bool()], ref[mask.bool()], atol=1e-5)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False), gen_ref)


def test_auto_attention_only_for_bf16_on_cpu():
    from utils.models import set_attention
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=20)
    assert set_attention(LlamaForCausalLM(cfg)).config._attn_implementation == "sdpa"  # fp32: SDPA is faster
    expect = "sdpa" if torch.cuda.is_available() else "grouped_matmul"
    assert set_attention(LlamaForCausalLM(cfg).to(torch.bfloat16)).config._attn_implementation == expect


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_lean_layers_same_forward_and_gradients(dtype, tol):
    import copy
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=60)).to(dtype)
    lean = copy.deepcopy(plain)
    assert fuse_layers(lean) == 2 * 3 + 1  # per layer two norms and the MLP, plus the final norm
    ids = torch.randint(3, 60, (2, 7))
    grads = []
    for model in (plain, lean):
        logits = model(input_ids=ids).logits
        (logits.float() * torch.linspace(-1, 1, 60)).sum().backward()
        grads.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.equal(grads[0][0], grads[1][0])  # the same ops in the same order
    for n, g in grads[0][1].items():
        scale = g.float().abs().max() + 1e-12
        assert ((g.float() - grads[1][1][n].float()).abs().max() / scale) < tol, n


def test_lean_mlp_leaves_lora_and_no_grad_to_the_plain_path():
    from utils.lora import convert_to_lora
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=20))
    fuse_layers(model)
    convert_to_lora(model, "layers.", 4, 4.0)
    mlp = model.model.layers[0].mlp
    assert type(mlp.down_proj) is not torch.nn.Linear
    x = torch.randn(1, 3, 16, requires_grad=True)
    assert torch.allclose(mlp(x), mlp._plain_forward(x))  # LoRA'd down projection: the plain forward runs
    y = mlp(x)
    assert "SwiGLU" not in type(y.grad_fn).__name__


def test_row_groups_cut_the_padding_of_each_group():
    widths = [4, 10, 4, 10, 9]  # real tokens per row, left-padded to 10
    mask = torch.zeros(5, 10, dtype=torch.long)
    for i, w in enumerate(widths):
        mask[i, 10 - w:] = 1
    assert left_padding(mask).tolist() == [6, 0, 6, 0, 1]
    groups = row_groups(mask, max_groups=3, overhead_tokens=2)  # a 3rd group would save 1 token: not worth it
    assert sorted((sorted(r.tolist()), cut) for r, cut in groups) == [([0, 2], 6), ([1, 3, 4], 0)]
    # G=2 copies of a prompt stay together: blocks (0,1) and (2,3) only
    blocks = row_groups(mask[:4], align=2, max_groups=3, overhead_tokens=0)
    assert all(len(r) % 2 == 0 and r[0] % 2 == 0 and r[1] == r[0] + 1 for r, _ in blocks)
    assert len(row_groups(mask, max_groups=3, overhead_tokens=1000)) == 1  # not worth a second call


def test_run_row_groups_gives_the_padded_batch_numbers_and_gradients():
    from step3_rlhf.experience import response_logprobs
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=50))
    ids = torch.randint(3, 50, (4, 100))
    mask = torch.ones_like(ids)
    mask[0, :70] = 0  # 2 x 70 padding tokens: worth a second forward call (64 tokens of overhead)
    mask[2, :80] = 0
    outs = []
    for groups in (1, 3):
        model.zero_grad()
        logp = response_logprobs(model, ids, mask, 5, length_groups=groups)
        (logp * torch.arange(1, 21).view(4, 5)).sum().backward()
        outs.append((logp, [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(outs[0][0], outs[1][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(outs[0][1], outs[1][1]))
    # the groups really ran without their padding columns
    seen = []
    run_row_groups(lambda cut, m, s: seen.append((cut, s.shape)) or s[:, :1].float(), mask, ids, max_groups=3)
    assert sorted(seen) == [(0, torch.Size([2, 100])), (70, torch.Size([2, 30]))]


def test_allocator_choice_and_reexec():
    assert not wanted(["main.py", "--allocator", "system"]) and not wanted(["main.py", "--allocator=system"])
    code = "from utils.allocator import use_tcmalloc, active_allocator; use_tcmalloc(); print(active_allocator())"
    env = {k: v for k, v in os.environ.items() if k not in ("RLHFKIT_REEXEC", "LD_PRELOAD", "RLHFKIT_ALLOCATOR")}
    run = lambda e: subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e, capture_output=True,  # noqa
                                   text=True, check=True).stdout.strip()
    assert run(env) == ("tcmalloc" if find_tcmalloc() and not gpu_node() else "system")  # auto: not on GPU nodes
    assert run(dict(env, RLHFKIT_ALLOCATOR="system")) == "system"
