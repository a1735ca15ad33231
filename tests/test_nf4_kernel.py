"""`nf4_kernel` and `lora_in_gemm` (qlora/speed/nf4_kernel.py, lora_fused.base_with_lora): the tiled Triton
kernel gives bitsandbytes' dequantised weight (run on the CPU by Triton's interpreter, in a subprocess because
the interpreter is chosen when a kernel is defined), also into rows of a wider buffer; the LoRA B product inside
the base GEMM gives the same outputs up to one rounding and the same gradients, alone and grouped, on every
path it composes with; both refuse what they cannot serve."""

import pytest
import torch

from qlora.config import ConfigError
from qlora.model.base import load_tokenizer
from qlora.model.trainable import describe_speedups
from qlora.speed import grouped, lora_fused, nf4_kernel
from qlora.speed.switches import Where, check_switches
from qlora.training.packing import collate

from conftest import tiny_cfg
from helpers import interpreted_json, nf4_weight, run_interpreted
from test_grouped import TOL, check_close, rel
from test_families import examples, family_dir
from test_rebuild import cfg_for, loss_grads_and_saved, sql_examples_tiny  # noqa: F401 (a fixture)

INTERPRETED = r"""
import json, torch
import bitsandbytes.functional as bnbf
from qlora.speed import grouped, lora_fused, nf4_kernel
assert nf4_kernel.runs_on(torch.empty(1)), "Triton's interpreter did not take CPU tensors"
torch.manual_seed(0)
rows = []
for dtype in (torch.float32, torch.bfloat16):
    for quant_type, blocksize, nested, n, k in (("nf4", 64, True, 100, 384), ("nf4", 128, False, 64, 256),
                                                ("fp4", 64, True, 70, 128)):
        w = (torch.randn(n, k) * 0.02).to(dtype)
        q, qs = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        weight = torch.nn.Parameter(q, requires_grad=False)
        weight.quant_state = qs
        want = lora_fused.dequantize(weight, False)  # bitsandbytes' kernel
        assert nf4_kernel.covers(weight, dtype)
        got = lora_fused.dequantize(weight, False, kernel=True)  # dispatched to the Triton kernel
        wide = torch.full((n, k + 24), 7.0, dtype=dtype)
        lora_fused.dequantize(weight, True, out=wide)  # rows k + 24 apart (the cached absmax, too)
        step = want.float().abs() * 2.0 ** -7  # one bf16 step: the interpreter casts by truncation
        rows.append({"case": f"{dtype} {quant_type} bs{blocksize} nested={nested} {n}x{k}",
                     "fp32": dtype == torch.float32,
                     "equal": torch.equal(got, want), "wide_equal": torch.equal(wide[:, :k], got),
                     "within_step": bool(((got.float() - want.float()).abs() <= step).all()),
                     "rest_untouched": bool((wide[:, k:] == 7.0).all()),
                     "is_kernel_output": got.data_ptr() != want.data_ptr()})
print(json.dumps(rows))
"""


def test_triton_kernel_gives_bitsandbytes_weight_in_interpreter():
    rows = interpreted_json(INTERPRETED)
    assert len(rows) == 6
    for r in rows:
        assert r["is_kernel_output"] and r["wide_equal"] and r["rest_untouched"], r
        # fp32: code * absmax in fp32 on both sides, bit for bit; bf16: within one step (truncation here,
        # round-to-nearest on the GPU, where benchmarks/check_fast_path_cuda.py asks for bit equality)
        assert r["equal"] if r["fp32"] else r["within_step"], r


def test_the_kernel_runs_only_where_triton_does():
    weight = nf4_weight(torch.randn(64, 128) * 0.02)
    assert not nf4_kernel.runs_on(torch.empty(1))  # the CPU outside the interpreter
    assert not nf4_kernel.covers(weight, torch.float32)
    plain = lora_fused.dequantize(weight, True)
    assert torch.equal(lora_fused.dequantize(weight, True, kernel=True), plain)  # bitsandbytes' kernel then
    wide = torch.full((64, 131), 3.0)
    lora_fused.dequantize(weight, True, out=wide)  # copied into the first columns
    assert torch.equal(wide[:, :128], plain) and bool((wide[:, 128:] == 3.0).all())


def _node(x, w, a, b, in_gemm, dropout=0.0, bias=None):
    return lora_fused.NF4LoRAFunction.apply(x, w, a, b, 3.0, dropout, True, None, 0, False, bias, None, False, in_gemm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_in_gemm_node_same_output_one_rounding_and_same_gradients(dtype):
    """One node: y = [x | h] [W | sB]^T against x W^T then + s h B^T. The gradients come from the same saved
    x and h, so they are bitwise those of the plain node; the output differs by rounding only, and in bf16 it is
    no further from the fp64 sum (rounded once instead of twice)."""
    torch.manual_seed(0)
    t, k, n, r = 40, 256, 192, 8
    w = nf4_weight((torch.randn(n, k) * 0.02).to(dtype))
    x = torch.randn(t, k, dtype=dtype, requires_grad=True)
    a = (torch.randn(r, k) * 0.05).requires_grad_()
    b = (torch.randn(n, r) * 0.05).requires_grad_()
    bias = torch.randn(n, dtype=dtype)
    g = torch.randn(t, n, dtype=dtype)
    y0 = _node(x, w, a, b, False, bias=bias)
    y1 = _node(x, w, a, b, True, bias=bias)
    for p, q in zip(torch.autograd.grad(y0, (x, a, b), g), torch.autograd.grad(y1, (x, a, b), g)):
        assert torch.equal(p, q)
    wd = lora_fused.dequantize(w, True).double()
    exact = x.double() @ wd.t() + 3.0 * (x.double() @ a.to(dtype).double().t()) @ b.to(dtype).double().t() \
        + bias.double()
    err0, err1 = (y0.double() - exact).abs().max(), (y1.double() - exact).abs().max()
    if dtype == torch.float32:  # measured 1.2e-7 of the largest output apart
        assert rel(y1, y0) <= 1e-6
    else:  # measured: the plain node 2 roundings (~4e-3 of max), this one 1; allow the same
        assert err1 <= err0 * 1.01, (err1, err0)


@pytest.mark.parametrize("kw", [dict(lora_dropout=0.0), dict(lora_dropout=0.1),
                                dict(lora_dropout=0.1, seeded_dropout=True),
                                dict(lora_dropout=0.0, group_projections=True),
                                dict(lora_dropout=0.1, group_projections=True, seeded_dropout=True),
                                dict(lora_dropout=0.0, group_projections=True, rebuild_inputs=True, recompute=True,
                                     recompute_layers=1)],
                         ids=["plain", "dropout", "seeded", "grouped", "grouped+seeded", "grouped+rebuild"])
def test_lora_in_gemm_trains_the_same_numbers(sql_examples_tiny, kw, monkeypatch):
    """The tiny model's loss and every LoRA gradient with the product inside the GEMM, against the separate
    update, through every composition (torch's dropout draws the same masks: the draws happen in the same order)."""
    groups = 10 if kw.get("group_projections") else 0
    calls = []

    def counted(x2, weights, *rest):
        calls.append(len(weights))
        return lora_fused.base_with_lora(x2, weights, *rest)
    monkeypatch.setattr(grouped, "base_with_lora", counted)
    monkeypatch.setattr(lora_fused.NF4LoRAFunction, "forward", _counting_forward(calls))
    model = check_close(cfg_for("random:tiny", **kw), cfg_for("random:tiny", lora_in_gemm=True, **kw),
                        sql_examples_tiny, groups=groups)
    fused = sum(bool(getattr(m, lora_fused.FUSED_ATTR, False)) for m in model.modules())
    assert fused == 14 and "LoRA B products inside the base GEMM in 14" in describe_speedups(model)
    # every projection's forward took the path: 2 layers x (q/k/v, gate/up as groups + o, down alone) or 14 alone
    per_step = [3, 2, 1, 1] * 2 if groups else [1] * 14
    assert sorted(calls[:len(per_step)]) == sorted(per_step), calls[:len(per_step)]


def _counting_forward(calls):
    forward = lora_fused.NF4LoRAFunction.forward

    def counted(ctx, *args):
        if len(args) > 13 and args[13]:  # in_gemm
            calls.append(1)
        return forward(ctx, *args)
    return staticmethod(counted)


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3"])
def test_lora_in_gemm_on_other_families(tmp_path, family):
    """Qwen2's frozen q/k/v bias (added after the GEMM), Gemma 3's GeGLU and q/k norms, Phi-3's fused qkv_proj and
    gate_up_proj (single nodes with wide outputs): the same numbers as the separate update, grouped where sets exist."""
    folder = str(family_dir(tmp_path, family))
    tok = load_tokenizer(tiny_cfg(model=folder))
    batch = collate([examples(tok)], tok.pad_token_id)
    groups = 0 if family == "phi3" else 10
    model = check_close(cfg_for(folder, group_projections=True), cfg_for(folder, group_projections=True,
                                                                         lora_in_gemm=True), batch, groups=groups)
    assert "LoRA B products inside the base GEMM in" in describe_speedups(model)


def test_lora_in_gemm_in_bf16_is_no_further_from_fp32(sql_examples_tiny):
    """In bf16 the one rounding of the sum changes roundings that later layers carry on; the LoRA gradients must be
    no further from the fp32 ones than the separate update's (a wrong column or scale would be of order 1).
    Measured (2-core AVX512-BF16 CPU): largest relative error 0.1228 with the product inside the GEMM, 0.1405 without."""
    _, _, ref, _ = loss_grads_and_saved(cfg_for("random:tiny", group_projections=True), sql_examples_tiny)
    errs = []
    for on in (False, True):
        _, _, got, _ = loss_grads_and_saved(cfg_for("random:tiny", group_projections=True, compute_dtype="bfloat16",
                                                    lora_in_gemm=on), sql_examples_tiny)
        errs.append(max(rel(got[n].float(), ref[n]) for n in ref))
    assert errs[1] <= 1.1 * errs[0], errs


@pytest.mark.parametrize("change, where, why", [
    (dict(nf4_kernel=True), Where(torch.device("cpu")), "needs a CUDA device with Triton"),
    (dict(nf4_kernel=True, fused_lora=False), Where(torch.device("cpu")), "needs fused_lora true"),
    (dict(lora_in_gemm=True, base_fp8=True), Where(torch.device("cpu")), "'lora_in_gemm' = True needs base_fp8 false"),
    (dict(lora_in_gemm=True, fused_lora=False), Where(torch.device("cpu")), "needs fused_lora true"),
])
def test_refuses_what_it_cannot_serve(change, where, why):
    with pytest.raises(ConfigError, match=why):
        check_switches(tiny_cfg(**change), where)


@pytest.mark.slow
def test_train_py_with_both_switches_in_the_interpreter(tmp_path):
    """train.py as a user runs it, `--nf4_kernel true --lora_in_gemm true` with grouped projections, its Triton
    kernels run by the interpreter: the start-up line names both, and the losses are those of the run without
    them (fp32: the same weights, the LoRA sums rounded once instead of twice, ce_kernel in the interpreter against
    torch ops in the plain run: step 1 bitwise equal, step 2 measured 9e-8 apart relative; bound 1e-5)."""
    import json

    import train
    from qlora.config import load_config

    argv = ["--model", "random:tiny", "--quant", "nf4", "--max_steps", "2", "--save_every", "0", "--eval_every", "0",
            "--sample_prompts", "0", "--grad_accum", "1", "--group_projections", "true", "--lr", "1e-2", "--tracker",
            "none", "--max_seq_len", "256", "--lora_dropout", "0", "--compute_dtype", "float32"]
    out = run_interpreted("train.py", *argv, "--output_dir", str(tmp_path / "on"), "--nf4_kernel", "true",
                          "--lora_in_gemm", "true", with_stderr=True)
    assert "4-bit weights dequantised by the Triton kernel in 14, LoRA B products inside the base GEMM in 14" in out
    train.main(load_config([*argv, "--output_dir", str(tmp_path / "off")]))

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    on, off = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert len(on) == len(off) == 2 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(on, off)), (on, off)
