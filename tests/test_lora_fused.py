"""The fused NF4+LoRA autograd node against peft's own forward: same loss, same LoRA gradients, with
and without dropout (same mask on both sides), with checkpointing, and the fallbacks it must keep."""

import pytest
import torch

from qlora.speed import attention, lora_fused
from qlora.training.loss import TokenLoss
from qlora.model.layerwise import decoder_layers
from qlora.model.trainable import describe_speedups, enable_checkpointing, load_model
from qlora.training.packing import collate

from conftest import tiny_cfg
from helpers import FixedMaskDropout, fixed_mask_dropout, grads_of, randomise_lora_


def two_models(sql_examples, **kw):
    cfg = tiny_cfg(quant="nf4", **kw)
    plain = load_model(tiny_cfg(quant="nf4", fused_lora=False, **kw), torch.device("cpu"))
    fused = load_model(cfg, torch.device("cpu"))
    randomise_lora_(plain)
    randomise_lora_(fused)
    batches = [collate([[e] for e in sql_examples[i:i + 2]], pad_id=0) for i in (0, 2)]
    return plain, fused, batches


@pytest.fixture(scope="module")
def sql_examples(tok):
    from qlora.data.examples import load_datasets

    return load_datasets(["builtin:sql"], tok, 256, "drop", 0.0, seed=0)[0]


def compare(plain, fused, batches):
    out = {}
    for name, model in (("plain", plain), ("fused", fused)):
        backend = attention.use_packed_attention(model, "sdpa")
        lm = TokenLoss(model)
        lm.train()
        grads = grads_of(lm, batches, backend)
        b = batches[0]
        with torch.no_grad():  # training mode (dropout on), no graph
            loss = float(lm(b["input_ids"], b["position_ids"], b["targets"], b["sup_index"],
                            **attention.packing_kwargs(b["position_ids"], backend)))
        out[name] = (loss, grads)
    (lp, gp), (lf, gf) = out["plain"], out["fused"]
    assert lf == pytest.approx(lp, rel=1e-5)
    assert gp.keys() == gf.keys() and len(gp) == 2 * 7 * 2  # A and B of 7 projections, 2 layers
    for n in gp:
        assert gp[n].abs().max() > 0, n
        torch.testing.assert_close(gf[n], gp[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_matches_peft_without_dropout(sql_examples):
    plain, fused, batches = two_models(sql_examples)
    assert "fused NF4+LoRA linears 14" in describe_speedups(fused)
    assert "fused NF4+LoRA linears 0" in describe_speedups(plain)
    compare(plain, fused, batches)


def test_fused_matches_peft_with_the_same_dropout_mask(sql_examples, monkeypatch):
    monkeypatch.setattr(lora_fused, "dropout", fixed_mask_dropout)
    plain, fused, batches = two_models(sql_examples, lora_dropout=0.1)
    for m in plain.modules():  # peft's dropout modules -> the same fixed mask
        if hasattr(m, "lora_dropout"):
            m.lora_dropout["default"] = FixedMaskDropout(0.1)
    compare(plain, fused, batches)


def test_fused_with_partial_checkpointing_matches_peft(sql_examples):
    plain, fused, batches = two_models(sql_examples, recompute=True, recompute_layers=1)
    assert [b.gradient_checkpointing for b in decoder_layers(fused)] == [True, False]
    compare(plain, fused, batches)


def test_dropout_on_gives_a_different_but_unbiased_output(sql_examples):
    """With real random masks the fused output differs from the no-dropout output in training
    mode and equals it in eval mode (no dropout at eval)."""
    _, fused, batches = two_models(sql_examples, lora_dropout=0.3)
    ids = batches[0]["input_ids"]
    fused.eval()
    with torch.no_grad():
        ref = fused(ids).logits
        fused.train()
        a, b = fused(ids).logits, fused(ids).logits
    assert not torch.allclose(a, b)  # two draws of the mask
    assert not torch.allclose(a, ref)


def test_fallback_when_adapters_are_disabled(sql_examples):
    plain, fused, batches = two_models(sql_examples)
    ids = batches[0]["input_ids"]
    with torch.no_grad(), fused.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(fused(ids).logits, plain(ids).logits)
    n_lora = sum(1 for m in fused.modules() if hasattr(m, "lora_A"))  # every LoRA-wrapped linear
    assert n_lora > 0 and f"fused NF4+LoRA linears {n_lora}," in describe_speedups(fused)
    assert "fused NF4+LoRA linears 0," in describe_speedups(plain)


def test_checkpoint_layers_counts(sql_examples):
    model = load_model(tiny_cfg(), torch.device("cpu"))
    assert enable_checkpointing(model, -1) == 2
    assert enable_checkpointing(model, 0) == 0
    assert [b.gradient_checkpointing for b in decoder_layers(model)] == [False, False]
    assert enable_checkpointing(model, 5) == 2


def test_dropout_mask_is_replayed_by_checkpoint_recompute(sql_examples):
    """Real random dropout masks: with every layer checkpointed the recompute must draw the same
    mask as the forward did (torch restores the RNG state), so gradients equal the uncheckpointed run."""
    grads = []
    for ck in (False, True):
        torch.manual_seed(0)
        model = load_model(tiny_cfg(quant="nf4", lora_dropout=0.3, recompute=ck), torch.device("cpu"))
        randomise_lora_(model)
        batches = [collate([[e] for e in sql_examples[:2]], pad_id=0)]
        lm = TokenLoss(model)
        lm.train()
        torch.manual_seed(123)
        grads.append(grads_of(lm, batches, attention.use_packed_attention(model, "sdpa")))
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_only_the_chosen_layers_recompute(sql_examples):
    """Backward re-runs the forward of checkpointed layers only: count MLP calls per layer."""
    model = load_model(tiny_cfg(recompute=True, recompute_layers=1), torch.device("cpu"))
    calls = []
    for i, block in enumerate(decoder_layers(model)):
        block.mlp.register_forward_pre_hook(lambda *_, i=i: calls.append(i))  # pre: recompute stops early
    batch = collate([[e] for e in sql_examples[:2]], pad_id=0)
    lm = TokenLoss(model)
    lm.train()
    backend = attention.use_packed_attention(model, "sdpa")
    lm(batch["input_ids"], batch["position_ids"], batch["targets"], batch["sup_index"],
       **attention.packing_kwargs(batch["position_ids"], backend)).backward()
    assert calls.count(0) == 2 and calls.count(1) == 1  # layer 0 recomputed in backward, layer 1 not
