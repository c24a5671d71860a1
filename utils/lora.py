"""LoRA for nn.Linear, merged back into plain weights at save time.

Small enough to own (no peft dependency): the wrapped layer keeps the original `weight`/`bias` names, so a
merged state dict has exactly the base model's keys and `save_pretrained` writes a normal HF checkpoint.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """y = x W^T + b + scale * (x A^T) B^T, with A [r, in] Kaiming-init and B [out, r] zero-init (starts at W)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 0.0, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = (alpha or rank) / rank
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_enabled = True  # off = the base model (used as the frozen reference in step 3)

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            out = out + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale
        return out

    def merged_weight(self, weight=None, lora_A=None, lora_B=None):
        w = self.weight if weight is None else weight
        a = self.lora_A if lora_A is None else lora_A
        b = self.lora_B if lora_B is None else lora_B
        return w + (b.float() @ a.float()).to(w.dtype) * self.scale


def convert_to_lora(model: nn.Module, module_name: str, rank: int, alpha: float = 0.0) -> int:
    """Wrap every nn.Linear whose qualified name contains `module_name`; returns how many were wrapped."""
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and module_name in n and "lm_head" not in n]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha))
    return len(targets)


def only_optimize_lora(model: nn.Module):
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name


def set_lora_enabled(model: nn.Module, enabled: bool):
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.lora_enabled = enabled


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """Fold LoRA into the base weights of a (gathered) state dict and drop the lora_* keys."""
    out = dict(state_dict)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            p = name + "."
            out[p + "weight"] = m.merged_weight(out[p + "weight"], out.pop(p + "lora_A"), out.pop(p + "lora_B"))
    return out
