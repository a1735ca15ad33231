#!/usr/bin/env python
"""Check on CUDA that packed attention (qlora/speed/attention.py) equals running each example alone.

    python benchmarks/check_packing_cuda.py                              # the GPU check, no arguments
    python benchmarks/check_packing_cuda.py --device cpu --backends sdpa --tiny   # CPU smoke test

A small random Llama (hidden 1024, 4 layers, 16 heads, 4 kv heads) with LoRA on every linear runs
examples of 50-1500 tokens (a) one at a time, batch 1, stock transformers attention, and (b) packed
into 2048-token rows with each packed backend. Per backend it prints the max error of the logits at
real positions (relative to max |logit|), of the per-token losses (nats) and of the LoRA gradients of
the summed loss (per tensor, relative to its max |grad|), and PASS/FAIL against the tolerances below.
Extra rows: fp32 (the noise floor of the comparison itself), "bf16 vs fp32" (the error bf16 alone
makes, unpacked, for scale), each backend under non-reentrant gradient checkpointing, a no-isolation
control that must FAIL (else the check has no teeth), and NF4 4-bit rows when bitsandbytes works.
Exit status 1 on any FAIL. Nothing is downloaded.
"""

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402

from qlora.speed.attention import (  # noqa: E402
          mask_cross_example_labels,
          packing_kwargs,
          use_default_attention,
          use_packed_attention,
      )

# Tolerances (logits: max |diff| / max |logit|; loss: max |diff| in nats; grad: per tensor
# max |diff| / max |grad|). bf16: packed and unpacked runs use different kernels and GEMM shapes, so
# bf16 rounding (2^-8 = 3.9e-3 relative per op) lands differently. Measured on an H100 (torch 2.11),
# worst over seeds 0-3 and all backends incl. NF4: logits 2.0e-2, loss 4.3e-2 (about one bf16 ulp
# of a logit near 8), grad 3.2e-2; what bf16 itself costs vs fp32, unpacked, was >= 0.10 / 0.22 / 0.11,
# and the no-isolation control >= 1.35 / 2.9 / 1.0. The bounds are ~2x the worst packed error and
# about half the bf16-vs-fp32 error. fp32 (TF32 off): measured <= 8.6e-6 everywhere.
TOL = {
    torch.bfloat16: {"logits": 5e-2, "loss": 1e-1, "grad": 7e-2},
    torch.float32: {"logits": 1e-4, "loss": 1e-4, "grad": 1e-4},
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backends", default="varlen,flex,sdpa", help="comma-separated: varlen, flex, sdpa, auto")
    p.add_argument("--tiny", action="store_true", help="small model and rows, for a quick CPU run")
    p.add_argument("--no-4bit", action="store_true", help="skip the NF4 rows even if bitsandbytes exists")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def model_config(tiny):
    if tiny:
        return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    return LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                       num_key_value_heads=4, vocab_size=8192, max_position_embeddings=4096)


def build_model(args, dtype, nf4=False, ckpt=False):
    """Same seed -> same weights for every row; LoRA B random (not zero) so every A has a gradient."""
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(args.tiny)).to(dtype)
    if nf4:
        import bitsandbytes as bnb

        for layer in model.model.layers:
            for parent in (layer.self_attn, layer.mlp):
                for name, lin in list(parent.named_children()):
                    if name in TARGETS:
                        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=dtype,
                                              quant_type="nf4")
                        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
                        setattr(parent, name, q)
    model = model.to(args.device)  # quantizes the NF4 weights
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(model, lora).eval()  # adapters stay fp32 (peft's default), as in QLoRA
    if ckpt:  # the packing kwargs must survive the recomputation in backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # checkpointing only engages in train mode; every dropout here is 0
    return model


def make_data(args):
    """Random examples, first-fit-decreasing packed into rows of T tokens (tails are padding)."""
    g = torch.Generator().manual_seed(args.seed)
    T, lo, hi, n = (256, 10, 150, 8) if args.tiny else (2048, 50, 1500, 10)
    vocab = model_config(args.tiny).vocab_size
    lens = [int(x) for x in torch.randint(lo, hi + 1, (n,), generator=g)]
    examples = [torch.randint(1, vocab, (k,), generator=g) for k in lens]
    rows: list[list[int]] = []  # example indices per row
    for i in sorted(range(n), key=lambda i: -lens[i]):
        row = next((r for r in rows if sum(lens[j] for j in r) + lens[i] <= T), None)
        if row is None:
            rows.append(row := [])
        row.append(i)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    pos = torch.zeros(len(rows), T, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    spans = {}  # example index -> (row, start)
    for r, row in enumerate(rows):
        s = 0
        for i in row:
            ids[r, s:s + lens[i]], labels[r, s:s + lens[i]] = examples[i], examples[i]
            pos[r, s:s + lens[i]] = torch.arange(lens[i])
            spans[i], s = (r, s), s + lens[i]
        pos[r, s:] = torch.arange(T - s)  # the padding pseudo-example
    return examples, ids, pos, mask_cross_example_labels(labels, pos), spans


def token_losses(logits, labels):
    return F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), labels[..., 1:].flatten(),
                           reduction="none", ignore_index=-100).view(labels[..., 1:].shape)


def lora_grads(model):
    return {n: p.grad.float().clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def run_unpacked(model, examples, device):
    use_default_attention(model)
    model.zero_grad(set_to_none=True)
    logits, losses = [], []
    for x in examples:
        x = x.to(device)
        lg = model(input_ids=x[None], use_cache=False).logits[0]
        ls = token_losses(lg, x)
        ls.sum().backward()
        logits.append(lg.detach().float())
        losses.append(ls.detach())
    return logits, losses, lora_grads(model)


def run_packed(model, ids, pos, labels, kwargs, device):
    model.zero_grad(set_to_none=True)
    ids, pos, labels = ids.to(device), pos.to(device), labels.to(device)
    logits = model(input_ids=ids, position_ids=pos, **kwargs).logits
    ls = token_losses(logits, labels)
    ls.sum().backward()
    return logits.detach().float(), ls.detach(), lora_grads(model)


def compare(ref, got, spans, examples):
    (lu, su, gu), (lp, sp, gp) = ref, got
    err = {"logits": 0.0, "loss": 0.0, "grad": 0.0}
    scale = max(x.abs().max().item() for x in lu)
    for i, (r, s) in spans.items():
        n = len(examples[i])
        err["logits"] = max(err["logits"], (lp[r, s:s + n] - lu[i]).abs().max().item() / scale)
        err["loss"] = max(err["loss"], (sp[r, s:s + n - 1] - su[i]).abs().max().item())
    assert gu.keys() == gp.keys() and gu, "LoRA gradients missing"
    err["grad"] = max(((gp[k] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for k, g in gu.items())
    return err


def plain_causal(module, q, k, v, attention_mask, dropout=0.0, scaling=None, **kw):
    """The no-isolation control: causal attention across the whole packed row."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling).transpose(1, 2).contiguous(), None


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            sys.exit("CUDA is not available; for a CPU smoke test use --device cpu --backends sdpa --tiny")
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows must be real fp32
        torch.backends.cudnn.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name(device)}")
    import peft
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    try:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        print(f"varlen_attn{inspect.signature(varlen_attn)}")
    except ImportError:
        print("torch.nn.attention.varlen: not available")
    try:
        import bitsandbytes

        have_bnb = not args.no_4bit
        print(f"bitsandbytes {bitsandbytes.__version__}")
    except Exception as e:  # absent or broken install: the 4-bit rows are optional
        have_bnb = False
        print(f"bitsandbytes not usable ({type(e).__name__}): NF4 rows skipped")
    AttentionInterface.register("check_plain_causal", plain_causal)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    examples, ids, pos, labels, spans = make_data(args)
    print(f"{len(examples)} examples, lengths {[len(x) for x in examples]}, packed into {ids.shape[0]} rows "
          f"of {ids.shape[1]} tokens ({(labels != -100).sum().item()} targets)\n")

    rows = []  # (name, dtype, err, expect_pass)

    def check(name, dtype, nf4, backend, ref=None, ckpt=False):
        model = build_model(args, dtype, nf4, ckpt)
        ref = ref or run_unpacked(model, examples, device)
        if backend == "control":
            model.get_base_model().set_attn_implementation("check_plain_causal")
            kwargs = {"use_cache": False}
        else:
            resolved = use_packed_attention(model, backend)
            kwargs = packing_kwargs(pos, resolved, device=device)
            name = name.replace("auto", f"auto->{resolved}")
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = run_packed(model, ids, pos, labels, kwargs, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"  ran {name} (packed fwd+bwd incl. any compile: {time.perf_counter() - t:.1f}s)", flush=True)
        rows.append((name, dtype, compare(ref, got, spans, examples), backend != "control"))
        del model
        return ref

    ref16 = None
    for b in backends:
        ref16 = check(f"{b} bf16", torch.bfloat16, False, b, ref16)
    ref32 = check("sdpa fp32 (reference)", torch.float32, False, "sdpa")
    # What bf16 itself costs, unpacked (for scale only; not a pass/fail row).
    bf_vs_32 = {"logits": max((a - b).abs().max().item() for a, b in zip(ref16[0], ref32[0]))
                / max(x.abs().max().item() for x in ref32[0]),
                "loss": max((a - b).abs().max().item() for a, b in zip(ref16[1], ref32[1])),
                "grad": max(((ref16[2][k] - g).abs().max() / g.abs().max()).item() for k, g in ref32[2].items())}
    for b in backends:
        check(f"{b} bf16 +grad ckpt", torch.bfloat16, False, b, ref16, ckpt=True)
    check("no isolation (control)", torch.bfloat16, False, "control", ref16)
    if have_bnb:
        ref4 = None
        for b in backends:
            ref4 = check(f"{b} bf16 NF4", torch.bfloat16, True, b, ref4)

    print(f"\n{'backend':<26}{'logits rel':>12}{'loss abs':>12}{'grad rel':>12}   result")
    print(f"{'bf16 vs fp32 (unpacked)':<26}{bf_vs_32['logits']:>12.2e}{bf_vs_32['loss']:>12.2e}"
          f"{bf_vs_32['grad']:>12.2e}   (scale of bf16 error, info)")
    failed = False
    for name, dtype, err, expect_pass in rows:
        tol = TOL[dtype]
        ok = all(err[k] <= tol[k] for k in tol)
        if expect_pass:
            result = "PASS" if ok else "FAIL"
            failed |= not ok
        else:  # the control must exceed the tolerances, else this check could not catch a leak
            result = "FAIL (expected: leaks)" if not ok else "PASS?! control did not leak: check is blind"
            failed |= ok
        print(f"{name:<26}{err['logits']:>12.2e}{err['loss']:>12.2e}{err['grad']:>12.2e}   {result}")
    for dtype, tol in TOL.items():
        print(f"tolerance {str(dtype).removeprefix('torch.')}: " + ", ".join(f"{k} {v:g}" for k, v in tol.items()))
    print("\nFAILED" if failed else "\nALL PASSED")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
