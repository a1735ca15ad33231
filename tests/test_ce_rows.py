"""qlora/speed/ce_rows.py: the per-row cross-entropy and its gradient, in torch ops and in the Triton kernel
(run on the CPU by Triton's interpreter, in a subprocess because the interpreter is chosen when the kernel
is defined), both against autograd through `F.cross_entropy`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qlora.speed import ce_rows

from helpers import interpreted_json


def autograd_reference(logits: torch.Tensor, y: torch.Tensor, softcap: float):
    """Per-row losses and d(sum)/d(logits) by autograd in fp64, returned in fp32 (independent of ce_rows). Not fp32:
    the CPU's fp32 tanh differed between processes (a 1.7e-4 loss difference in one run of five), fp64's does not
    matter at these bounds."""
    x = logits.detach().double().requires_grad_()
    z = softcap * torch.tanh(x / softcap) if softcap else x
    loss = F.cross_entropy(z, y, reduction="none", ignore_index=-100)
    loss.sum().backward()
    return loss.detach().float(), x.grad.float()


def case(n: int, v: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, v, generator=g) * 4).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = -100  # an unsupervised position: loss 0, gradient 0
    y[2] = v - 1  # the last column, in the last (partial) block
    return logits, y


@pytest.mark.parametrize("softcap", [0.0, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_matches_autograd(dtype, softcap):
    logits, y = case(6, 1000, dtype, 0)
    want_loss, want_grad = autograd_reference(logits, y, softcap)
    got = logits.clone()
    loss = ce_rows.reference_(got, y, softcap, grad=True)
    assert loss.dtype == torch.float32 and loss[1] == 0 and torch.all(got[1] == 0)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want_grad, rtol=1e-5, atol=1e-7)
    else:  # the same fp32 values rounded once to bf16: at most one bf16 step (2^-8 relative) apart
        torch.testing.assert_close(got.float(), want_grad.to(dtype).float(), rtol=2**-7, atol=1e-7)
    kept = logits.clone()
    torch.testing.assert_close(ce_rows.reference_(kept, y, softcap, grad=False), loss)
    assert torch.equal(kept, logits)  # no gradient asked: the logits are untouched


INTERPRETED = r"""
import json, torch
from qlora.speed import ce_rows
from test_ce_rows import autograd_reference, case
assert ce_rows.available(torch.empty(1)), "Triton's interpreter did not take CPU tensors"
out = []
for v in (1000, 9000):  # one block; three blocks of 4,096, the last partial
    for dtype in (torch.float32, torch.bfloat16):
        for cap in (0.0, 30.0):
            logits, y = case(5, v, dtype, v)
            want_loss, want_grad = autograd_reference(logits, y, cap)
            got = logits.clone()
            loss = ce_rows.loss_and_grad_(got, y, cap, grad=True)
            kept = logits.clone()
            loss2 = ce_rows.loss_and_grad_(kept, y, cap, grad=False)
            d = (got.float() - want_grad.to(dtype).float()).abs()
            out.append(dict(v=v, dtype=str(dtype), cap=cap, loss_err=(loss - want_loss).abs().max().item(),
                            loss_scale=want_loss.abs().max().item(), grad_err=d.max().item(),
                            within_bf16_step=bool((d <= 2**-7 * want_grad.to(dtype).float().abs() + 1e-7).all()),
                            ignored_zero=bool(loss[1] == 0 and torch.all(got[1] == 0)),
                            same_loss=bool(torch.equal(loss, loss2)), untouched=bool(torch.equal(kept, logits))))
print(json.dumps(out))
"""


def test_triton_kernel_matches_autograd_in_interpreter():
    rows = interpreted_json(INTERPRETED)
    assert len(rows) == 8
    for r in rows:
        assert r["ignored_zero"] and r["same_loss"] and r["untouched"], r
        assert r["loss_err"] <= 1e-5 * max(1.0, r["loss_scale"]), r  # fp32 sums in another order
        if r["dtype"] == "torch.float32":
            # fp32 exp/log in another order; under the cap tanh is 2 sigmoid(2x) - 1 (~1e-7 absolute)
            assert r["grad_err"] <= 2e-6, r
        else:  # one bf16 step: fp32 values ~1e-7 apart, and the interpreter casts to bf16 by truncation (the GPU rounds)
            assert r["within_bf16_step"], r


def test_the_start_up_line_names_the_path_the_head_takes():
    from types import SimpleNamespace

    from qlora.training.loss import TokenLoss

    class Causal(torch.nn.Module):
        def __init__(self, softcap=None):
            super().__init__()
            self.model, self.lm_head = torch.nn.Identity(), torch.nn.Linear(8, 16, bias=False)
            self.lm_head.weight.requires_grad_(False)
            self.config = SimpleNamespace(final_logit_softcapping=softcap)

    cpu = torch.device("cpu")
    assert TokenLoss(Causal(), "fused").head_path(cpu).endswith("by torch ops")  # no CUDA: the torch path
    assert TokenLoss(Causal(), "fused", ce_kernel=False).head_path(cpu).endswith("by torch ops")
    assert TokenLoss(Causal(), "liger").head_path(cpu).endswith("by torch ops")  # liger's head is CUDA-only
    assert TokenLoss(Causal(), "plain").head_path(cpu).startswith("lm_head + cross-entropy per chunk")
    trained = Causal()
    trained.lm_head.weight.requires_grad_(True)  # a trained head takes the plain loop whatever `ce` says
    assert TokenLoss(trained, "fused").head_path(cpu).startswith("lm_head + cross-entropy per chunk")
