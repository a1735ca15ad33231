"""Answer prompts with a base model + LoRA adapter (or a merged or bare model), with a KV cache.

    python generate.py --adapter runs/default/final --prompt "How many employees are in Sales?"
    python generate.py --adapter runs/default/final --prompts_file questions.txt --temperature 0.7
    python generate.py --model runs/default/merged --prompt "..." --max_new_tokens 64

The base model and the chat format come from the adapter's saved config.yaml (override the base with
--model); loading goes through qlora.evaluation.inference.load_for_inference, which checks the adapter against
the base model before reading any weights. On a CPU the 4-bit linears run dequantised by default
(identical logits in fp32, several times faster; --dequantize false keeps the 4-bit matmuls).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qlora.config import ConfigError
from qlora.evaluation.generation import generate_ids, prompt_ids
from qlora.cli import ArgParser, add_model_args, count, dequantize_choice
from qlora.evaluation.inference import load_for_inference
from qlora.model.base import ModelLoadError


def read_prompts(args) -> list[str]:
    """--prompt values, then the non-empty lines of --prompts_file; a ConfigError names what is wrong."""
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        try:
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            why = "is not UTF-8 text" if isinstance(e, UnicodeDecodeError) else \
                "is a folder" if path.is_dir() else "does not exist" if not path.exists() else "cannot be read"
            raise ConfigError(f"--prompts_file {path} {why}: give a UTF-8 text file with one prompt per line") from None
    if not prompts:
        raise ConfigError("no prompts: give --prompt TEXT or --prompts_file FILE (one prompt per non-empty line)")
    return prompts


def main(argv=None) -> int:
    ap = ArgParser(prog="python generate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    ap.add_argument("--prompts_file", help="a text file with one prompt per line")
    ap.add_argument("--max_new_tokens", type=count(1), default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top_p", type=float, default=1.0)
    ap.add_argument("--batch_size", type=count(1), default=8)
    args = ap.parse_args(argv)
    if not (args.temperature >= 0 and 0 < args.top_p <= 1):
        ap.error("--temperature must be >= 0 and --top_p in (0, 1]")
    try:
        prompts = read_prompts(args)
        model, tokenizer, cfg = load_for_inference(args.adapter, args.model, quant=args.quant,
                                                   compute_dtype=args.compute_dtype,
                                                   dequantize=dequantize_choice(args.dequantize))
    except (ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = next(model.parameters()).device
    for k in range(0, len(prompts), args.batch_size):
        chunk = prompts[k:k + args.batch_size]
        ids = [prompt_ids(tokenizer, p, cfg.system_prompt) for p in chunk]
        for p, answer in zip(chunk, generate_ids(model, tokenizer, ids, args.max_new_tokens, device,
                                                   args.temperature, args.top_p)):
            print(f">>> {p}\n{answer}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
