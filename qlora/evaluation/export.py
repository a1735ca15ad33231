"""Export a QLoRA adapter as one GGUF file for llama.cpp, Ollama or LM Studio.

    python -m qlora.export --adapter runs/default/final --out model.gguf --type f16
    python -m qlora.export --adapter runs/default/final --out model-q8.gguf --type q8_0 --force --no-check

The adapter is merged exactly as `qlora.evaluation.merge` merges it (`qlora.evaluation.merge.merged_model`: the 4-bit base it was
trained against, dequantised into fp32 linears, the LoRA merged in), then written with the `gguf` package
(`qlora.evaluation.gguf_write`): weights in f16, bf16 or q8_0 (1-D tensors such as norms in f32), the tokenizer, its
special ids and the chat template. The file is written to a temporary file in the --out folder and renamed
into place, so a full disk or a crash never leaves a half-written file under the final name; an existing
--out is replaced only with --force.

The check (on unless --no-check) reads the file back two independent ways, with transformers
(`from_pretrained(folder, gguf_file=...)`) and with the project's own GGUF loader (what `--model
model.gguf` runs), and compares both with the merged model on the default job's held-out rows (max |logit
error|, argmax agreement) and greedy answers to its first eval prompts (`qlora.evaluation.gguf_check`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from ..cli import ArgParser, check_writable, count
from ..config import ConfigError
from ..data.examples import DataError
from .gguf_check import check_gguf_file
from .gguf_write import TYPES, gguf_arch, pre_tokenizer_name, write_gguf
from .inference import inference_config
from .merge import merged_model
from ..model.base import ModelLoadError, resolve_source


def check_out_file(out: str, force: bool) -> None:
    """--out can be written: not a folder, its folder writable, and not an existing file unless `force`."""
    check_writable(out, "--out")
    if Path(out).exists() and not force:
        raise ConfigError(f"--out {out} already exists: pass --force to replace it, or choose another --out "
                          "(nothing was changed)")


def write_atomic(model, tokenizer, out: str, ftype: str) -> None:
    """`write_gguf` into a temporary file beside `out`, renamed into place only once complete."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write_gguf(model, tokenizer, tmp, ftype, name=path.stem)
        os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"--out {out}: writing failed ({e.strerror or e}): free disk space or choose another "
                          f"--out ({out} was left as it was)") from None
    finally:
        tmp.unlink(missing_ok=True)


def export(adapter: str, out: str, ftype: str = "f16", force: bool = False, device=None):
    """Merge `adapter` and write `out`; returns (merged model, tokenizer, Config) for the check.
    Every input is checked before minutes of work and before anything is written."""
    if ftype not in TYPES:
        raise ConfigError(f"--type {ftype}: choose one of {', '.join(TYPES)}")
    check_out_file(out, force)
    cfg, _ = inference_config(adapter)  # the adapter folder and its config, before any model is loaded
    if not cfg.model.startswith("random:"):  # an architecture GGUF cannot hold is refused before the merge
        gguf_arch(AutoConfig.from_pretrained(resolve_source(cfg.model), trust_remote_code=cfg.trust_remote_code))
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    merged, tokenizer, cfg = merged_model(adapter, "float32", device)
    gguf_arch(merged.config)
    pre_tokenizer_name(tokenizer)
    write_atomic(merged, tokenizer, out, ftype)
    return merged, tokenizer, cfg


def main(argv=None) -> int:
    ap = ArgParser(prog="python -m qlora.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="adapter folder written by train.py (e.g. runs/default/final)")
    ap.add_argument("--out", required=True, help="the .gguf file to write")
    ap.add_argument("--type", default="f16", choices=TYPES, help="weight type of the 2-D tensors (default f16)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                    help="read the file back (transformers and the project's loader) and compare with the merged model")
    ap.add_argument("--check_rows", type=count(1), default=4, help="held-out rows whose logits are compared")
    ap.add_argument("--check_prompts", type=count(1), default=2, help="eval prompts answered greedily by both")
    ap.add_argument("--max_new_tokens", type=count(1), default=64, help="length of the greedy answers compared")
    args = ap.parse_args(argv)
    try:
        merged, tokenizer, cfg = export(args.adapter, args.out, args.type, args.force)
        print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB, {args.type})", flush=True)
        if not args.check:
            return 0
        report = check_gguf_file(args.out, merged, tokenizer, cfg, args.check_rows, args.check_prompts,
                                 args.max_new_tokens)
    except (ConfigError, ModelLoadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**report, "type": args.type}, indent=1))
    for how in ("transformers", "project_loader"):
        r = report[how]
        print(f"check ({how}): max |logit error| {r['max_abs_logit_error']:.4g} (logits up to "
              f"{r['max_abs_logit_ref']:.3g}), argmax agreement {100 * r['argmax_agreement']:.2f}% of "
              f"{r['positions']} positions, greedy answers {'equal' if r['greedy_equal'] else 'DIFFER'}")
        if not r["greedy_equal"]:
            print(f"warning: greedy answers of {args.out} read by {how} differ from the merged model's"
                  + (" (q8_0 rounds every weight to 8 bits)" if args.type == "q8_0" else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
