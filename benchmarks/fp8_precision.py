"""What `base_fp8` costs in precision on a real model: the token loss of the same rows with the base
GEMMs in bf16, all in FP8, FP8 except the projections in `fp8_exclude`, and FP8 in one projection kind
at a time (qlora/speed/fp8.py). Runs on a CPU (torch's `_scaled_mm`) or a GPU.

    python benchmarks/fp8_precision.py                                  # SmolLM2-135M, 8 built-in SQL rows
    python benchmarks/fp8_precision.py --datasets ../shared/data/guanaco-llama2-1k.parquet:guanaco --rows 16

Prints one line per variant (loss, change against bf16) and writes --out/fp8_precision.json if given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qlora.speed import attention, fp8  # noqa: E402
from qlora.config import load_config  # noqa: E402
from qlora.data.examples import load_datasets  # noqa: E402
from qlora.training.loss import TokenLoss  # noqa: E402
from qlora.speed.lora_fused import FP8_ATTR  # noqa: E402
from qlora.model.base import load_tokenizer  # noqa: E402
from qlora.model.trainable import load_model  # noqa: E402
from qlora.training.packing import collate, to_device  # noqa: E402

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--datasets", default="builtin:sql")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--max_seq_len", type=int, default=512)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    cfg = load_config([], model=args.model, quant="nf4", compute_dtype="bfloat16", base_fp8=True, fp8_exclude=[],
                      lora_dropout=0.0, recompute=False, max_seq_len=args.max_seq_len)
    tok = load_tokenizer(cfg)
    rows = load_datasets(args.datasets.split(","), tok, args.max_seq_len, "drop", 0.0, seed=0)[0][:args.rows]
    model = load_model(cfg, device)
    backend = attention.use_packed_attention(model, "sdpa")
    lm = TokenLoss(model)
    lm.eval()
    linears = {n: m for n, m in model.named_modules() if hasattr(m, FP8_ATTR)}

    def loss(kinds) -> float:
        for name, m in linears.items():
            setattr(m, FP8_ATTR, name.rsplit(".", 1)[-1] in kinds)
        fp8._last_input[0] = None
        total, n = 0.0, 0
        for i in range(0, len(rows), 2):
            b = collate([[e] for e in rows[i:i + 2]], pad_id=0)
            with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                total += float(lm(**to_device(b, device), **attention.batch_kwargs(b, backend, device)))
            n += b["n_supervised"]
        return total / n

    variants = [("bf16", ()), ("fp8, all", KINDS), ("fp8, not down_proj", KINDS[:-1])]
    variants += [(f"fp8, {k} only", (k,)) for k in KINDS]
    out = {"model": args.model, "datasets": args.datasets, "rows": len(rows), "device": str(device), "loss": {}}
    for name, kinds in variants:
        out["loss"][name] = loss(kinds)
        ref = out["loss"]["bf16"]
        print(f"{name:<24} loss {out['loss'][name]:.5f}  {100 * (out['loss'][name] / ref - 1):+.2f}%", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "fp8_precision.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    from qlora.model.base import ModelLoadError
    from qlora.config import ConfigError
    from qlora.data.examples import DataError

    try:
        main()
    except (ConfigError, DataError, ModelLoadError) as e:  # bad input: one line, as train.py says it
        sys.exit(f"error: {e}")
