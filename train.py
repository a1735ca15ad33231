"""QLoRA fine-tuning: a 4-bit NF4 base, LoRA adapters, and a loop you can read top to bottom.

    python train.py                                   # embedded SmolLM2-135M-Instruct on built-in SQL data
    python train.py --config configs/llama2-7b-guanaco.yaml
    accelerate launch train.py --config configs/default.yaml --max_steps 200

Every `--key value` overrides a field of `qlora.config.Config`.
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qlora import attention
from qlora.checkpoint import (CheckpointError, list_checkpoints, load_adapter_weights, load_checkpoint,
                              resolve_resume, rng_state, save_adapter, save_checkpoint, set_rng_state)
from qlora.config import Config, ConfigError, load_config, save_config
from qlora.data import DataError, load_datasets
from qlora.loss import TokenLoss
from qlora.model import (ModelLoadError, count_parameters, describe_speedups, load_model, load_tokenizer,
                         model_vocab_size)
from qlora.optim import lr_at, make_optimizer, set_lr
from qlora.packing import Batches, DataState, eval_batches, to_device
from qlora.signals import StopRequest
from qlora.telemetry import RunLog, Throughput, allocated_per_rank_gib, format_step, info, peak_memory_gib, sync


class NonFiniteError(RuntimeError):
    pass


def main(cfg: Config) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # --- accelerator --------------------------------------------------------------------------
    on_cuda = torch.cuda.is_available() and not _cpu_requested()
    mixed = "bf16" if on_cuda and cfg.compute_dtype in ("auto", "bfloat16") else "no"
    tracker = _tracker(cfg)
    accelerator = Accelerator(mixed_precision=mixed, log_with=tracker, project_dir=cfg.output_dir,
                              cpu=not on_cuda)
    device, is_main = accelerator.device, accelerator.is_main_process
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    resume_from = resolve_resume(cfg.resume, out)
    if is_main:
        _check_output_dir(out, cfg, resume_from)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    log = RunLog(out, enabled=is_main)
    say = info if is_main else (lambda *_: None)

    # --- data ---------------------------------------------------------------------------------
    tokenizer = load_tokenizer(cfg)
    train_set, eval_set, stats = load_datasets(cfg.datasets, tokenizer, cfg.max_seq_len, cfg.overlong,
                                               cfg.eval_fraction, cfg.seed, cfg.eval_datasets, cfg.system_prompt)
    batches = Batches(train_set, cfg.max_seq_len, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.seed,
                      cfg.packing, rank=accelerator.process_index, world=accelerator.num_processes)
    evals = eval_batches(eval_set, cfg.max_seq_len, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.packing)
    if cfg.eval_batches:
        evals = evals[: cfg.eval_batches]
    say(f"data: {stats.summary()}; {len(eval_set)} eval examples")
    say(f"data: {batches.micro_batches_per_epoch()} micro-batches per epoch per rank, packing efficiency "
        f"{batches.efficiency():.1%} ({'packed' if cfg.packing else 'padded'} rows of {cfg.max_seq_len})")

    # --- model --------------------------------------------------------------------------------
    vocab, top = model_vocab_size(cfg), max(max(e.input_ids) for e in train_set + eval_set)
    if top >= vocab:  # e.g. random:llama2-7b (32000 rows) with the 49152-token SmolLM2 tokenizer
        raise ModelLoadError(f"the data has token id {top} but {cfg.model} has only {vocab} embeddings: use a "
                             "tokenizer that matches the model (--tokenizer) or a model with a larger vocab")
    model = load_model(cfg, device, fsdp=accelerator.is_fsdp2)
    backend = attention.use_packed_attention(model, cfg.attn_backend)
    trainable, total = count_parameters(model)
    say(f"model: {cfg.model} ({cfg.quant}) trainable {trainable:,} / {total:,} params "
        f"({100 * trainable / total:.3f}%), attention '{backend}', device {device}; {describe_speedups(model)}")

    # --- optimizer ----------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    loss_model, optimizer = accelerator.prepare(TokenLoss(model), optimizer)
    # FSDP2 swaps every parameter for a sharded DTensor: clip (and gather) the prepared ones
    params = [p for p in loss_model.parameters() if p.requires_grad]
    fsdp = accelerator.is_fsdp2
    setup = allocated_per_rank_gib(accelerator, device)  # weights, adapters, optimizer: before any activation
    if setup:
        say(f"memory: {', '.join(f'{g:.2f}' for g in setup)} GiB allocated per rank after setup")
        log.write(kind="setup", allocated_gib_per_rank=setup)

    # --- resume -------------------------------------------------------------------------------
    step, skipped = 0, 0
    if resume_from is not None:
        if fsdp:
            raise CheckpointError(f"--resume {resume_from}: resuming under FSDP is not supported yet; its "
                                  "adapter_model.safetensors is a normal peft adapter (start a new run from it)")
        state, optim_state, rng = load_checkpoint(resume_from, cfg, cfg.resume_force)
        if state.get("fsdp"):  # its optimizer.pt holds rank 0's shard only
            raise CheckpointError(f"checkpoint {resume_from} was written under FSDP, which cannot be resumed yet; "
                                  "its adapter_model.safetensors is a normal peft adapter")
        if state["world_size"] != accelerator.num_processes:
            raise CheckpointError(f"checkpoint {resume_from} was written by {state['world_size']} processes, "
                                  f"this run has {accelerator.num_processes}: resume with the same number")
        load_adapter_weights(model, resume_from)
        optimizer.load_state_dict(optim_state)
        set_rng_state(rng[f"rank{accelerator.process_index}"] if f"rank{accelerator.process_index}" in rng else rng)
        step, skipped = state["step"], state.get("skipped_steps", 0)
        batches.state = DataState(**state["data"])
        say(f"resume: from {resume_from} at step {step} (epoch {batches.state.epoch}, "
            f"micro-batch {batches.state.index})")
    if tracker:
        accelerator.init_trackers("qlora", config={k: str(v) for k, v in vars(cfg).items()})

    def checkpoint_now():
        rngs = accelerator.gather_for_metrics([rng_state()], use_gather_object=True) \
            if accelerator.num_processes > 1 else [rng_state()]
        adapter = savable_adapter(accelerator, loss_model)  # collective under FSDP: every rank calls it
        if is_main:
            state = {"step": step, "data": vars(batches.state), "skipped_steps": skipped,
                     "world_size": accelerator.num_processes, "fsdp": fsdp}
            path = save_checkpoint(out, step, adapter, tokenizer,
                                   optimizer, cfg, state, {f"rank{i}": r for i, r in enumerate(rngs)})
            say(f"checkpoint: {path}")
        accelerator.wait_for_everyone()

    # --- loop ---------------------------------------------------------------------------------
    loss_model.train()
    speed, last = Throughput(), {}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not is_main, desc="train", dynamic_ncols=True)
    with StopRequest() as stop:
        if evals and step == 0:  # the baseline every later eval is compared with
            first = evaluate(accelerator.unwrap_model(loss_model), evals, backend, device)
            say(f"eval  {0:>5} | eval loss {first:.4f} | ppl {math.exp(first):.2f}")
            log.write(kind="eval", step=0, eval_loss=first)
        while step < cfg.max_steps:
            micro = [batches.next() for _ in range(cfg.grad_accum)]
            # loss = sum of token losses in the window / supervised tokens in the window (all ranks)
            n_sup = accelerator.reduce(torch.tensor(sum(b["n_supervised"] for b in micro), device=device), "sum")
            set_lr(optimizer, lr_at(step, cfg))
            window_loss = torch.zeros((), device=device)
            for i, batch in enumerate(micro):
                sync_ctx = accelerator.no_sync(loss_model) if i < len(micro) - 1 else nullcontext()
                with sync_ctx:
                    loss_sum = loss_model(**to_device(batch, device),
                                          **attention.packing_kwargs(batch["position_ids"], backend, device=device))
                    # DDP averages gradients over ranks; scale so the result is the global token mean
                    accelerator.backward(loss_sum * accelerator.num_processes / n_sup)
                window_loss += loss_sum.detach()
                speed.add(batch["n_tokens"], batch["n_supervised"])
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
            loss = (accelerator.reduce(window_loss, "sum") / n_sup).item()  # one host sync per step
            if not (math.isfinite(loss) and math.isfinite(float(grad_norm))):
                optimizer.zero_grad(set_to_none=True)
                if not cfg.skip_nonfinite:
                    good = list_checkpoints(out)
                    raise NonFiniteError(f"non-finite loss ({loss}) or grad norm ({float(grad_norm)}) at step "
                                         f"{step + 1}; last good checkpoint: {good[-1][1] if good else 'none'} "
                                         "(lower lr, check the data, or set --skip_nonfinite true)")
                skipped += 1
                say(f"step {step + 1}: non-finite loss or gradient, skipped ({skipped} so far)")
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == cfg.max_steps:
                sync(device)
                tok_s, sup_s, _ = speed.read()
                last = {"step": step, "loss": loss, "lr": lr_at(step - 1, cfg), "grad_norm": float(grad_norm),
                        "tokens_per_s": tok_s * accelerator.num_processes,
                        "supervised_tokens_per_s": sup_s * accelerator.num_processes,
                        "supervised_tokens": int(n_sup), "epoch": batches.state.epoch,
                        "packing_efficiency": sum(b["n_tokens"] for b in micro) / sum(b["capacity"] for b in micro),
                        "peak_mem_gib": peak_memory_gib(device), "skipped_steps": skipped}
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{last['lr']:.1e}")
                if is_main:
                    tqdm.write(format_step(last), file=sys.stderr)
                log.write(kind="train", **last)
                accelerator.log({f"train/{k}": v for k, v in last.items() if k != "step"}, step=step)

            if evals and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps):
                last["eval_loss"] = evaluate(accelerator.unwrap_model(loss_model), evals, backend, device)
                say(f"eval  {step:>5} | eval loss {last['eval_loss']:.4f} | ppl {math.exp(last['eval_loss']):.2f}")
                log.write(kind="eval", step=step, eval_loss=last["eval_loss"])
                accelerator.log({"eval/loss": last["eval_loss"]}, step=step)
                speed.read()  # keep eval time out of tokens/s

            if (cfg.save_every and step % cfg.save_every == 0) or stop.requested:
                checkpoint_now()
            if stop.requested:
                say(f"{stop.signal_name}: checkpoint at step {step} written; resume with --resume auto")
                bar.close()
                accelerator.end_training()
                return {**last, "stopped": True}
    bar.close()

    # --- save ---------------------------------------------------------------------------------
    final = out / "final"
    adapter = savable_adapter(accelerator, loss_model)
    if is_main:
        peft_model = accelerator.unwrap_model(loss_model).model
        save_adapter(adapter, tokenizer, cfg, final)
        say(f"saved: adapter in {final}")
        if fsdp and cfg.sample_prompts:  # generating on one rank would wait forever for the others' shards
            say(f"samples: skipped under FSDP; try the adapter with: python generate.py --adapter {final}")
        elif cfg.sample_prompts and eval_set:
            from generate import generate_ids

            for ex in eval_set[: cfg.sample_prompts]:
                prompt = ex.input_ids[: next(i for i, t in enumerate(ex.labels) if t != -100)]
                text = generate_ids(peft_model, tokenizer, [prompt], cfg.max_new_tokens, device)[0]
                say(f"--- sample\n{tokenizer.decode(prompt[-60:])!r}\n>>> {text}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return last


def savable_adapter(accelerator, loss_model):
    """What `save_adapter` saves: the peft model itself (one process, DDP), or under FSDP2 a stand-in
    whose `save_pretrained` writes the full LoRA tensors, gathered from every rank's shards (a
    collective: all ranks must call this; only the main process then saves)."""
    peft_model = accelerator.unwrap_model(loss_model).model
    if not accelerator.is_fsdp2:
        return peft_model
    from types import SimpleNamespace

    from torch.distributed.tensor import DTensor

    # full_tensor(): a collective all-gather of each LoRA weight (small); then a private CPU copy
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for n, p in peft_model.named_parameters() if p.requires_grad}
    return SimpleNamespace(save_pretrained=lambda path, **kw: peft_model.save_pretrained(path, state_dict=full, **kw))


@torch.no_grad()
def evaluate(loss_model, evals: list[dict], backend: str, device) -> float:
    """Token-mean cross-entropy over the eval batches (same loss as training, no dropout)."""
    loss_model.eval()
    total, count = 0.0, 0
    for batch in evals:
        total += float(loss_model(**to_device(batch, device),
                                  **attention.packing_kwargs(batch["position_ids"], backend, device=device)))
        count += batch["n_supervised"]
    loss_model.train()
    return total / max(count, 1)


def _check_output_dir(out: Path, cfg: Config, resume_from) -> None:
    if list_checkpoints(out) and resume_from is None:
        raise CheckpointError(f"output_dir {out} already holds checkpoints of another run: pass --resume auto "
                              "to continue it, or choose a new --output_dir (nothing was deleted)")


def _tracker(cfg: Config):
    if cfg.tracker == "none":
        return None
    try:
        import tensorboard  # noqa: F401
        return "tensorboard"
    except ImportError:
        if cfg.tracker == "tensorboard":
            raise ConfigError("tracker 'tensorboard' needs: pip install tensorboard") from None
        return None


def _cpu_requested() -> bool:
    import os
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


if __name__ == "__main__":
    try:
        result = main(load_config())
    except (ConfigError, DataError, ModelLoadError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
