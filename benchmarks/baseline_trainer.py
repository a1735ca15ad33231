#!/usr/bin/env python
"""The seed recipe, measured the way benchmarks/bench.py measures our loop (bench.py --compare runs it).

    python benchmarks/baseline_trainer.py --spec '{"max_seq_len": 512, "micro_batch_size": 2, "grad_accum": 2}' --result r.json

The recipe as the seed notebook runs it: HF `Trainer` + `TrainingArguments` (optim="paged_adamw_8bit",
lr 1e-4, gradient checkpointing, bf16), an NF4 double-quant base with bf16 compute,
`peft.prepare_model_for_kbit_training`, LoRA r=8 alpha=64 dropout 0.05 on q,k,v,o,gate,up,down, and
`DataCollatorForLanguageModeling(mlm=False)` with dynamic padding (pad to the longest row of each batch).
Labels are the seed's: the full sequence (the collator copies input_ids and masks only padding), so
prompt tokens are trained on too; `response_tokens_per_s` counts response tokens for comparison.

Model: a hub id or local directory goes through `from_pretrained(..., quantization_config=
BitsAndBytesConfig(nf4, double quant, bf16 compute))`, the seed's path. `random:<shape>` (the default
random Llama-2-7B) has no checkpoint to load; saving a 13.5 GB random checkpoint and loading it back in
every subprocess would cost minutes of GPU time per setting, so the random bf16 Llama is built on the
device and quantised with `qlora.model.quant.quantize_linears_` (bitsandbytes `Linear4bit`, NF4, double
quant, every Linear but lm_head, which is what `from_pretrained` + `BitsAndBytesConfig` produces), then
`prepare_model_for_kbit_training` runs exactly as in the seed (it upcasts embeddings, norms and lm_head
to fp32 and enables gradient checkpointing).

A `TrainerCallback` syncs and timestamps the end of every optimizer step (warm-up steps excluded from
timing, as for ours); a forward pre-hook counts real tokens, loss positions and causal attention pairs
per micro-batch on the device (no host sync), for tokens/s and the FLOPs model of common.py.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
import common  # noqa: E402
from common import PAD_ID, log  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def pad_tokenizer():
    """A stand-in tokenizer for the collator's padding: only pad/bos/eos/unk matter to it (the seed sets
    pad = Llama-2's EOS, padding_side right; here pad is the random model's pad id 0). No download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.padding_side = "right"
    assert tok.pad_token_id == PAD_ID
    return tok


def load_seed_model(spec: dict, device, compute_dtype):
    from qlora.config import load_config

    cfg = load_config([], model=spec["model"], quant=spec["quant"], double_quant=True, seed=spec["seed"],
                      max_seq_len=spec["max_seq_len"], tracker="none")
    if cfg.model.startswith("random:"):
        from qlora.model.base import build_random_model

        from transformers.utils.quantization_config import QuantizationMethod

        model = build_random_model(cfg.model.split(":", 1)[1], cfg, device, compute_dtype)
        if cfg.quant != "none":
            model.quantization_method = QuantizationMethod.BITS_AND_BYTES  # as from_pretrained's quantizer sets
        how = "random Llama built on the device, NF4 via qlora.model.quant.quantize_linears_ (no checkpoint to load)"
    else:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        from qlora.model.base import resolve_source

        kw = {}
        if cfg.quant != "none":
            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=cfg.quant, bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype)
        model = AutoModelForCausalLM.from_pretrained(resolve_source(cfg.model), dtype=compute_dtype,
                                                     device_map={"": device}, **kw)
        how = "from_pretrained + BitsAndBytesConfig"
    model.config.use_cache = False
    return model, how


def run_baseline(spec: dict, rec: dict) -> None:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments
    from transformers import set_seed

    device = common.pick_device()
    on_cuda = device.type == "cuda"
    if spec["compute_dtype"] == "auto":
        compute_dtype = torch.bfloat16 if on_cuda else torch.float32
    else:
        compute_dtype = getattr(torch, spec["compute_dtype"])
    bf16 = on_cuda and compute_dtype == torch.bfloat16
    set_seed(spec["seed"])
    probe = common.Probe(device)
    rec.update(impl="baseline", **common.env_info(device), mixed_precision="bf16" if bf16 else "no",
               attn_resolved="stock (padded, HF mask)", packing=False)
    total_steps = spec["warmup"] + spec["steps"]

    # --- model: seed recipe
    model, how = load_seed_model(spec, device, compute_dtype)
    base_gib = probe.allocated()
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec["recompute"])
    lora = LoraConfig(r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=spec["lora_dropout"],
                      target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    base = model.get_base_model()
    shape = common.matmul_params(base.config)
    vocab, half = base.config.vocab_size, base.config.vocab_size // 2
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rec.update(model_source=how, attn_resolved=f"stock {base.config._attn_implementation} (padded)",
               trainable_params=n_lora, compute_dtype=str(compute_dtype),
               lm_head_dtype=str(base.lm_head.weight.dtype), embed_dtype=str(base.get_input_embeddings().weight.dtype))

    # --- data: same synthetic examples as ours, one example per row, padded per batch by the seed's collator
    n_rows = total_steps * spec["grad_accum"] * spec["micro_batch_size"]
    raw = common.synth_examples(spec["data"], spec["max_seq_len"], n_rows, vocab, spec["seed"])
    train_set = [{"input_ids": ids} for ids, _ in raw]
    collator = DataCollatorForLanguageModeling(tokenizer=pad_tokenizer(), mlm=False)

    # --- measurement: step-end timestamps + on-device counts per micro-batch
    class Meter(TrainerCallback):
        def __init__(self):
            self.ends, self.per_step, self.after_first = [], [], 0.0
            self.pending = None

        def count(self, module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            am, labels = kwargs.get("attention_mask"), kwargs.get("labels")
            lens = am.sum(1) if am is not None else torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
            lp = labels[:, 1:] if labels is not None else ids[:, 1:]
            c = {"tokens": lens.sum(), "capacity": ids.numel(), "pairs": (lens * (lens + 1) // 2).sum(),
                 "loss_positions": (lp != -100).sum(), "response": (lp >= half).sum()}
            c["supervised"] = c["loss_positions"]
            if self.pending is None:
                self.pending = c
            else:
                self.pending = {k: self.pending[k] + v for k, v in c.items()}

        def on_train_begin(self, args, state, control, **kw):
            probe.sync()
            self.ends = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            probe.sync()
            self.ends.append(time.perf_counter())
            self.per_step.append(self.pending)
            self.pending = None
            if state.global_step == 1:
                self.after_first = probe.allocated()
            log(f"  baseline step {state.global_step}/{total_steps}: {self.ends[-1] - self.ends[-2]:.3f} s")

    meter = Meter()
    model.register_forward_pre_hook(meter.count, with_kwargs=True)
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=spec["micro_batch_size"],
            gradient_accumulation_steps=spec["grad_accum"], max_steps=total_steps, learning_rate=spec["lr"],
            optim={"adamw": "adamw_torch"}.get(spec["optimizer"], spec["optimizer"]),
            gradient_checkpointing=spec["recompute"], bf16=bf16, fp16=False,
            logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], data_seed=spec["seed"],
            disable_tqdm=True, dataloader_num_workers=0, use_cpu=not on_cuda)
        trainer = Trainer(model=model, args=targs, train_dataset=train_set, data_collator=collator,
                          callbacks=[meter])
        probe.reset_peak()
        after_setup = probe.allocated()
        out = trainer.train()
    peak, reserved = probe.peaks()
    per_step = [{k: int(v) for k, v in s.items()} for s in meter.per_step]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    layer = base.model.layers[0]
    gc = getattr(layer, "_gradient_checkpointing_func", None)
    rec.update(device_used_end_gib=probe.device_used(), loss_first=losses[0] if losses else None,
               loss_last=losses[-1] if losses else None, train_runtime_s=out.metrics.get("train_runtime"),
               gc_kwargs=str(getattr(gc, "keywords", None)) if gc is not None else None,
               optimizer_class=common.describe_optimizer(trainer.optimizer))
    common.memory_fields(rec, base_gib, after_setup, meter.after_first, peak, reserved)
    common.summarise(rec, meter.ends, per_step, spec["warmup"], spec["recompute"], shape, n_lora)


if __name__ == "__main__":
    sys.exit(common.worker_main(run_baseline))
