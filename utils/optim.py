"""AdamW on fp32 master weights for a bf16 model, one parameter at a time (the low-memory bf16 optimizer).

DeepSpeed's bf16 path at ZeRO stage 0 (its unfused fp16/bf16 optimizer) turns EVERY gradient into an fp32
copy before the update, so for a moment a trained model holds bf16 grads + fp32 grads + master weights +
Adam state: about 6 bytes per parameter more than the update needs. This optimizer does the same math -
global-norm clipping in fp32, a non-finite gradient skips the step, AdamW on fp32 masters, masters copied
back to the bf16 weights - converting one parameter's gradient at a time and freeing each bf16 gradient as
soon as it is used. It is handed to `deepspeed.initialize` as a client optimizer with DeepSpeed's own bf16
section off (see utils.engine.build_train_engine), so DeepSpeed still runs the engine, data parallelism
(its gradient all-reduce at ZeRO 0), schedules and checkpoints.
"""
from __future__ import annotations

import math

import torch


class MasterWeightAdamW(torch.optim.Optimizer):
    """`params`/groups as torch.optim.AdamW takes them (bf16 tensors); `max_grad_norm` 0 = no clipping."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, max_grad_norm=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.max_grad_norm = max_grad_norm
        self.skipped_steps = 0
        self.overflow = False          # read by DeepSpeed's engine: a skipped step does not advance the LR schedule
        self._global_grad_norm = None  # read by DeepSpeed's engine (engine.get_global_grad_norm())
        # fp32 master copies (the inner AdamW's parameters), in the same group layout
        inner_groups = []
        for group in self.param_groups:
            masters = [p.detach().float().clone() for p in group["params"]]
            inner_groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": masters})
        fused = all(p.device.type in ("cpu", "cuda") for g in inner_groups for p in g["params"])
        self.inner = torch.optim.AdamW(inner_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                       fused=fused)

    def _pairs(self):
        for group, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({k: v for k, v in group.items() if k != "params"})  # LR schedules write `group`
            yield from zip(group["params"], inner["params"])

    @torch.no_grad()
    def grad_norm(self) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for p in (p for g in self.param_groups for p in g["params"]):
            if p.grad is not None:
                total += p.grad.float().pow(2).sum().double()
        return math.sqrt(total.item()) if torch.isfinite(total) else float("inf")

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MasterWeightAdamW.step does not take a closure")
        norm = self.grad_norm()
        self._global_grad_norm = norm
        self.overflow = not math.isfinite(norm)
        if self.overflow:  # as DeepSpeed's bf16 overflow check: skip the update, drop the grads
            self.skipped_steps += 1
            self.zero_grad(set_to_none=True)
            return None
        coef = min(1.0, self.max_grad_norm / (norm + 1e-6)) if self.max_grad_norm > 0 else 1.0
        for p, master in self._pairs():
            if p.grad is None:
                continue
            master.grad = p.grad.float()
            p.grad = None
            if coef < 1.0:
                master.grad.mul_(coef)
            self.inner.step()  # updates only `master`: every other master has grad None
            master.grad = None
            p.copy_(master)
        return None

    def zero_grad(self, set_to_none: bool = True):
        for p in (p for g in self.param_groups for p in g["params"]):
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)

    def state_dict(self):
        return {"inner": self.inner.state_dict(), "skipped_steps": self.skipped_steps,
                "masters": [m for g in self.inner.param_groups for m in g["params"]],
                "groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict["inner"])
        masters = [m for g in self.inner.param_groups for m in g["params"]]
        if len(masters) != len(state_dict["masters"]):
            raise ValueError(f"optimizer state has {len(state_dict['masters'])} master tensors, model has "
                             f"{len(masters)}")
        with torch.no_grad():
            for m, saved in zip(masters, state_dict["masters"]):
                m.copy_(saved)
            for (p, m) in self._pairs():
                p.copy_(m)
        for group, saved in zip(self.param_groups, state_dict["groups"]):
            group.update(saved)
        self.skipped_steps = state_dict.get("skipped_steps", 0)
