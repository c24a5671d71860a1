"""The per-parameter bf16 optimizer does the math of the straightforward one: fp32 masters, global-norm clip
in fp32, AdamW, masters rounded into the bf16 weights; a non-finite gradient skips the step; state round-trips."""
import copy

import torch

from utils.optim import MasterWeightAdamW


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(torch.bfloat16)


def _grads(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 3).to(torch.bfloat16)


def _groups(model):
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def test_matches_fp32_adamw_with_clipping_by_hand():
    model = _model()
    masters = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    ref = torch.optim.AdamW([{"params": [masters[0], masters[2]], "weight_decay": 0.1},
                             {"params": [masters[1], masters[3]], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95))
    opt = MasterWeightAdamW(_groups(model), lr=1e-2, betas=(0.9, 0.95), max_grad_norm=1.0)
    for step in range(3):
        _grads(model, step)
        grads = [p.grad.float() for p in model.parameters()]
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
        coef = min(1.0, 1.0 / (norm + 1e-6))
        assert norm > 1.0  # clipping is exercised
        for m, g in zip(masters, grads):
            m.grad = g * coef
        ref.step()
        opt.step()
        assert abs(opt._global_grad_norm - norm) < 1e-4 * norm
        assert all(p.grad is None for p in model.parameters())  # bf16 grads freed as they are used
        inner_of = {id(p): m for p, m in opt._pairs()}
        for m, p in zip(masters, model.parameters()):
            inner = inner_of[id(p)]
            torch.testing.assert_close(inner, m.detach(), rtol=1e-6, atol=1e-7)
            assert torch.equal(p, inner.to(torch.bfloat16))  # the weights are the rounded masters


def test_non_finite_gradient_skips_the_step():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MasterWeightAdamW(_groups(model), lr=1e-2, max_grad_norm=1.0)
    _grads(model, 0)
    next(model.parameters()).grad[0, 0] = float("nan")
    opt.step()
    assert opt.overflow and opt.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_learning_rate_schedule_reaches_the_masters():
    model = _model()
    opt = MasterWeightAdamW(_groups(model), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0)  # lr 0: nothing may move
    before = [p.detach().clone() for p in model.parameters()]
    _grads(model, 1)
    opt.step()
    sched.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_state_dict_round_trip_continues_identically():
    a = _model()
    opt_a = MasterWeightAdamW(_groups(a), lr=1e-2, max_grad_norm=1.0)
    for s in range(2):
        _grads(a, s)
        opt_a.step()
    b = _model()  # fresh weights and optimizer, then the saved state
    opt_b = MasterWeightAdamW(_groups(b), lr=1e-2, max_grad_norm=1.0)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    for model, opt in ((a, opt_a), (b, opt_b)):
        _grads(model, 7)
        opt.step()
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_state_dict_loads_weights_only():
    import io
    opt = MasterWeightAdamW(_groups(_model()), lr=1e-2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)  # nothing but tensors and plain containers
