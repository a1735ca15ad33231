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
                                dict(base_fp8=True, compute_dtype="bfloat16"),
                                dict(base_fp8=True, fp8_exclude=["k_proj", "down_proj"])],
                         ids=["bf16", "fp8", "bf16+fp8", "fp8 but k"])
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


def separate_twin(model):
    """The same model with every set ungrouped (each member a lone fused node), sharing the weights."""
    import copy
    twin = copy.deepcopy(model)
    for m in twin.modules():
        m.__dict__.pop(grouped.GROUP_ATTR, None)
    return twin


def test_another_input_ungroups_the_set_and_leaves_nothing_waiting():
    """Cross-attention style (q on x, k and v on another tensor): the outputs are the lone nodes' and the
    set runs ungrouped from then on; nothing waits anywhere afterwards."""
    model = load_model(cfg_for("random:tiny", group_projections=True), torch.device("cpu"))
    randomise_lora_(model)
    twin = separate_twin(model)
    attn, ref = (m.get_base_model().model.layers[0].self_attn for m in (model, twin))
    x, other = torch.randn(1, 5, model.config.hidden_size), torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad():
        q = attn.q_proj(x)  # computes q, k and v; k and v wait for a call with x
        assert grouped.PENDING_ATTR in attn.k_proj.__dict__
        k, v = attn.k_proj(other), attn.v_proj(other)
        assert rel(q, ref.q_proj(x)) <= TOL  # the group's q: one A GEMM for three (another blocking, maybe)
        assert torch.equal(k, ref.k_proj(other)) and torch.equal(v, ref.v_proj(other))  # lone nodes, both
        assert not any(grouped.GROUP_ATTR in getattr(attn, n).__dict__ for n in ("q_proj", "k_proj", "v_proj"))
        assert grouped.count(model) == 7  # 10 - this layer's q/k/v; its gate/up and layer 1 still grouped
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert not any(grouped.PENDING_ATTR in m.__dict__ for m in model.modules())


def test_a_model_calling_out_of_order_gets_the_same_dropout_masks():
    """torch's dropout draws one mask per member call; a model that calls v before q must get the masks the
    separate nodes draw in that order: the set ungroups at the first such call."""
    model = load_model(cfg_for("random:tiny", group_projections=True, lora_dropout=0.1), torch.device("cpu"))
    randomise_lora_(model)
    twin = separate_twin(model)
    attn, ref = (m.get_base_model().model.layers[0].self_attn for m in (model, twin))
    x = torch.randn(1, 5, model.config.hidden_size)
    outs = []
    for a in (attn, ref):
        torch.manual_seed(3)
        outs.append([a.v_proj(x), a.q_proj(x), a.k_proj(x)])
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    assert grouped.count(model) == 7


def test_a_forward_that_raises_leaves_nothing_waiting():
    """The stash holds an output and its autograd graph: the parent's hook drops it also when the parent's
    forward raises between the members' calls (e.g. out of memory), so nothing stays alive."""
    model = load_model(cfg_for("random:tiny", group_projections=True), torch.device("cpu"))
    attn = model.get_base_model().model.layers[1].self_attn

    def boom(*a, **k):
        raise RuntimeError("out of memory (simulated)")
    attn.k_proj.forward = boom
    with pytest.raises(RuntimeError, match="simulated"):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert not any(grouped.PENDING_ATTR in m.__dict__ for m in model.modules())


def test_adapters_switched_off_for_a_while_keep_the_sets_grouped():
    """peft's disable_adapter() (base-model evaluation): the first member computes alone and so do its
    siblings for that call, base-only outputs; afterwards the sets are grouped as before."""
    model = load_model(cfg_for("random:tiny", group_projections=True), torch.device("cpu"))
    randomise_lora_(model)
    twin = separate_twin(model)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        with model.disable_adapter(), twin.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)
        assert grouped.count(model) == 10
        assert rel(model(input_ids=ids).logits, twin(input_ids=ids).logits) <= TOL


@pytest.mark.parametrize("change, where, why", [
    (dict(fused_lora=False), Where(torch.device("cpu")), "needs fused_lora true"),
    (dict(), Where(torch.device("cpu"), processes=2, fsdp=True), "needs no FSDP"),
])
def test_refuses_what_it_cannot_serve(change, where, why):
    cfg = tiny_cfg(group_projections=True, **change)
    with pytest.raises(ConfigError, match=why):
        check_switches(cfg, where)
