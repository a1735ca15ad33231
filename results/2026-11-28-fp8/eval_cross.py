"""Record, not a tool: the script that produced smollm2_guanaco_cpu_eval_cross.json (2026-11-28, CPU), kept as run
at commit 534b5b6 (its /work/main and /tmp/q paths and its qlora imports are that commit's). It evaluates the
adapters of the two 40-step SmolLM2 runs (bf16 and all-FP8) on the bf16 and on the FP8 base; see
benchmarks/RESULTS.md, "FP8 base GEMMs". Nothing imports it and pytest does not collect it."""
import sys, json
from pathlib import Path
import torch
sys.path.insert(0, '/work/main')
from qlora.config import load_config
from qlora.data import load_datasets
from qlora.model import load_model, load_tokenizer
from qlora.packing import eval_batches
from qlora.loss import TokenLoss, mean_token_loss
from qlora.checkpoint import load_adapter_weights
from qlora import attention
out = {}
for run in ("fp8_true", "fp8_false"):
    for fp in (False, True):
        cfg = load_config(["--config", f"/tmp/q/{run}/config.yaml", "--base_fp8", str(fp).lower()])
        tok = load_tokenizer(cfg)
        _, eval_set, _ = load_datasets(cfg.datasets, tok, cfg.max_seq_len, cfg.overlong, cfg.eval_fraction, cfg.seed,
                                       cfg.eval_datasets, cfg.system_prompt)
        evals = eval_batches(eval_set, cfg.max_seq_len, cfg.micro_batch_size, tok.pad_token_id, cfg.packing)[:cfg.eval_batches]
        model = load_model(cfg, torch.device("cpu"))
        load_adapter_weights(model, Path(f"/tmp/q/{run}/final"))
        backend = attention.use_packed_attention(model, cfg.attn_backend)
        loss, n = mean_token_loss(TokenLoss(model), evals, backend, torch.device("cpu"))
        out[f"adapter trained {'fp8' if run == 'fp8_true' else 'bf16'}, evaluated {'fp8' if fp else 'bf16'}"] = loss
        print(run, fp, loss, n, flush=True)
print(json.dumps(out, indent=1))
json.dump(out, open('/tmp/evalbf16.json', 'w'), indent=1)
