"""The speed levers behind config keys, checked on the CPU against the plain path they replace:
seeded LoRA dropout, the fused linear + cross-entropy, offloaded checkpoints, and the static-shape
inputs that the CUDA-graph step replays (the graph itself needs a GPU: benchmarks/check_fast_path_cuda.py)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from qlora.speed import attention, seeded_dropout
from qlora.training.loss import LinearCrossEntropy, TokenLoss
from qlora.model.trainable import load_model
from qlora.training.packing import collate, model_inputs

from conftest import tiny_cfg
from helpers import grads_of, interpreted_json, randomise_lora_


@pytest.fixture(scope="module")
def sql_examples(tok):
    from qlora.data.examples import load_datasets

    return load_datasets(["builtin:sql"], tok, 256, "drop", 0.0, seed=0)[0]


def test_seeded_mask_rate_and_determinism():
    seed = seeded_dropout.new_seed(3, "cpu")
    n = 1 << 20
    keep = seeded_dropout.keep_mask((n,), seed, 1, 0.05)
    # binomial: sd of the kept fraction is sqrt(p(1-p)/n) = 2.1e-4; 5 sd
    assert abs(keep.float().mean().item() - 0.95) < 5 * (0.05 * 0.95 / n) ** 0.5
    assert torch.equal(keep, seeded_dropout.keep_mask((n,), seed, 1, 0.05))  # a function of its arguments
    assert not torch.equal(keep, seeded_dropout.keep_mask((n,), seed, 2, 0.05))  # salts differ
    seed.add_(1)
    other = seeded_dropout.keep_mask((n,), seed, 1, 0.05)
    assert (keep != other).float().mean() > 0.05  # a new micro-batch: a new mask (~2p(1-p) differ)
    x = torch.randn(64, 32)
    y = seeded_dropout.apply(x, seed, 1, 0.25)
    kept = seeded_dropout.keep_mask(x.shape, seed, 1, 0.25)
    assert torch.equal(y, torch.where(kept, x * (1 / 0.75), torch.zeros(())))


DROPOUT_KERNEL = r"""
import json, torch
from qlora.speed import seeded_dropout as sd
out = []
for shape, dtype, salt, p in (((333, 77), torch.float32, 3, 0.05), ((64, 4100), torch.bfloat16, 11, 0.25)):
    x = torch.randn(shape).to(dtype)
    seed = sd.new_seed(7, "cpu")
    got = sd._apply_triton(x, seed, salt, p)  # the CUDA path's kernel, here in Triton's interpreter
    want = sd.apply(x, seed, salt, p)
    step = (want.float().abs() * 2.0 ** -7).clamp(min=1e-30)  # one bf16 step
    out.append(dict(dtype=str(dtype), same_mask=bool(torch.equal(got == 0, want == 0)),
                    same=bool(torch.equal(got, want)), within_step=bool(((got.float() - want.float()).abs() <= step).all())))
print(json.dumps(out))
"""


def test_seeded_dropout_triton_kernel_drops_the_torch_mask():
    """The Triton kernel (run by Triton's interpreter on the CPU) drops exactly the elements of the torch
    reference, with a partial last block (333 x 77 is not a multiple of 2,048). In fp32 the kept values are
    bit-identical; in bf16 within one bf16 step, because the interpreter casts fp32 to bf16 by truncation
    (measured: -1.4583 -> -1.4531 where round-to-nearest gives -1.4609). On the GPU the kernel is bit-identical
    in bf16 too (benchmarks/check_fast_path_cuda.py)."""
    fp32, bf16 = interpreted_json(DROPOUT_KERNEL)
    assert fp32["same_mask"] and fp32["same"], fp32
    assert bf16["same_mask"] and bf16["within_step"], bf16


def _train_grads(examples, **kw):
    model = load_model(tiny_cfg(quant="nf4", lora_dropout=0.2, **kw), torch.device("cpu"))
    randomise_lora_(model)
    from qlora.speed.lora_fused import dropout_seed
    lm = TokenLoss(model, "plain", dropout_seed(model))
    backend = attention.use_packed_attention(model, "sdpa")
    batches = [collate([[e] for e in examples[i:i + 2]], 0) for i in (0, 2)]
    return grads_of(lm, batches, backend), dropout_seed(model)


def test_seeded_dropout_recompute_and_advance(sql_examples):
    """With checkpointing the recompute draws the very masks of the forward (no RNG state is kept):
    gradients equal a run without checkpointing; the seed advances once per micro-batch."""
    g_ckpt, seed = _train_grads(sql_examples, seeded_dropout=True, recompute=True)
    g_full, _ = _train_grads(sql_examples, seeded_dropout=True, recompute=False)
    assert int(seed) == 42 * 1_000_003 + 2  # two micro-batches
    for n in g_full:
        assert g_full[n].abs().max() > 0
        torch.testing.assert_close(g_ckpt[n], g_full[n], rtol=1e-5, atol=1e-7, msg=n)
    g_torch, none = _train_grads(sql_examples, seeded_dropout=False, recompute=False)
    assert none is None
    assert max((g_torch[n] - g_full[n]).abs().max() for n in g_full) > 1e-4  # other masks: the flag matters


@pytest.mark.parametrize("softcap", [0.0, 3.0])
@pytest.mark.parametrize("budget", [None, 257 * 700], ids=["4096-row chunks", "~700-row chunks"])
def test_linear_cross_entropy_matches_plain_ce(softcap, budget, monkeypatch):
    """Against torch's autograd through the logits (soft-capped as Gemma 2's head does: c tanh(x / c)),
    in chunks of CHUNK positions and in the smaller chunks a large vocabulary gets (a ragged last one)."""
    from qlora.training import loss as loss_mod

    if budget:
        monkeypatch.setattr(loss_mod, "CE_CHUNK_ELEMENTS", budget)
        assert loss_mod.chunk_rows(257, 4096, 2 if softcap else 1) in (350, 700)
    torch.manual_seed(0)
    h = torch.randn(5000, 48, requires_grad=True)
    w = torch.randn(257, 48) * 0.3
    y = torch.randint(0, 257, (5000,))
    y[::5] = -100
    got = LinearCrossEntropy.apply(h, w, y, softcap)
    (2.5 * got).backward()
    g = h.grad.clone()
    h.grad = None
    logits = h @ w.t()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
        assert logits.abs().max() > 0.9 * softcap  # the cap bends real logits here
    want = F.cross_entropy(logits, y, reduction="sum")
    (2.5 * want).backward()
    # fp32 sums over 4000 positions in another order: relative 1e-6
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    torch.testing.assert_close(g, h.grad, rtol=1e-5, atol=1e-6)
    if softcap:  # the cap's slope matters: without it the gradient is another one
        uncapped = LinearCrossEntropy.apply(h.detach().requires_grad_(), w, y, 0.0)
        assert abs(uncapped.item() - got.item()) > 1e-2 * got.item()


def test_the_trained_loss_keeps_no_vocab_sized_tensor():
    """train.py's TokenLoss (ce fused) keeps nothing of size positions x vocab for backward; the plain
    loop keeps the fp32 log-probabilities (and, under a soft-cap, more). 2,000 positions, 32k vocab."""
    from torch import nn

    torch.manual_seed(0)
    vocab, hidden, n = 32_000, 64, 2_000

    class Head(nn.Module):  # the shape TokenLoss reads: .model (backbone), .lm_head, .config
        def __init__(self, softcap):
            super().__init__()
            self.emb = nn.Embedding(vocab, hidden)
            self.lm_head = nn.Linear(hidden, vocab, bias=False).requires_grad_(False)
            self.config = SimpleNamespace(final_logit_softcapping=softcap)
            self.model = lambda input_ids, position_ids: SimpleNamespace(last_hidden_state=self.emb(input_ids))

    ids = torch.randint(0, vocab, (1, n))
    targets, sup = torch.randint(0, vocab, (1, n)), torch.arange(n)
    for softcap in (None, 30.0):
        saved = {}
        for ce in ("plain", "fused"):
            torch.manual_seed(1)
            model = Head(softcap)
            biggest = []

            def pack(t):
                biggest.append(t.numel())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = TokenLoss(model, ce)(ids, None, targets, sup)
            loss.backward()
            saved[ce] = ((max(biggest), sum(biggest)), float(loss.detach()), model.emb.weight.grad.clone())
        # plain: the fp32 log-probabilities of every chunk, n x vocab in all; fused: nothing larger than the
        # gradient of the hidden states (n x hidden), and in all a small part of n x vocab
        assert saved["plain"][0][1] >= n * vocab
        assert saved["fused"][0][0] <= n * hidden and saved["fused"][0][1] < n * vocab / 100
        assert saved["fused"][1] == pytest.approx(saved["plain"][1], rel=1e-6)
        torch.testing.assert_close(saved["fused"][2], saved["plain"][2], rtol=1e-4, atol=1e-6)


def test_offloaded_checkpoints_give_the_same_gradients(sql_examples):
    plain, _ = _train_grads(sql_examples, recompute=True)
    off, _ = _train_grads(sql_examples, recompute=True, offload_recompute=True)
    assert plain.keys() == off.keys()
    for n in plain:  # layer 0's adapters included: its input (frozen embeddings) does not require grad
        assert off[n].abs().max() > 0, n
        torch.testing.assert_close(off[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_graph_inputs_pad_to_static_shapes_without_changing_the_loss(sql_examples):
    """The CUDA-graph step feeds fixed-shape buffers: rows padded to max_seq_len, every position in the
    supervised index (padding points at a -100 target), cu_seqlens padded. The same loss and gradients."""
    from qlora.speed.cuda_graphs import padded_inputs

    model = load_model(tiny_cfg(quant="nf4"), torch.device("cpu"))
    randomise_lora_(model)
    backend = attention.use_packed_attention(model, "sdpa")
    lm = TokenLoss(model)
    batch = collate([[sql_examples[0]], [sql_examples[1], sql_examples[2]]], 0)
    assert batch["input_ids"].shape[1] < 640
    host = padded_inputs(batch, backend, 640, 2, 0)
    assert host["input_ids"].shape == (2, 640) and host["sup_index"].numel() == 1280
    kw = attention.packing_kwargs(batch["position_ids"], backend)
    want = lm(batch["input_ids"], batch["position_ids"], batch["targets"], batch["sup_index"], **kw)
    want.backward()
    g_want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    got = lm(host["input_ids"], host["position_ids"], host["targets"], host["sup_index"], use_cache=False,
             attention_mask=host["mask"])
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for n, p in model.named_parameters():
        if p.requires_grad:  # fp32, other matmul shapes: other summation orders (measured ~1e-6 relative)
            assert (p.grad - g_want[n]).norm() <= 1e-5 * g_want[n].norm(), n
    cu = padded_inputs(batch, "varlen", 640, 2, 0)["cu"]
    assert cu[0] == 0 and cu[-1] == 1280 and (cu[1:] >= cu[:-1]).all()
    # cudnn: the same packed inputs, and whether every row holds one example (then the graph runs dense rows)
    host = padded_inputs(batch, "cudnn", 640, 2, 0)
    assert torch.equal(host["cu"], cu) and host["whole_rows"] is False
    one_each = collate([[sql_examples[0]], [sql_examples[1]]], 0)
    assert padded_inputs(one_each, "cudnn", 640, 2, 0)["whole_rows"] is True
    assert padded_inputs(one_each, "varlen", 640, 2, 0)["whole_rows"] is False


class _FakeGraph:
    """A CUDA graph stand-in on the CPU: the capture records the step instead of running it; each replay runs it
    and writes its loss into the captured output tensor, as a real replay refreshes it."""
    capturing = None

    def __init__(self):
        self.step, self.replays = None, 0

    def replay(self):
        self.replays += 1
        out, fresh = self.step()
        out.copy_(fresh)


def test_graph_recapture_keeps_the_window_and_goes_dense_to_packed_once(monkeypatch, sql_examples):
    """`GraphedForwardBackward`'s state machine with attn_backend cudnn (cuDNN's frontend, a CPU stand-in), the
    CUDA graph faked: a window of whole-row, whole-row, packed, whole-row micro-batches captures dense rows, then
    captures once more for packed rows (mid-window) and stays packed; the window's accumulated gradients equal
    the eager step's, i.e. the recapture loses none of the earlier micro-batches."""
    import contextlib

    import train
    from helpers import FakeFrontend
    from qlora.speed import cuda_graphs

    fe = FakeFrontend()
    monkeypatch.setattr(attention, "cudnn_frontend", lambda: fe)
    monkeypatch.setattr(attention, "_resolve", lambda backend, device: backend)
    graphs = []

    @contextlib.contextmanager
    def capture(g):
        graphs.append(g)
        _FakeGraph.capturing = g
        try:
            yield
        finally:
            _FakeGraph.capturing = None

    real_run = cuda_graphs.GraphedForwardBackward._run

    def run(self, token_loss):
        g = _FakeGraph.capturing
        if g is None:
            return real_run(self, token_loss)
        out = torch.zeros(())
        g.step = lambda: (out, real_run(self, token_loss))
        return out

    class Stream:
        def wait_stream(self, other):
            pass

    for name, value in {"CUDAGraph": _FakeGraph, "graph": capture, "Stream": Stream, "current_stream": Stream,
                        "stream": lambda s: contextlib.nullcontext(), "synchronize": lambda: None,
                        "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: t)
    monkeypatch.setattr(cuda_graphs.GraphedForwardBackward, "_run", run)

    ex = sql_examples
    window = [collate([[ex[0]], [ex[1]]], 0), collate([[ex[2]], [ex[3]]], 0),
              collate([[ex[4], ex[5]], [ex[6]]], 0), collate([[ex[7]], [ex[8]]], 0)]
    assert [b["whole_rows"] for b in window] == [True, True, False, True]
    model = load_model(tiny_cfg(quant="nf4"), torch.device("cpu"))
    randomise_lora_(model)
    backend = attention.use_packed_attention(model, "cudnn")
    lm = TokenLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    scale = torch.tensor(1.0 / sum(b["n_supervised"] for b in window))
    for b in window:  # the eager window
        (train.micro_batch_loss(lm, {k: v for k, v in model_inputs(b, backend, torch.device("cpu")).items()}) * scale).backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    acc = SimpleNamespace(unwrap_model=lambda m: m, device=torch.device("cpu"))
    fb = cuda_graphs.GraphedForwardBackward(params, 640, 2, 0, torch.float32, train.micro_batch_loss, say=lambda m: None)
    modes = []
    for b in window:
        fb(acc, lm, b, backend, scale)
        modes.append((len(graphs), fb.dense, fb.attn["whole_rows"]))
    assert modes == [(1, True, True), (1, True, True), (2, False, False), (2, False, False)]
    assert [g.replays for g in graphs] == [2, 2]
    assert {c[0] for c in fe.calls} == {"dense", "packed"}
    for p, w in zip(params, want):  # fp32, rows padded to 640 on one side: measured <= 2.1e-7 of the largest entry
        assert (p.grad - w).abs().max() <= 1e-5 * w.abs().max(), "a recapture lost gradients of the window"


@pytest.mark.parametrize("change,why", [({"attn_backend": "flex"}, "flex builds its block mask"),
                                        ({"attn_backend": "cudnn"}, "fails inside a capture"),
                                        ({"offload_recompute": True}, "host copies cannot be captured"),
                                        ({"fused_lora": False}, "seeded dropout lives in the fused node")])
def test_cuda_graphs_refuses_what_cannot_be_captured(change, why, monkeypatch):
    """The refusals that need a CUDA device to be reached (the switch table's validator, told it runs on
    one GPU; cudnn as without cuDNN's frontend installed)."""
    from qlora.config import ConfigError, load_config
    from qlora.speed.switches import Where, check_switches

    monkeypatch.setattr(attention, "cudnn_frontend", lambda: None)
    gpu = Where(torch.device("cuda"))
    check_switches(load_config([], cuda_graphs=True, seeded_dropout=True), gpu)  # the plain case passes
    with pytest.raises(ConfigError, match=f"'cuda_graphs' = True needs .*{why}"):
        check_switches(load_config([], cuda_graphs=True, **change), gpu)
    with pytest.raises(ConfigError, match="'cuda_graphs' = True needs one process"):
        check_switches(load_config([], cuda_graphs=True), Where(torch.device("cuda"), processes=2))


def test_cuda_graph_capture_errors_tell_out_of_memory_from_uncapturable():
    """A capture that ran out of GPU memory (other processes on the card, measured on an H100 with 12 lanes at
    once) must not be reported as a step that cannot be captured."""
    import torch

    from qlora.speed.cuda_graphs import capture_error

    oom = capture_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert "ran out of memory" in oom and "cannot be captured" not in oom and "--cuda_graphs false" in oom
    oom2 = capture_error(RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be ..."))
    assert "ran out of memory" in oom2 and "\n" not in oom2
    sync = capture_error(RuntimeError("CUDA error: operation not permitted when stream is capturing"))
    assert "cannot be captured" in sync and "host sync" in sync and "out of memory" not in sync
