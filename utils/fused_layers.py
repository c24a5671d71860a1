"""Leaner autograd for two layers of Llama-style decoders: what backward keeps is what sets training memory.

Measured on one SmolLM2 decoder layer (bf16, 8 x 192 tokens) the plain modules keep about 32 MB for
backward: 18 MB in the MLP (gate, up, silu(gate) and their product) and 6.8 MB of float32 copies in the two
RMSNorms. These functions compute the same forward (the same ops in the same order, so the same numbers)
but keep only their inputs - the MLP its gate and up projections, RMSNorm its bf16 input and one float per
token - and recompute the cheap element-wise parts in backward: about half of the layer's saved memory
goes, and no matmul is recomputed.

`fuse_layers(model)` swaps the forward of every matching module; a module it does not recognise exactly
(another norm formula, an activation other than SiLU, LoRA or ZeRO-3-partitioned weights) keeps its own.
They were written and measured for CPU; on CUDA HF's modules (and the fused kernels a user may patch in, e.g.
Liger) stay unless --fused_layers asks for these (`wanted`).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"}  # weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)
MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}                # down(act(gate(x)) * up(x))


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        h = x.float() * rstd                                   # the normalised input, rebuilt
        d_weight = (dy.float() * h.to(x.dtype).float()).sum(tuple(range(dy.dim() - 1))).to(weight.dtype)
        dh = (dy * weight).float()
        dx = rstd * (dh - h * (dh * h).mean(-1, keepdim=True))  # d/dx of x * rsqrt(mean(x^2) + eps)
        return dx.to(x.dtype), d_weight, None


class SwiGLUDownFunction(torch.autograd.Function):
    """down(silu(gate) * up) for bias-free down weights; keeps gate and up, not the two products."""

    @staticmethod
    def forward(ctx, gate, up, weight):
        ctx.save_for_backward(gate, up, weight)
        return F.linear(F.silu(gate) * up, weight)

    @staticmethod
    def backward(ctx, dy):
        gate, up, weight = ctx.saved_tensors
        act = F.silu(gate)
        h = act * up
        d_weight = dy.reshape(-1, dy.shape[-1]).t().mm(h.reshape(-1, h.shape[-1]))
        dh = dy.matmul(weight)
        sig = torch.sigmoid(gate.float())
        d_gate = (dh * up).float().mul_(sig * (1 + gate.float() * (1 - sig)))  # silu'(g) = s(1 + g(1 - s))
        return d_gate.to(gate.dtype), dh * act, d_weight


def _plain(weight) -> bool:
    return not hasattr(weight, "ds_id")  # ZeRO-3 gathers a module's weights in its own forward hooks


def _norm_forward(self, hidden_states):
    if torch.is_grad_enabled() and self.weight.requires_grad and _plain(self.weight):
        return RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)
    return self._plain_forward(hidden_states)


def _mlp_forward(self, x):
    down = self.down_proj
    if torch.is_grad_enabled() and type(down) is torch.nn.Linear and down.bias is None and _plain(down.weight):
        return SwiGLUDownFunction.apply(self.gate_proj(x), self.up_proj(x), down.weight)
    return self._plain_forward(x)


def wanted(requested) -> bool:
    """--fused_layers: True/False as given; None (not given) = on only where CUDA is not available."""
    return (not torch.cuda.is_available()) if requested is None else bool(requested)


def fuse_layers(model) -> int:
    """Swap in the lean forwards where a module matches exactly; returns how many modules were changed."""
    n = 0
    for module in model.modules():
        name = type(module).__name__
        if name in NORMS and hasattr(module, "variance_epsilon") and not hasattr(module, "_plain_forward"):
            module._plain_forward, module.forward = module.forward, types.MethodType(_norm_forward, module)
            n += 1
        elif name in MLPS and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation") \
                and not hasattr(module, "_plain_forward"):
            module._plain_forward, module.forward = module.forward, types.MethodType(_mlp_forward, module)
            n += 1
    return n
