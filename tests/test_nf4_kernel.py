"""`nf4_kernel` (qlora/speed/nf4_kernel.py): the tiled Triton kernel gives bitsandbytes' dequantised weight (run on
the CPU by Triton's interpreter, in a subprocess because the interpreter is chosen when a kernel is defined), also
into rows of a wider buffer; where Triton does not run, bitsandbytes' kernel does and the start-up line says so;
train.py with the kernel trains the same numbers."""

import pytest
import torch

from qlora.speed import lora_fused, nf4_kernel

from conftest import tiny_cfg
from helpers import interpreted_json, nf4_weight, run_interpreted

INTERPRETED = r"""
import json, torch
import bitsandbytes.functional as bnbf
from qlora.speed import lora_fused, nf4_kernel
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
        nf4_kernel.dequantize(weight, lora_fused.block_absmax(weight, True), wide)  # rows k + 24 apart
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


def test_where_triton_does_not_run_bitsandbytes_does_and_the_start_up_line_says_so():
    from qlora.model.trainable import describe_speedups, load_model

    weight = nf4_weight(torch.randn(64, 128) * 0.02)
    assert not nf4_kernel.runs_on(torch.empty(1))  # the CPU outside the interpreter
    assert not nf4_kernel.covers(weight, torch.float32)
    plain = lora_fused.dequantize(weight, True)
    assert torch.equal(lora_fused.dequantize(weight, True, kernel=True), plain)  # bitsandbytes' kernel then
    line = describe_speedups(load_model(tiny_cfg(quant="nf4"), torch.device("cpu")))  # nf4_kernel is on by default
    assert "4-bit weights dequantised by bitsandbytes' kernel (nf4_kernel: no Triton on this device)" in line, line
    line = describe_speedups(load_model(tiny_cfg(quant="nf4", nf4_kernel=False), torch.device("cpu")))
    assert "dequantised by" not in line, line


@pytest.mark.slow
def test_train_py_with_both_switches_in_the_interpreter(tmp_path):
    """train.py as a user runs it, with grouped projections and its Triton kernels run by the interpreter: the
    start-up line names the NF4 kernel, and the losses are those of the run with bitsandbytes' kernel (fp32: the
    same weights; ce_kernel in the interpreter against torch ops in the plain run: measured bitwise equal at step 1
    and 9e-8 apart at step 2, relative; bound 1e-5)."""
    import json

    import train
    from qlora.config import load_config

    argv = ["--model", "random:tiny", "--quant", "nf4", "--max_steps", "2", "--save_every", "0", "--eval_every", "0",
            "--sample_prompts", "0", "--grad_accum", "1", "--group_projections", "true", "--lr", "1e-2", "--tracker",
            "none", "--max_seq_len", "256", "--lora_dropout", "0", "--compute_dtype", "float32"]
    out = run_interpreted("train.py", *argv, "--output_dir", str(tmp_path / "on"), with_stderr=True)
    assert "4-bit weights dequantised by the Triton kernel in 14," in out
    train.main(load_config([*argv, "--output_dir", str(tmp_path / "off"), "--nf4_kernel", "false"]))

    def losses(run):
        return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    on, off = losses(tmp_path / "on"), losses(tmp_path / "off")
    assert len(on) == len(off) == 2 and all(abs(a - b) <= 1e-5 * abs(b) for a, b in zip(on, off)), (on, off)
