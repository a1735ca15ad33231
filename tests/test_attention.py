"""Packed attention must give exactly what each example gives alone (qlora/speed/attention.py).

Tiny random Llama (GQA: 4 query heads, 2 kv heads) with LoRA on every linear, fp32 on CPU. The same
examples are run (a) one at a time, batch 1, no padding, stock attention, and (b) packed into two
rows with padding tails; logits at real positions, per-token losses and LoRA gradients must agree.
"""

import inspect
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without install

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402

import qlora.speed.attention as qa  # noqa: E402
from helpers import FakeFrontend  # noqa: E402
from qlora.speed.attention import (  # noqa: E402
          mask_cross_example_labels,
          packing_kwargs,
          use_default_attention,
          use_packed_attention,
      )

LENS = [[7, 13], [1, 10, 5]]  # two rows of T=24: tails of 4 and 8 padding tokens, a 1-token example
T = 24
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def position_ids(lens_per_row: list[list[int]], T: int) -> torch.Tensor:
    """[B,T] position_ids of rows packed with examples of these lengths, written out position by position:
    each example counts from 0, and the padding tail (if any) counts from 0 as one more pseudo-example."""
    rows = []
    for lens in lens_per_row:
        row = [i for n in lens for i in range(n)]
        rows.append(row + list(range(T - len(row))))
    return torch.tensor(rows, dtype=torch.long)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These matmuls are tiny: intra-op threads only spin (30x slower on a busy 2-core CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(quant_dtype=None):
    """Seeded tiny Llama + LoRA; ``quant_dtype`` swaps the linears for NF4 Linear4bit (CPU)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128)
    model = LlamaForCausalLM(cfg)
    if quant_dtype is not None:
        bnb = pytest.importorskip("bitsandbytes")
        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if name in TARGETS:
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                              compute_dtype=quant_dtype, quant_type="nf4")
                        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
                        setattr(parent, name, q.to("cpu"))  # .to() quantizes
    # init_lora_weights=False: B is random too, so LoRA changes the outputs and every A gets a gradient.
    from qlora.model.quant import guard_cpu_4bit_repack
    guard_cpu_4bit_repack(model)  # eval passes keep the fp32 4-bit path on CPUs with AVX512-BF16 too
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    return model.eval()


def make_batch():
    g = torch.Generator().manual_seed(1)
    examples = [torch.randint(1, 128, (n,), generator=g) for row in LENS for n in row]
    pos = position_ids(LENS, T)
    ids = torch.zeros(len(LENS), T, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    spans, it = [], iter(examples)  # spans: (row, start, example) of every real example
    for r, row in enumerate(LENS):
        s = 0
        for n in row:
            x = next(it)
            ids[r, s:s + n] = x
            labels[r, s:s + n] = x
            spans.append((r, s, x))
            s += n
    return examples, ids, pos, mask_cross_example_labels(labels, pos), spans


def token_losses(logits, labels):
    """Per-token loss of predicting labels[t+1] from position t (HF's shift), -100 ignored."""
    return F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(),
                           reduction="none", ignore_index=-100).view(labels[..., 1:].shape)


def lora_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def run_unpacked(model, examples, grads=True):
    use_default_attention(model)
    model.zero_grad(set_to_none=True)
    logits, losses = [], []
    with torch.set_grad_enabled(grads):
        for x in examples:
            lg = model(input_ids=x[None]).logits[0]
            ls = token_losses(lg, x)
            if grads:
                ls.sum().backward()
            logits.append(lg.detach())
            losses.append(ls.detach())
    return logits, losses, lora_grads(model) if grads else None


def run_packed(model, ids, pos, labels, backend, grads=True, **fwd_kw):
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        out = model(input_ids=ids, position_ids=pos, labels=labels, **fwd_kw)
        ls = token_losses(out.logits, labels)
        if grads:
            ls.sum().backward()
    return out, ls.detach(), lora_grads(model) if grads else None


def errors(model, backend, grads=True, impl=None):
    """Max abs errors packed vs unpacked: logits, per-token loss, LoRA grads relative to max |grad|.

    ``backend=None`` runs the packed rows through the registered attention ``impl`` instead.
    """
    examples, ids, pos, labels, spans = make_batch()
    logits_u, losses_u, grads_u = run_unpacked(model, examples, grads)
    if backend is not None:
        use_packed_attention(model, backend)
        fwd_kw = packing_kwargs(pos, backend)
    else:
        model.get_base_model().set_attn_implementation(impl)
        fwd_kw = {"use_cache": False}
    out, losses_p, grads_p = run_packed(model, ids, pos, labels, backend, grads, **fwd_kw)
    err = {"logits": 0.0, "loss": 0.0, "grad": 0.0}
    for (r, s, x), lg, ls in zip(spans, logits_u, losses_u):
        n = len(x)
        err["logits"] = max(err["logits"], (out.logits[r, s:s + n].detach() - lg).abs().max().item())
        if n > 1:
            err["loss"] = max(err["loss"], (losses_p[r, s:s + n - 1] - ls).abs().max().item())
    if grads:
        assert grads_u.keys() == grads_p.keys() and len(grads_u) == 2 * len(TARGETS) * 2
        err["grad"] = max(((grads_p[k] - g).abs().max() / g.abs().max()).item() for k, g in grads_u.items())
    # HF's own (mean) loss over the packed rows equals the mean over all unpacked target tokens.
    err["hf_loss"] = abs(out.loss.item() - torch.cat(losses_u).mean().item())
    err["first_logits"] = max((out.logits[r, :len(x)].detach() - lg).abs().max().item()
                              for (r, s, x), lg in zip(spans, logits_u) if s == 0)
    return err


def assert_close(err, tol, grad_tol=None):
    assert err["logits"] < tol and err["loss"] < tol and err["hf_loss"] < tol, err
    assert err["grad"] < (grad_tol or tol), err


# ----------------------------------------------------------------------------- fp32, exact isolation
@pytest.mark.parametrize("checkpointing", [False, True])
def test_sdpa_packed_matches_unpacked_fp32(checkpointing, monkeypatch):
    model = make_model()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing only engages in train mode (all dropouts are 0)
    calls, real = [], qa._sdpa_forward

    def counting(module, query, key, value, attention_mask, **kw):  # the mask reaches every call
        calls.append(isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4)
        return real(module, query, key, value, attention_mask, **kw)

    monkeypatch.setitem(qa._FUNCTIONS, "sdpa", counting)  # what use_packed_attention registers
    err = errors(model, "sdpa")
    assert calls == [True] * (4 if checkpointing else 2), calls  # 2 layers (+2 recomputed in backward)
    assert_close(err, 1e-5)
    print(f"fp32 checkpointing={checkpointing}: {err}")


def test_without_isolation_logits_differ():
    """Plain causal attention over the packed rows leaks across examples: the test can fail."""

    def plain_causal(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("test_plain_causal", plain_causal)
    err = errors(make_model(), None, impl="test_plain_causal")
    assert err["first_logits"] < 1e-5, err  # the first example of a row sees nothing else: identical
    assert err["logits"] > 0.1 and err["loss"] > 0.1 and err["grad"] > 0.1, err


def test_stock_sdpa_leaks_with_default_use_cache():
    """Why we do not rely on transformers' own packed-sequence detection: it is skipped whenever a
    KV cache exists, and LlamaModel creates one by default (use_cache=True), even in training."""
    model = make_model()
    examples, ids, pos, labels, spans = make_batch()
    logits_u, _, _ = run_unpacked(model, examples, grads=False)
    with torch.no_grad():
        leaky = model(input_ids=ids, position_ids=pos).logits  # stock sdpa, use_cache from config
        isolated = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    r, s, x = spans[1]  # the second example of row 0
    assert (leaky[r, s:s + len(x)] - logits_u[1]).abs().max() > 0.1
    assert (isolated[r, s:s + len(x)] - logits_u[1]).abs().max() < 1e-5


def test_flex_packed_matches_unpacked_cpu_forward():
    """FlexAttention runs eagerly on CPU in torch 2.13, forward only (no CPU backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        err = errors(make_model(), "flex", grads=False)
    assert_close(err, 1e-5)


# ----------------------------------------------------------------------------- varlen via fake kernels
def _segment_attention(q, k, v, cu, scale):
    """Reference varlen: causal attention inside each [cu[i], cu[i+1]) segment, [N, H, D] layout."""
    out = torch.empty_like(q)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                                           is_causal=True, scale=scale)
        out[s:e] = o.transpose(0, 1)
    return out


def fake_varlen_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):  # exactly torch 2.11.0's signature (read on the GPU image)
    assert window_size == (-1, 0) and isinstance(window_size, tuple)
    assert query.shape[1] == key.shape[1]  # no GQA flag in 2.11: heads must come repeated
    return _segment_attention(query, key, value, cu_seq_q, scale)


def fake_varlen_213(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                    num_splits=None):  # torch 2.13.0's signature
    assert window_size == (-1, 0) and isinstance(window_size, tuple)
    if query.shape[1] != key.shape[1]:
        assert enable_gqa
        rep = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    return _segment_attention(query, key, value, cu_seq_q, scale)


def fake_varlen_210(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    assert is_causal and query.shape[1] == key.shape[1]
    return _segment_attention(query, key, value, cu_seq_q, None)


@pytest.mark.parametrize("fake", [fake_varlen_211, fake_varlen_213, fake_varlen_210])
def test_varlen_adapter_builds_the_right_call(fake):
    seen = {}

    def recorder(*args, **kwargs):
        seen.update(args=args, kwargs=kwargs)
        return fake(*args, **kwargs)

    recorder.__signature__ = inspect.signature(fake)
    call = qa._adapt_varlen(recorder)
    q, k, v = torch.randn(10, 4, 16), torch.randn(10, 2, 16), torch.randn(10, 2, 16)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    out = call(q, k, v, cu, cu, 7, 7, scale=0.1)
    params = inspect.signature(fake).parameters
    kw = seen["kwargs"]
    assert kw.get("window_size", (-1, 0)) == (-1, 0) and kw.get("is_causal", True) is True
    assert ("window_size" in kw) == ("window_size" in params)
    assert kw.get("enable_gqa", False) == ("enable_gqa" in params)
    assert seen["args"][1].shape[1] == (2 if "enable_gqa" in params else 4)  # kv repeated only without flag
    assert kw.get("scale") == (0.1 if "scale" in params else None)
    assert seen["args"][3] is cu and seen["args"][5:7] == (7, 7)
    ref = _segment_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, 0.1)
    assert (out - ref).abs().max() < 1e-5  # incl. 2.10's missing `scale`, folded into q


def test_varlen_adapter_rejects_unknown_signature():
    with pytest.raises(RuntimeError, match="unsupported"):
        qa._adapt_varlen(lambda query, key, value, cu_seqlens, max_seqlen: None)


@pytest.mark.parametrize("fake", [fake_varlen_211, fake_varlen_213])
def test_varlen_path_in_model_with_fake_kernel(fake, monkeypatch):
    """The whole varlen path (flatten, cu_seq_lens, reshape back) on CPU with a reference kernel."""
    monkeypatch.setattr(qa, "_varlen_call", lambda: qa._adapt_varlen(fake))
    monkeypatch.setattr(qa, "_resolve", lambda backend, device: backend)  # skip the CUDA-only check
    assert_close(errors(make_model(), "varlen"), 1e-5)


def test_cudnn_backend_runs_whole_rows_dense_and_packed_rows_through_varlen(monkeypatch):
    """`cudnn`: rows that each hold one example go to the dense cuDNN kernel (here a CPU stand-in with its
    contract: causal SDPA on [B, H, T, D], GQA by enable_gqa); packed rows to the varlen path."""
    calls = []

    def dense(q, k, v, scale=None):
        calls.append(("dense", k.shape[1] < q.shape[1]))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] < q.shape[1])

    def varlen(*args, **kwargs):
        calls.append(("varlen", None))
        return fake_varlen_213(*args, **kwargs)

    varlen.__signature__ = inspect.signature(fake_varlen_213)
    monkeypatch.setattr(qa, "cudnn_frontend", lambda: None)  # without cuDNN's frontend installed
    monkeypatch.setattr(qa, "_dense_cudnn", dense)
    monkeypatch.setattr(qa, "_varlen_call", lambda: qa._adapt_varlen(varlen))
    monkeypatch.setattr(qa, "_resolve", lambda backend, device: backend)  # skip the CUDA-only check
    assert packing_kwargs(position_ids(LENS, T), "cudnn")["whole_rows"] is False
    assert_close(errors(make_model(), "cudnn"), 1e-5)  # packed rows: exactly the varlen path
    assert {c[0] for c in calls} == {"varlen"}

    # whole rows: the same logits and LoRA gradients as stock attention on the unpacked rows
    calls.clear()
    model = make_model()
    ids = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T).repeat(2, 1)
    use_default_attention(model)
    ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    ref.float().pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    use_packed_attention(model, "cudnn")
    kw = packing_kwargs(pos, "cudnn")
    assert kw["whole_rows"] is True
    out = model(input_ids=ids, position_ids=pos, **kw).logits
    out.float().pow(2).mean().backward()
    assert calls and all(c == ("dense", True) for c in calls)  # every layer; 2 K/V heads for 4 query heads
    assert (out - ref).abs().max() < 1e-5
    for n, g in ref_grads.items():
        assert ((dict(model.named_parameters())[n].grad - g).abs().max() / g.abs().max()) < 1e-5, n

    # one example per row with a padding tail (what collate builds for a document shorter than the row):
    # position_ids alone cannot tell the tail from a second example, the collator's flag can
    calls.clear()
    lens = [[20], [13]]
    tail_pos = position_ids(lens, T)
    assert packing_kwargs(tail_pos, "cudnn")["whole_rows"] is False
    kw = packing_kwargs(tail_pos, "cudnn", whole_rows=True)
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=tail_pos, **kw).logits
        use_default_attention(model)
        for r, (n,) in enumerate(lens):  # each example alone, no padding: the real positions agree
            alone = model(input_ids=ids[r:r + 1, :n], position_ids=tail_pos[r:r + 1, :n], use_cache=False).logits
            assert (out[r, :n] - alone[0]).abs().max() < 1e-5, r
    assert calls and {c[0] for c in calls} == {"dense"}


# ----------------------------------------------------------------------------- cuDNN frontend via a stand-in
def test_cudnn_frontend_runs_packed_and_whole_rows(monkeypatch):
    """With cuDNN's frontend installed, `cudnn` sends packed rows to its packed (THD) path and rows of one
    example to its dense path: the same logits, losses and LoRA gradients as unpacked stock attention."""
    fe = FakeFrontend()
    monkeypatch.setattr(qa, "cudnn_frontend", lambda: fe)
    monkeypatch.setattr(qa, "_resolve", lambda backend, device: backend)  # skip the CUDA-only check
    assert_close(errors(make_model(), "cudnn"), 1e-5)
    # every layer, forward; 7 sequences over 2 rows, padded with empty ones to 16 (few shapes for its plan cache)
    assert fe.calls and set(fe.calls) == {("packed", 16, -1)}
    kw = packing_kwargs(position_ids(LENS, T), "cudnn")
    assert kw["cu_seq_lens_q"].tolist() == [0, 7, 20, 24, 25, 35, 40, 48] + [48] * 9 and kw["max_length_q"] == T

    fe.calls.clear()
    model = make_model()
    ids = torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T).repeat(2, 1)
    use_default_attention(model)
    ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    use_packed_attention(model, "cudnn")
    out = model(input_ids=ids, position_ids=pos, **packing_kwargs(pos, "cudnn")).logits
    assert set(fe.calls) == {("dense", True, -1)}  # 2 K/V heads for 4 query heads
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("whole", [False, True, "tail"])
def test_cudnn_frontend_call_matches_sdpa_with_padded_cu_and_windows(monkeypatch, window, whole):
    """The attention function itself against the sdpa reference with the same block-diagonal mask: the
    layouts both ways, cumulative lengths padded with empty sequences and a fixed max length (as the CUDA
    graph passes them), a sliding window (transformers' meaning: keys less than `window` back), and rows of
    one example followed by a padding tail on the dense path (compared on the real tokens, whose outputs alone
    carry a gradient, as the tail has no targets)."""
    fe = FakeFrontend()
    monkeypatch.setattr(qa, "cudnn_frontend", lambda: fe)
    g = torch.Generator().manual_seed(3)
    B, H, HKV, D = 2, 4, 2, 8
    pos = {False: position_ids(LENS, T), True: torch.arange(T).repeat(2, 1), "tail": position_ids([[20], [13]], T)}[whole]
    real = pos.new_ones(B, T, dtype=torch.bool)
    if whole == "tail":
        real[0, 20:], real[1, 13:] = False, False
    q0, k0, v0 = (torch.randn(B, h, T, D, generator=g) for h in (H, HKV, HKV))
    go = torch.randn(B, T, H, D, generator=g) * real[:, :, None, None]
    got = {}
    for name in ("sdpa", "cudnn"):
        kw = packing_kwargs(pos, "varlen" if name == "cudnn" else "sdpa")
        kw.pop("use_cache")
        if name == "cudnn":
            if whole:
                kw["whole_rows"] = True
            else:  # the captured graph's inputs: 16 sequences, the tail empty, max length the row length
                cu = torch.full((17,), B * T, dtype=torch.int32)
                cu[: kw["cu_seq_lens_q"].numel()] = kw["cu_seq_lens_q"]
                kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=T, max_length_k=T)
        q, k, v = (x.clone().requires_grad_() for x in (q0, k0, v0))
        out, _ = qa._FUNCTIONS[name](None, q, k, v, kw.pop("attention_mask", None), scaling=0.3,
                                     sliding_window=window, **kw)
        assert out.shape == (B, T, H, D)
        out.backward(go)
        got[name] = (out.detach()[real], *(x.grad.transpose(1, 2)[real] for x in (q, k, v)))
    assert fe.calls == [("dense" if whole else "packed", True if whole else 16, window or -1)]
    for a, b in zip(got["cudnn"], got["sdpa"]):
        assert a.shape[0] == real.sum() and (a - b).abs().max() < 1e-5


def test_auto_takes_the_frontend_on_hopper_outside_deterministic_mode(monkeypatch):
    cuda = torch.device("cuda")
    cap = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    monkeypatch.setattr(qa, "_varlen_available", lambda: True)
    monkeypatch.setattr(qa, "cudnn_frontend", lambda: None)
    assert qa._resolve("auto", cuda) == "varlen"  # not installed
    monkeypatch.setattr(qa, "cudnn_frontend", lambda: FakeFrontend())
    assert qa._resolve("auto", cuda) == "cudnn"
    assert qa._resolve("auto", torch.device("cpu")) == "sdpa"
    cap[0] = (8, 0)  # not measured off Hopper
    assert qa._resolve("auto", cuda) == "varlen"
    cap[0] = (9, 0)
    # the model's heads: 128 and 256 (the sizes timed on the GPU) take it, others keep varlen unless asked by name
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    for hidden, want in ((512, "cudnn"), (1024, "cudnn"), (256, "varlen")):  # 4 heads of 128, 256, 64
        config = LlamaConfig(hidden_size=hidden, num_attention_heads=4)
        assert qa.resolve_for_model("auto", cuda, config, graphs=True) == want
        assert qa.resolve_for_model("auto", cuda, config, graphs=False) == "varlen"  # eager: not measured
        assert qa.resolve_for_model("cudnn", cuda, config) == "cudnn"
    monkeypatch.setattr(qa, "_varlen_available", lambda: False)  # no usable varlen: auto falls back to sdpa
    assert qa.resolve_for_model("auto", cuda, LlamaConfig(hidden_size=256, num_attention_heads=4), graphs=True) == "sdpa"
    monkeypatch.setattr(qa, "_varlen_available", lambda: True)
    assert qa._head_dim(LlamaConfig(hidden_size=512, num_attention_heads=4, head_dim=256)) == 256
    saved = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert qa._resolve("auto", cuda) == "varlen"
    finally:
        torch.use_deterministic_algorithms(saved)


def test_cuda_graphs_take_cudnn_only_with_the_frontend(monkeypatch):
    from qlora.config import load_config
    from qlora.speed import switches

    need = next(n for s in switches.SWITCHES if s.key == "cuda_graphs" for n in s.needs if "cudnn" in n.what)
    where = switches.Where(torch.device("cuda"))
    cfg = load_config([], attn_backend="cudnn", cuda_graphs=True)
    monkeypatch.setattr(qa, "cudnn_frontend", lambda: None)
    assert need.met(cfg, where) is False and "nvidia-cudnn-frontend" in need.what
    monkeypatch.setattr(qa, "cudnn_frontend", lambda: FakeFrontend())
    assert need.met(cfg, where) is True
    assert need.met(load_config([], attn_backend="flex", cuda_graphs=True), where) is False


def test_collate_flags_rows_that_hold_one_example():
    from qlora.data.examples import Example
    from qlora.training.packing import collate

    ex = [Example(input_ids=list(range(1, n + 1)), labels=list(range(1, n + 1))) for n in (5, 3, 7)]
    assert collate([[ex[0]], [ex[2]]], pad_id=0)["whole_rows"] is True  # padded to 8: tails, still whole
    assert collate([[ex[0], ex[1]], [ex[2]]], pad_id=0)["whole_rows"] is False


# ----------------------------------------------------------------------------- 4-bit NF4 (bitsandbytes)
# Measured on CPU (torch 2.13, bnb 0.50.2), packed vs unpacked, max over 5 model/data seeds:
#                       logits   token loss  LoRA grad (rel. to max |grad|)
#   fp32 model          1.7e-6   9.5e-7      3.9e-6
#   NF4, fp32 compute   1.2e-6   9.5e-7      4.2e-6   -> as exact as fp32: dequant is deterministic
#   NF4, bf16 compute   5.5e-4   1.8e-4      1.2e-3
#   leak (no isolation) >=0.57   >=0.13      >=1.1    (any of the above models)
# Why bf16 differs at all: packing only changes fp32 reduction order/shape (~1e-7), but the bf16 cast
# of each Linear4bit input/output turns such a difference into a whole bf16 ulp (2^-8 = 3.9e-3
# relative) wherever a value sits near a rounding boundary; a few such flips propagate. Tolerance
# for bf16 compute: 5e-3 on logits/loss (~10x the worst observed, ~1 bf16 ulp at unit scale) and
# 1e-2 on relative grads (~8x) - each still 25-100x below the smallest leak. fp32 compute: 1e-5.
@pytest.mark.parametrize("compute_dtype,tol,grad_tol", [(torch.float32, 1e-5, 1e-5),
                                                        (torch.bfloat16, 5e-3, 1e-2)])
def test_sdpa_packed_matches_unpacked_nf4(compute_dtype, tol, grad_tol):
    err = errors(make_model(quant_dtype=compute_dtype), "sdpa")
    print(f"nf4 compute={compute_dtype}: {err}")
    assert_close(err, tol, grad_tol)


# ----------------------------------------------------------------------------- helpers and errors
def test_packing_kwargs_shapes_and_values():
    pos = position_ids(LENS, T)
    assert pos[0].tolist() == list(range(7)) + list(range(13)) + list(range(4))
    kw = packing_kwargs(pos, "varlen")
    assert kw["cu_seq_lens_q"].tolist() == [0, 7, 20, 24, 25, 35, 40, 48] and kw["cu_seq_lens_q"].dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == 13 and isinstance(kw["max_length_q"], int)
    mask = packing_kwargs(pos, "sdpa")["attention_mask"]
    assert mask.shape == (2, 1, T, T) and mask.dtype == torch.bool
    doc = torch.tensor([0] * 7 + [1] * 13 + [2] * 4)
    expect = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expect)
    labels = mask_cross_example_labels(torch.arange(T).repeat(2, 1), pos)
    assert (labels[0] == -100).nonzero().flatten().tolist() == [0, 7, 20]


def test_errors():
    model = make_model()
    with pytest.raises(ValueError, match="unknown"):
        use_packed_attention(model, "flash")
    with pytest.raises(ValueError, match="CUDA"):
        use_packed_attention(model, "varlen")
    with pytest.raises(ValueError, match="unknown"):
        packing_kwargs(torch.zeros(1, 4, dtype=torch.long), "nope")
    assert use_packed_attention(model, "auto") == "sdpa"  # CPU
    with pytest.raises(ValueError, match="packing_kwargs"):  # packed model without its kwargs
        model(input_ids=torch.ones(1, 4, dtype=torch.long))
