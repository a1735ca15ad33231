"""Merge a QLoRA adapter into its base and export a plain model directory (no peft, no bitsandbytes).

    python -m qlora.merge --adapter runs/default/final --out runs/default/merged
    python -m qlora.merge --adapter runs/default/final --out merged-bf16 --dtype bfloat16   # half the size, less exact

The adapter was trained against the *NF4-quantised* base, so that is what it is merged into: the base is
loaded in 4-bit exactly as in training, every bitsandbytes `Linear4bit` weight is dequantised into a
plain `nn.Linear` of a fresh full-precision model (`qlora.evaluation.inference.dequantized_model`), and the LoRA is
merged with peft's `merge_and_unload`. (Merging into the original full-precision weights instead would
add the adapter to weights it never saw: the NF4 rounding error would come back.)

The result (`model.safetensors`, `config.json`, tokenizer, the run's `config.yaml`) loads with
`AutoModelForCausalLM.from_pretrained(out)`. The merge is checked against the 4-bit base + adapter (fp32
compute: the trained function itself) on held-out rows: max/mean logit difference, argmax agreement and
the eval loss of both, printed and written to `out/merge_report.json`.

Precision: `--dtype float32` (the default, on every device) keeps the merge error at fp32 rounding: on the
default run max |logit error| 1.6e-4 on logits up to 46, 100% argmax agreement. bfloat16/float16 halve
the files but round every merged weight; the report then shows a much larger error, and a warning says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch

from ..speed import attention
from ..config import ConfigError, load_config, save_config
from ..data.examples import DataError
from ..filecheck import umask_mode
from ..cli import ArgParser, count
from .evaluate import eval_loss, load_eval_rows, loss_examples
from .inference import inference_config, load_for_inference
from ..model.base import ModelLoadError

EXACT_DTYPE = "float32"  # the precision whose merge error the docs state


def check_out_dir(out: str, adapter: str) -> None:
    """`out` may be new or a directory an earlier merge wrote (it is replaced); anything else is refused
    before any work, so a typo never deletes a run."""
    path = Path(out)
    if path.resolve() == Path(adapter).resolve() or Path(adapter).resolve().is_relative_to(path.resolve()):
        raise ConfigError(f"--out {out} is (or holds) the adapter folder: choose a new folder for the merged model")
    if path.exists() and not (path / "merge_report.json").is_file() and (path.is_file() or any(path.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not a merged model written by qlora.evaluation.merge: "
                          "choose a new folder (nothing was changed)")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: cannot write in {parent}: choose another --out")


def merge(adapter: str, out: str, dtype: str = EXACT_DTYPE, device=None, check_rows: int = 8,
          check_data: str = "builtin:sql", warn=None) -> dict:
    """Dequantise + merge + save; returns the merge report (also written to out/merge_report.json).
    Every input is checked before the out folder is touched."""
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_out_dir(out, adapter)
    cfg, _ = inference_config(adapter)
    if cfg.quant == "none":
        raise ConfigError(f"{adapter}: the run used quant=none; there is nothing to dequantise "
                          "(merge with peft's merge_and_unload directly)")
    if dtype != EXACT_DTYPE:
        (warn or _warn)(f"--dtype {dtype} rounds every merged weight to {dtype}: expect a merge error far above "
                        f"--dtype {EXACT_DTYPE}'s (fp32 rounding, ~1e-4 max |logit error|); merge_report.json measures it")
    load_eval_rows(check_data, check_rows)  # the check rows exist, before minutes of loading
    # the reference: 4-bit base + adapter in fp32 compute, exactly what was trained
    ref, tokenizer, cfg = load_for_inference(adapter, compute_dtype=EXACT_DTYPE, device=device)
    merged, _, _ = merged_model(adapter, dtype, device)
    report = compare(ref, merged, tokenizer, cfg, check_data, check_rows)
    out_path = Path(out)
    report.update({"adapter": str(adapter), "out": str(out_path), "base_model": cfg.model, "base_quant": cfg.quant,
                   "double_quant": cfg.double_quant, "merged_dtype": dtype})
    # a standard model directory (+ tokenizer + the run's config, for the chat format), written aside, then swapped in
    tmp = out_path.parent / f".tmp-{out_path.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    merged.config.use_cache = True
    merged.save_pretrained(tmp, safe_serialization=True)
    umask_mode(tmp.glob("*.safetensors"))
    tokenizer.save_pretrained(tmp)
    save_config(load_config([], **{**vars(cfg), "model": str(out_path), "quant": "none",
                                   "compute_dtype": dtype}), tmp / "config.yaml")
    (tmp / "merge_report.json").write_text(json.dumps(report, indent=1))
    if out_path.exists():
        shutil.rmtree(out_path)
    tmp.rename(out_path)
    return report


def merged_model(adapter: str, dtype: str = EXACT_DTYPE, device=None):
    """(merged model, tokenizer, Config): the same 4-bit base as in training, dequantised into plain linears
    in `dtype`, and the adapter merged into them (a base trained with quant none is merged as it is)."""
    plain, tokenizer, cfg = load_for_inference(adapter, compute_dtype=dtype, dequantize=True, device=device)
    untie_adapted_output(plain.get_base_model())
    return plain.merge_and_unload().eval(), tokenizer, cfg


def untie_adapted_output(model) -> bool:
    """An adapter on a tied `lm_head` (SmolLM2: the output projection is the input embedding) changes the
    output projection only: give `lm_head` its own copy of the weight, so the merge leaves the input
    embedding as it was, and record the model as untied (saved and exported with its own output weight).
    Returns whether it untied anything."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    layer = getattr(head, "base_layer", None)  # a peft LoRA layer wraps the real lm_head
    if layer is None or embed is None or layer.weight is not embed.weight:
        return False
    layer.weight = torch.nn.Parameter(layer.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    return True


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


@torch.no_grad()
def compare(ref, merged, tokenizer, cfg, data: str = "builtin:sql", n_rows: int = 8) -> dict:
    """Logit error of `merged` vs `ref` (full logits at every position of each row, unpadded) and the
    eval loss (response-only, as in training) of both on the same rows."""
    rows, fmt = load_eval_rows(data, n_rows)
    examples = loss_examples(rows, fmt, tokenizer, cfg)
    report = logit_errors(ref, merged, [ex.input_ids for ex in examples])
    loss_ref, n_tok = eval_loss(ref, examples, tokenizer.pad_token_id, 8, cfg.max_seq_len)
    loss_m, _ = eval_loss(merged, examples, tokenizer.pad_token_id, 8, cfg.max_seq_len)
    return {"check_data": data, "check_rows": len(examples), **report, "supervised_tokens": n_tok,
            "eval_loss_4bit_plus_adapter": loss_ref, "eval_loss_merged": loss_m,
            "eval_loss_diff": loss_m - loss_ref}


@torch.no_grad()
def logit_errors(ref, other, rows: list[list[int]]) -> dict:
    """Max/mean |logit difference| of `other` vs `ref` over every position of each row of token ids
    (one unpadded row at a time), the largest |logit| of `ref`, and the argmax agreement."""
    dev_ref, dev_m = next(ref.parameters()).device, next(other.parameters()).device
    for m in (ref, other):
        attention.use_default_attention(m, "sdpa")
    max_err, abs_sum, count_, agree, ref_abs = 0.0, 0.0, 0, 0, 0.0
    for row in rows:
        ids = torch.tensor([row])
        a = ref(input_ids=ids.to(dev_ref), use_cache=False).logits.float().cpu()[0]
        b = other(input_ids=ids.to(dev_m), use_cache=False).logits.float().cpu()[0]
        d = (a - b).abs()
        max_err = max(max_err, float(d.max()))
        abs_sum += float(d.sum())
        count_ += d.numel()
        ref_abs = max(ref_abs, float(a.abs().max()))
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
    positions = sum(len(r) for r in rows)
    return {"positions": positions, "max_abs_logit_error": max_err, "mean_abs_logit_error": abs_sum / max(count_, 1),
            "max_abs_logit_ref": ref_abs, "argmax_agreement": agree / max(positions, 1)}


def main(argv=None) -> int:
    ap = ArgParser(prog="python -m qlora.merge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="adapter folder written by train.py (e.g. runs/default/final)")
    ap.add_argument("--out", required=True, help="merged model directory to write (a new folder, or one an "
                    "earlier merge wrote: it is replaced)")
    ap.add_argument("--dtype", default=EXACT_DTYPE, choices=["float32", "bfloat16", "float16"],
                    help="merged weights; float32 keeps the merge error at fp32 rounding (the others warn)")
    ap.add_argument("--check_data", default="builtin:sql", help="held-out rows for the logit/loss check")
    ap.add_argument("--check_rows", type=count(1), default=8)
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
