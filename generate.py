"""Load a base model in 4-bit plus a LoRA adapter and generate answers with a KV cache.

    python generate.py --adapter runs/default/final --prompt "How many employees are in Sales?"
    python generate.py --adapter runs/default/final --prompts-file questions.txt --temperature 0.7

The base model and the chat format come from the adapter's saved config.yaml (override with --model).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qlora.config import ConfigError, load_config
from qlora.generation import generate_ids, prompt_ids  # noqa: F401  (re-exported: train.py imports generate_ids from here)
from qlora.model import ModelLoadError, load_base_model, load_tokenizer


def load_for_inference(adapter: str | None, model: str | None = None, quant: str | None = None, device=None):
    """(peft model or base model, tokenizer, config) ready for generation."""
    from peft import PeftModel

    overrides = {}
    preset = None
    if adapter:
        cfg_path = Path(adapter) / "config.yaml"
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelLoadError(f"{adapter} is not an adapter folder (no adapter_config.json)")
        preset = str(cfg_path) if cfg_path.is_file() else None
    if model:
        overrides["model"] = model
    if quant:
        overrides["quant"] = quant
    cfg = load_config(["--config", preset] if preset else [], **overrides)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg)
    if adapter and (Path(adapter) / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    base = load_base_model(cfg, device)
    net = PeftModel.from_pretrained(base, adapter) if adapter else base
    net.eval()
    return net, tokenizer, cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", help="adapter folder (e.g. runs/default/final); omit for the base model")
    ap.add_argument("--model", help="base model (default: the adapter's config)")
    ap.add_argument("--quant", choices=["nf4", "fp4", "none"], help="base weights (default: the adapter's config)")
    ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    ap.add_argument("--prompts-file", help="a text file with one prompt per line")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    if not prompts:
        ap.error("give --prompt TEXT or --prompts-file FILE")
    try:
        model, tokenizer, cfg = load_for_inference(args.adapter, args.model, args.quant)
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
