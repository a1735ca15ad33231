"""`group_projections` (qlora/speed/grouped.py): q/k/v and gate/up as one autograd node each train the same
numbers as the separate fused nodes (up to the order of additions), on every family and with every path it
composes with; an output no sibling takes is dropped; it refuses what it cannot serve."""

import pytest
import torch

from qlora.config import ConfigError
from qlora.model.base import load_tokenizer
from qlora.model.trainable import describe_speedups, load_model
from qlora.speed import grouped
from qlora.speed.switches import Where, check_switches
from qlora.training.packing import collate

from conftest import tiny_cfg
from helpers import randomise_lora_
from test_families import examples, family_dir
from test_rebuild import cfg_for, loss_grads_and_saved, sql_examples_tiny  # noqa: F401 (a fixture)

# tolerance: measured in fp32 on a 2-core AVX512-BF16 CPU, grouped vs separate nodes give the same loss
# bitwise and LoRA gradients within 1.3e-6 of their largest entry (input gradients summed in another
# order); 2e-5 leaves room for other CPUs' BLAS blocking.
TOL = 2e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_close(cfg_off, cfg_on, batch, groups: int):
    _, loss0, grads0, saved0 = loss_grads_and_saved(cfg_off, batch)
    model, loss1, grads1, saved1 = loss_grads_and_saved(cfg_on, batch)
    assert rel(loss1, loss0) <= TOL
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        assert grads0[n].abs().max() > 0, n
        assert rel(grads1[n], grads0[n]) <= TOL, (n, rel(grads1[n], grads0[n]))
    assert saved1 <= saved0  # the input is kept once per group either way; nothing more
    assert grouped.count(model) == groups
    return model


@pytest.mark.parametrize("kw", [
    dict(lora_dropout=0.0),
    dict(lora_dropout=0.1),  # each member draws its own mask, in the same order as separate nodes
    dict(lora_dropout=0.1, seeded_dropout=True),
    dict(lora_dropout=0.0, rebuild_inputs=True, recompute=True, recompute_layers=1),
    dict(lora_dropout=0.0, recompute=True, offload_recompute=True, mlp_tile_tokens=48),
], ids=["plain", "dropout", "seeded", "rebuild", "offload+tiles"])
def test_same_numbers_as_separate_nodes(sql_examples_tiny, kw):
    model = check_close(cfg_for("random:tiny", **kw), cfg_for("random:tiny", group_projections=True, **kw),
                        sql_examples_tiny, groups=10)
    assert "10 projections grouped by shared input" in describe_speedups(model)


@pytest.mark.parametrize("family, groups", [("qwen2", 10), ("qwen3", 10), ("gemma3", 10), ("mistral", 10),
                                            ("phi3", 0)])
def test_every_family(tmp_path, family, groups):
    """Qwen2's frozen q/k/v bias, Qwen3's and Gemma 3's q/k norms, GeGLU; Phi-3's projections are fused
    already (qkv_proj, gate_up_proj), so nothing groups and nothing changes."""
    folder = str(family_dir(tmp_path, family))
    tok = load_tokenizer(tiny_cfg(model=folder))
    batch = collate([examples(tok)], tok.pad_token_id)
    model = check_close(cfg_for(folder), cfg_for(folder, group_projections=True), batch, groups=groups)
    line = describe_speedups(model)
    assert ("group_projections on but no q/k/v or gate/up set" in line) == (groups == 0), line


def test_a_set_not_wholly_adapted_stays_separate_and_nothing_grouped_is_said(sql_examples_tiny):
    """LoRA on q and v only: k is a plain 4-bit linear, so q/k/v cannot be one node; gate/up still is. With
    no whole set left, the start-up line says group_projections applies to nothing (never silently off)."""
    part = dict(lora_targets=["q_proj", "v_proj", "gate_proj", "up_proj"])
    model = check_close(cfg_for("random:tiny", **part), cfg_for("random:tiny", group_projections=True, **part),
                        sql_examples_tiny, groups=4)
    assert "4 projections grouped" in describe_speedups(model)
    none = dict(lora_targets=["q_proj", "v_proj"])
    model = check_close(cfg_for("random:tiny", **none), cfg_for("random:tiny", group_projections=True, **none),
                        sql_examples_tiny, groups=0)
    assert "group_projections on but no q/k/v or gate/up set" in describe_speedups(model)


@pytest.mark.parametrize("kw", [dict(compute_dtype="bfloat16"), dict(base_fp8=True),
                                dict(base_fp8=True, compute_dtype="bfloat16")], ids=["bf16", "fp8", "bf16+fp8"])
def test_rounded_paths_are_no_further_from_fp32(sql_examples_tiny, kw):
    """In bf16 or FP8 a changed order of additions flips roundings, and later layers carry the flips on
    (FP8 gradients re-quantise them), so the two paths differ by more than in fp32. The grouped node must
    be no further than the separate nodes from the fp32 gradients. Measured (same CPU): largest error over
    all LoRA gradients, relative to each one's largest entry, 0.1405 / 0.1246 / 0.1787 grouped against
    0.1405 / 0.1246 / 0.1787 separate; a missing term would be of order 1."""
    batch = sql_examples_tiny
    _, _, ref, _ = loss_grads_and_saved(cfg_for("random:tiny"), batch)
    _, _, sep, _ = loss_grads_and_saved(cfg_for("random:tiny", **kw), batch)
    _, _, grp, _ = loss_grads_and_saved(cfg_for("random:tiny", group_projections=True, **kw), batch)
    err_sep = max(rel(sep[n].float(), ref[n]) for n in ref)
    err_grp = max(rel(grp[n].float(), ref[n]) for n in ref)
    assert err_grp <= 1.1 * err_sep, (err_grp, err_sep)


def test_an_output_no_sibling_takes_is_computed_alone_and_dropped(sql_examples_tiny):
    model = load_model(cfg_for("random:tiny", group_projections=True), torch.device("cpu"))
    randomise_lora_(model)
    attn = model.get_base_model().model.layers[0].self_attn
    x = torch.randn(1, 5, model.config.hidden_size)
    other = torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad():
        q = attn.q_proj(x)  # computes q, k and v; k and v wait for a call with x
        assert grouped.PENDING_ATTR in attn.k_proj.__dict__
        k_other = attn.k_proj(other)  # another input: computed alone, the waiting one dropped
        assert grouped.PENDING_ATTR not in attn.k_proj.__dict__
        separate = {}
        for name in ("q_proj", "k_proj"):
            m = getattr(attn, name)
            m.__dict__.pop(grouped.GROUP_ATTR)  # as a lone fused node
            separate[name] = m(x if name == "q_proj" else other)
            m.__dict__[grouped.GROUP_ATTR] = (attn.q_proj, attn.k_proj, attn.v_proj)
        assert torch.allclose(q, separate["q_proj"], rtol=0, atol=1e-5)
        assert torch.allclose(k_other, separate["k_proj"], rtol=0, atol=1e-5)
        # the parent's return drops whatever no sibling took
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert not any(grouped.PENDING_ATTR in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("change, where, why", [
    (dict(fused_lora=False), Where(torch.device("cpu")), "needs fused_lora true"),
    (dict(), Where(torch.device("cpu"), processes=2, fsdp=True), "needs no FSDP"),
])
def test_refuses_what_it_cannot_serve(change, where, why):
    cfg = tiny_cfg(group_projections=True, **change)
    with pytest.raises(ConfigError, match=why):
        check_switches(cfg, where)
