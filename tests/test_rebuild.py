"""`rebuild_inputs` (qlora/speed/rebuild.py): the projections' inputs rebuilt in backward change no number
(bitwise: the same kernels run on the same inputs), free exactly the norm outputs and the gated MLP
activation of the layers that do not recompute, on every family, and refuse the settings where they
would do nothing."""

import pytest
import torch

from qlora.config import ConfigError
from qlora.model.trainable import describe_speedups, load_model
from qlora.speed import attention
from qlora.speed.switches import Where, check_switches
from qlora.training.loss import TokenLoss
from qlora.training.packing import collate

from conftest import tiny_cfg
from helpers import lora_params, randomise_lora_
from test_families import examples, family_dir
from qlora.model.base import load_tokenizer

FAMILY_NAMES = ["qwen2", "gemma3", "phi3"]  # a frozen q/k/v bias, GeGLU with two more norms, fused gate_up


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("rebuild")
    return {f: family_dir(root, f) for f in FAMILY_NAMES}


def cfg_for(model: str, **kw):
    return tiny_cfg(model=model, quant="nf4", **kw)


def saved_bytes(run) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `run()` builds the graph."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return out, sum(storages.values())


def loss_grads_and_saved(cfg, batch, seed=0):
    model = load_model(cfg, torch.device("cpu"))
    randomise_lora_(model)
    backend = attention.use_packed_attention(model, "sdpa")
    lm = TokenLoss(model)
    lm.train()
    kw = attention.packing_kwargs(batch["position_ids"], backend)
    torch.manual_seed(seed)  # the same dropout masks on both sides
    loss, saved = saved_bytes(lambda: lm(batch["input_ids"], batch["position_ids"], batch["targets"],
                                         batch["sup_index"], **kw))
    loss.backward()
    return model, loss.detach(), {n: p.grad.clone() for n, p in lora_params(model).items()}, saved


def check_same_and_smaller(cfg_off, cfg_on, batch, layers: int, first: bool = True):
    _, loss0, grads0, saved0 = loss_grads_and_saved(cfg_off, batch)
    model, loss1, grads1, saved1 = loss_grads_and_saved(cfg_on, batch)
    assert torch.equal(loss0, loss1)
    assert grads0.keys() == grads1.keys()
    for n in grads0:
        assert grads0[n].abs().max() > 0, n
        assert torch.equal(grads0[n], grads1[n]), n
    c = model.config
    tokens = batch["input_ids"].numel()
    size = 4  # fp32
    # per layer that does not recompute: two norm outputs (hidden each) and act(gate) * up (intermediate);
    # but not the first layer's attention norm: its input, the frozen embeddings' output, needs no gradient,
    # so nothing keeps it and there is nothing to rebuild from (the projections keep the norm output then)
    per_layer = 2 * c.hidden_size + c.intermediate_size
    assert saved0 - saved1 == tokens * (layers * per_layer - first * c.hidden_size) * size
    return model


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_llama_same_numbers_less_kept(sql_examples_tiny, dropout):
    batch = sql_examples_tiny
    off = cfg_for("random:tiny", lora_dropout=dropout)
    on = cfg_for("random:tiny", lora_dropout=dropout, rebuild_inputs=True)
    model = check_same_and_smaller(off, on, batch, layers=2)
    assert "inputs rebuilt in backward from 4 norms and 2 MLPs" in describe_speedups(model)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_same_numbers_less_kept(folders, family):
    cfg = tiny_cfg(model=str(folders[family]))
    tok = load_tokenizer(cfg)
    batch = collate([examples(tok)], tok.pad_token_id)
    model = check_same_and_smaller(cfg_for(str(folders[family])), cfg_for(str(folders[family]), rebuild_inputs=True),
                                   batch, layers=2)
    assert "from 4 norms and 2 MLPs" in describe_speedups(model)


def test_only_layers_that_do_not_recompute_are_touched(sql_examples_tiny):
    batch = sql_examples_tiny
    kw = dict(recompute=True, recompute_layers=1)
    model = check_same_and_smaller(cfg_for("random:tiny", **kw), cfg_for("random:tiny", rebuild_inputs=True, **kw),
                                   batch, layers=1, first=False)
    assert "checkpointing 1/2 layers" in describe_speedups(model)
    assert "from 2 norms and 1 MLPs" in describe_speedups(model)


def test_bf16_compute_is_bitwise_too(sql_examples_tiny):
    batch = sql_examples_tiny
    _, l0, g0, s0 = loss_grads_and_saved(cfg_for("random:tiny", compute_dtype="bfloat16"), batch)
    _, l1, g1, s1 = loss_grads_and_saved(cfg_for("random:tiny", compute_dtype="bfloat16", rebuild_inputs=True), batch)
    assert torch.equal(l0, l1) and all(torch.equal(g0[n], g1[n]) for n in g0)
    assert s1 < s0


@pytest.mark.parametrize("change, why", [
    (dict(fused_lora=False), "needs fused_lora true"),
    (dict(recompute=True, recompute_layers=-1), "acts on the layers that do not recompute"),
])
def test_refuses_where_it_would_do_nothing(change, why):
    cfg = tiny_cfg(rebuild_inputs=True, **change)
    with pytest.raises(ConfigError, match=why):
        check_switches(cfg, Where(torch.device("cpu")))


@pytest.fixture(scope="module")
def sql_examples_tiny(tok):
    from qlora.data.examples import load_datasets

    exs = load_datasets(["builtin:sql"], tok, 256, "drop", 0.0, seed=0)[0]
    return collate([[e] for e in exs[:2]], pad_id=0)

