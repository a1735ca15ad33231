"""`recompute_attention: false` (qlora/speed/keep_attention.py): recomputed layers keep their attention output,
so the attention kernel runs once per layer instead of twice, and nothing else changes: the loss and every
LoRA gradient are bitwise those of the plain recompute, with torch's checkpoint and with the offloaded one,
with and without torch's dropout, on a GQA family too. Settings where it cannot act are refused."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora.config import ConfigError
from qlora.model.base import load_tokenizer
from qlora.model.trainable import describe_speedups, load_model
from qlora.speed import attention
from qlora.speed.keep_attention import ATTENTION_OPS
from qlora.speed.switches import Where, check_switches
from qlora.training.loss import TokenLoss
from qlora.training.packing import collate

from conftest import tiny_cfg
from helpers import lora_params, randomise_lora_
from test_families import examples, family_dir


class CountAttention(TorchDispatchMode):
    """Counts the attention forward kernels that really run (a kept output is handed back without a call)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += str(func).rsplit(".", 1)[0] in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


def run_step(cfg, batch):
    model = load_model(cfg, torch.device("cpu"))
    randomise_lora_(model)
    backend = attention.use_packed_attention(model, "sdpa")
    lm = TokenLoss(model)
    lm.train()
    kw = attention.packing_kwargs(batch["position_ids"], backend)
    torch.manual_seed(0)  # the same torch dropout masks on both sides
    with CountAttention() as counter:
        loss = lm(batch["input_ids"], batch["position_ids"], batch["targets"], batch["sup_index"], **kw)
        loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in lora_params(model).items()}, counter.calls


def check_same_and_fewer(model_name, batch, layers, **kw):
    base = dict(model=model_name, quant="nf4", recompute=True, **kw)
    _, loss0, grads0, calls0 = run_step(tiny_cfg(**base), batch)
    model, loss1, grads1, calls1 = run_step(tiny_cfg(recompute_attention=False, **base), batch)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys() and grads0
    for n in grads0:
        assert grads0[n].abs().max() > 0, n
        assert torch.equal(grads0[n], grads1[n]), n
    recomputed = layers if kw.get("recompute_layers", -1) < 0 else kw["recompute_layers"]
    assert calls0 == layers + recomputed  # every layer once, the recomputed ones twice
    assert calls1 == layers
    return model


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_numbers_attention_once(sql_examples_tiny, offload, dropout):
    model = check_same_and_fewer("random:tiny", sql_examples_tiny, layers=2, offload_recompute=offload,
                                 lora_dropout=dropout)
    assert "checkpointing 2/2 layers (attention output kept in 2)" in describe_speedups(model)


@pytest.mark.parametrize("offload", [False, True])
def test_unfused_linears(sql_examples_tiny, offload):
    # peft's and bitsandbytes' own 4-bit linears: torch's selective checkpointing matches the recompute's ops
    # to the forward's, so the offloaded forward must run them as the recompute does (with grad on)
    check_same_and_fewer("random:tiny", sql_examples_tiny, layers=2, offload_recompute=offload, fused_lora=False)


@torch.library.custom_op("qlora_test::lse_attention", mutates_args=())
def lse_attention(q: torch.Tensor, with_lse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Like SDPA's efficient and cuDNN kernels on CUDA: the log-sum-exp its backward reads is written only when
    grad is on and an input requires it (aten's should_compute_logsumexp), else it is empty."""
    return q.softmax(-1), q.logsumexp(-1) if with_lse else q.new_empty(q.shape[:-1] + (0,))


def _lse_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])


def _lse_backward(ctx, grad_out, _grad_lse):
    q, lse = ctx.saved_tensors
    p = (q - lse.unsqueeze(-1)).exp()  # the softmax rebuilt from the kept log-sum-exp
    return p * (grad_out - (grad_out * p).sum(-1, keepdim=True)), None


lse_attention.register_autograd(_lse_backward, setup_context=_lse_setup)


def test_kernel_that_writes_lse_only_under_grad(monkeypatch):
    from torch.utils.checkpoint import checkpoint

    from qlora.speed import keep_attention
    from qlora.speed.offload import offloaded_checkpoint

    monkeypatch.setattr(keep_attention, "ATTENTION_OPS", ATTENTION_OPS | {"qlora_test.lse_attention"})
    torch.manual_seed(0)
    w, x = torch.randn(8, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)

    def layer(h):
        q = h @ w
        return lse_attention(q, torch.is_grad_enabled() and q.requires_grad)[0]

    def grad_of(call):
        w.grad = None
        (call() * torch.arange(8.0)).sum().backward()
        return w.grad.clone()

    want = grad_of(lambda: checkpoint(layer, x, use_reentrant=False))
    kept = grad_of(lambda: checkpoint(layer, x, use_reentrant=False, context_fn=keep_attention.keep_attention_contexts))
    offloaded = grad_of(lambda: offloaded_checkpoint(True, keep_attention.keep_attention_contexts)(layer, x))
    assert want.abs().max() > 0
    assert torch.equal(kept, want) and torch.equal(offloaded, want)


def test_only_recomputed_layers_keep(sql_examples_tiny):
    model = check_same_and_fewer("random:tiny", sql_examples_tiny, layers=2, recompute_layers=1)
    assert "checkpointing 1/2 layers (attention output kept in 1)" in describe_speedups(model)


def test_gqa_family(tmp_path):
    folder = family_dir(tmp_path, "qwen2")  # 4 query heads over 2 key/value heads, q/k/v biases
    tok = load_tokenizer(tiny_cfg(model=str(folder)))
    check_same_and_fewer(str(folder), collate([examples(tok)], tok.pad_token_id), layers=2)


@pytest.mark.parametrize("change, why", [
    (dict(recompute=False), "needs recompute true"),
    (dict(recompute=True, cuda_graphs=True), "needs cuda_graphs false"),
    (dict(recompute=True, attn_backend="flex"), "needs attn_backend other than flex"),
])
def test_refuses_where_it_cannot_act(change, why):
    cfg = tiny_cfg(recompute_attention=False, **change)
    with pytest.raises(ConfigError, match=why):  # a CUDA device as the validator sees it: cuda_graphs' own need
        check_switches(cfg, Where(torch.device("cuda")))


def test_refuses_under_fsdp():
    cfg = tiny_cfg(recompute_attention=False, recompute=True)
    with pytest.raises(ConfigError, match="needs no FSDP"):
        check_switches(cfg, Where(torch.device("cpu"), processes=2, fsdp=True))


@pytest.fixture(scope="module")
def sql_examples_tiny(tok):
    from qlora.data.examples import load_datasets

    exs = load_datasets(["builtin:sql"], tok, 256, "drop", 0.0, seed=0)[0]
    return collate([[e] for e in exs[:2]], pad_id=0)
