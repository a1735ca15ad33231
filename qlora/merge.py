"""Merge a QLoRA adapter into its base and export a plain model directory (no peft, no bitsandbytes).

    python -m qlora.merge --adapter runs/default/final --out runs/default/merged
    python -m qlora.merge --adapter runs/default/final --out merged-bf16 --dtype bfloat16

The adapter was trained against the *NF4-quantised* base, so that is what it is merged into: the base is
loaded in 4-bit exactly as in training, every bitsandbytes `Linear4bit` weight is dequantised
(`bitsandbytes.functional.dequantize_4bit`) into a plain `nn.Linear` of a fresh full-precision model,
and the LoRA is merged with peft's `merge_and_unload`. (Merging into the original full-precision weights
instead would add the adapter to weights it never saw: the NF4 rounding error would come back.)

The result (`model.safetensors`, `config.json`, tokenizer, the run's `config.yaml`) loads with
`AutoModelForCausalLM.from_pretrained(out)`. The merge is checked against the 4-bit base + adapter on
held-out rows: max/mean logit difference and the eval loss of both, printed and written to
`out/merge_report.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, load_config, save_config
from .data import DataError
from .model import ModelLoadError, load_base_model, load_tokenizer, resolve_compute_dtype


def _is_4bit(module) -> bool:
    try:
        import bitsandbytes as bnb
    except ImportError:
        return False
    return isinstance(module, bnb.nn.Linear4bit)


def dequantized_state_dict(model, dtype: torch.dtype) -> dict:
    """State dict of a (partly) 4-bit model with every `Linear4bit` weight dequantised to `dtype`.

    bitsandbytes keeps packed weights plus `quant_state` entries in the state dict; those are replaced
    by the plain `<module>.weight` the dequantised Linear would have."""
    from bitsandbytes.functional import dequantize_4bit

    out = {}
    q_prefixes = []
    for name, module in model.named_modules():
        if _is_4bit(module):
            w = module.weight
            out[f"{name}.weight"] = dequantize_4bit(w.data, w.quant_state).to(dtype).reshape(
                module.out_features, module.in_features).contiguous()
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.data.to(dtype).clone()
            q_prefixes.append(name + ".")
    for key, value in model.state_dict().items():
        if any(key.startswith(p) for p in q_prefixes):
            continue  # packed 4-bit data and its quant-state entries
        out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def dequantized_model(model, dtype: torch.dtype):
    """A fresh plain `*ForCausalLM` (same config minus any quantization_config) holding the dequantised
    weights of `model`. `model` is left untouched (it stays the 4-bit reference)."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    config.use_cache = True
    device = next(model.parameters()).device
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # built for real (not on meta): non-persistent buffers such as rotary inv_freq must exist
        with torch.device(device):
            plain = type(model)(config)
    finally:
        torch.set_default_dtype(default)
    state = dequantized_state_dict(model, dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"dequantised weights do not fit a plain {type(model).__name__}: "
                             f"missing {missing[:3]} unexpected {unexpected[:3]}")
    if tied:
        plain.tie_weights()
    leftovers = [n for n, m in plain.named_modules() if _is_4bit(m)]
    assert not leftovers, leftovers
    plain.requires_grad_(False)
    return plain.eval()


def merge(adapter: str, out: str, dtype: str = "auto", device=None, check_rows: int = 8,
          check_data: str = "builtin:sql", progress: bool = True) -> dict:
    """Dequantise + merge + save; returns the merge report (also written to out/merge_report.json)."""
    from peft import PeftModel

    adapter_path = Path(adapter)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # 1. the 4-bit base exactly as in training (config, tokenizer and base as qlora.evaluate loads them)
    if not (adapter_path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    preset = adapter_path / "config.yaml"
    cfg = load_config(["--config", str(preset)] if preset.is_file() else [])
    if cfg.quant == "none":
        raise ConfigError(f"{adapter}: the run used quant=none; there is nothing to dequantise "
                          "(merge with peft's merge_and_unload directly)")
    tokenizer = load_tokenizer(cfg)
    if (adapter_path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(adapter_path)
        tokenizer.padding_side = "right"
    base4 = load_base_model(cfg, device)
    merged_dtype = (resolve_compute_dtype("auto", device) if device.type == "cpu" else torch.bfloat16) \
        if dtype == "auto" else getattr(torch, dtype)
    # 2. dequantise the NF4 weights into a plain model (before peft wraps the 4-bit one in place)
    plain = dequantized_model(base4, merged_dtype)
    # the reference the merge must reproduce: 4-bit base + adapter, as at inference time
    ref = PeftModel.from_pretrained(base4, str(adapter_path)).eval()
    # 3. merge the adapter into the dequantised weights
    merged = PeftModel.from_pretrained(plain, str(adapter_path)).merge_and_unload()
    merged.eval()
    # 4. save a standard model directory (+ tokenizer + the run's config, for qlora.evaluate's chat format)
    out_path = Path(out)
    tmp = out_path.parent / f".tmp-{out_path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.config.use_cache = True
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    save_config(load_config([], **{**vars(cfg), "model": str(out_path), "quant": "none"}), tmp / "config.yaml")
    if out_path.exists():
        shutil.rmtree(out_path)
    tmp.rename(out_path)

    # 5. check: the merged model against the 4-bit base + adapter on held-out rows
    report = compare(ref, merged, tokenizer, cfg, check_data, check_rows)
    report.update({"adapter": str(adapter_path), "out": str(out_path), "base_model": cfg.model,
                   "base_quant": cfg.quant, "double_quant": cfg.double_quant,
                   "merged_dtype": str(merged_dtype).replace("torch.", "")})
    (out_path / "merge_report.json").write_text(json.dumps(report, indent=1))
    return report


@torch.no_grad()
def compare(ref, merged, tokenizer, cfg, data: str = "builtin:sql", n_rows: int = 8) -> dict:
    """Logit error of `merged` vs `ref` (full logits at every position of each row, unpadded) and the
    eval loss (response-only, as in training) of both on the same rows."""
    from . import attention
    from .evaluate import eval_loss, load_eval_rows, loss_examples

    rows, fmt = load_eval_rows(data, n_rows)
    examples = loss_examples(rows, fmt, tokenizer, cfg)
    dev_ref, dev_m = next(ref.parameters()).device, next(merged.parameters()).device
    for m in (ref, merged):
        attention.use_default_attention(m, "sdpa")
    max_err, abs_sum, count, agree, ref_abs = 0.0, 0.0, 0, 0, 0.0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        a = ref(input_ids=ids.to(dev_ref), use_cache=False).logits.float().cpu()[0]
        b = merged(input_ids=ids.to(dev_m), use_cache=False).logits.float().cpu()[0]
        d = (a - b).abs()
        max_err = max(max_err, float(d.max()))
        abs_sum += float(d.sum())
        count += d.numel()
        ref_abs = max(ref_abs, float(a.abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    positions = sum(len(e.input_ids) for e in examples)
    loss_ref, n_tok = eval_loss(ref, examples, tokenizer.pad_token_id, 8, cfg.max_seq_len)
    loss_m, _ = eval_loss(merged, examples, tokenizer.pad_token_id, 8, cfg.max_seq_len)
    return {"check_data": data, "check_rows": len(examples), "positions": positions, "supervised_tokens": n_tok,
            "max_abs_logit_error": max_err, "mean_abs_logit_error": abs_sum / max(count, 1),
            "max_abs_logit_ref": ref_abs, "argmax_agreement": agree / max(positions, 1),
            "eval_loss_4bit_plus_adapter": loss_ref, "eval_loss_merged": loss_m,
            "eval_loss_diff": loss_m - loss_ref}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="adapter folder written by train.py (e.g. runs/default/final)")
    ap.add_argument("--out", required=True, help="merged model directory to write (replaced if it exists)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="merged weights (auto: bf16 on CUDA; on CPU the fast one of bf16/fp32)")
    ap.add_argument("--check-data", default="builtin:sql", help="held-out rows for the logit/loss check")
    ap.add_argument("--check-rows", type=int, default=8)
    args = ap.parse_args(argv)
    try:
        report = merge(args.adapter, args.out, args.dtype, check_rows=args.check_rows, check_data=args.check_data)
    except (ConfigError, ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    print(f"merged model: {args.out} (AutoModelForCausalLM.from_pretrained loads it; report in merge_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
