"""QLoRA fine-tuning: a 4-bit NF4 base, LoRA adapters, and a loop you can read top to bottom.

    python train.py                                   # embedded SmolLM2-135M-Instruct on built-in SQL data
    python train.py --config configs/llama2-7b-guanaco.yaml
    accelerate launch train.py --config configs/default.yaml --max_steps 200

Every `--key value` overrides a field of `qlora.config.Config`.

The file is the whole run, in order: `setup` builds everything (accelerator, data, model, optimizer)
and checks every input before anything is written; `restore` continues a checkpoint; `fit` is the
loop; `train_step` is one optimizer step (benchmarks/bench.py times this very function); `finish`
saves the adapter. The usual edits each live in one place: the loss of a micro-batch in
`micro_batch_loss` (every path runs it: eager, CUDA graph, FSDP2, eval), the schedule in
`qlora.training.optim.lr_at`, the optimizer in `qlora.training.optim.make_optimizer`, what an eval pass
measures in `eval_loss` (README, "Changing the loop").
"""

from __future__ import annotations

import math
import sys
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from qlora.config import Config, ConfigError, load_config, save_config
from qlora.data.examples import DataError, load_datasets
from qlora.evaluation.generation import generate_ids
from qlora.model.base import ModelLoadError, load_tokenizer, model_vocab_size
from qlora.model.quant import resolve_compute_dtype
from qlora.model.trainable import count_parameters, describe_speedups, load_model, untrained_adapters
from qlora.signals import StopRequest
from qlora.speed import attention
from qlora.speed.cuda_graphs import GraphedForwardBackward
from qlora.speed.kernels import resolve_kernels
from qlora.speed.lora_fused import dropout_seed
from qlora.speed.switches import Where, check_switches
from qlora.training import determinism
from qlora.training.checkpoint import (CheckpointError, list_checkpoints, load_adapter_weights, load_checkpoint,
                                       resolve_resume, save_adapter, save_training_checkpoint, savable_adapter,
                                       set_rng_state)
from qlora.training.fsdp_checkpoint import layout_problem, restore_sharded_checkpoint, save_sharded_checkpoint
from qlora.training.loss import TokenLoss, mean_token_loss
from qlora.training.optim import STATE_KIND, lr_at, make_optimizer, set_lr, state_kind
from qlora.training.packing import Batches, DataState, eval_batches, model_inputs
from qlora.training.resume import check_output_dir, drop_log_after, resume_problem, resume_warnings, saved_world_size
from qlora.training.telemetry import RunLog, Throughput, allocated_per_rank_gib, format_step, peak_memory_gib, say, sync


class NonFiniteError(RuntimeError):
    pass


@dataclass
class Run:
    """Everything a run holds; built by `setup`, advanced by `fit`."""
    cfg: Config
    accelerator: Any
    tokenizer: Any
    batches: Batches  # this rank's training micro-batches (resumable position in `batches.state`)
    evals: list  # fixed eval micro-batches
    eval_set: list  # eval examples (for the samples at the end)
    model: Any  # the peft model
    loss_model: Any  # TokenLoss(model), prepared by accelerate (DDP/FSDP wrapper)
    optimizer: Any
    params: list  # trainable parameters as the optimizer and clipping see them
    backend: str  # packed-attention backend
    fwd_bwd: Callable  # forward + backward of a micro-batch: `forward_backward`, or its CUDA graph
    log: RunLog
    resume_from: Path | None
    step: int = 0
    skipped: int = 0

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def say(self, msg: str) -> None:
        if self.accelerator.is_main_process:
            say(msg)


# =========================================================================== setup

def setup(cfg: Config) -> Run:
    """Accelerator, data, model, optimizer. Nothing is written to output_dir here: every input is
    checked first, so a run that cannot start leaves an existing output_dir as it was."""
    from accelerate.utils import set_seed

    asked = cfg.compute_dtype
    notes = determinism.configure(cfg, cuda=torch.cuda.is_available() and not _cpu_requested())  # before CUDA starts
    accelerator, cfg = make_accelerator(cfg, log_with=_tracker(cfg))
    device = accelerator.device
    check_switches(cfg, Where(device, accelerator.num_processes, accelerator.is_fsdp2))
    set_seed(cfg.seed)
    out = Path(cfg.output_dir)
    talk = say if accelerator.is_main_process else (lambda *_: None)
    resume_from = resolve_resume(cfg.resume, out, warn=lambda msg: talk(f"warning: {msg}"))
    if check_output_dir(out, resume_from, cfg):  # --resume auto, no checkpoint, this run's folder: start over
        talk(f"resume: no checkpoint in {out}, starting from step 0"
             + (" (its final/ is replaced when this run finishes)" if (out / "final").exists() else ""))
    if resume_from is not None:  # layout, optimizer, batch shape: before the model is even loaded
        check_resumable(resume_from, cfg, accelerator)
        for note in resume_warnings(resume_from, cfg):
            talk(f"warning: {note}")
    talk(f"compute dtype: {cfg.compute_dtype}" + (f" (chosen by 'auto' on this {device.type})" if asked == "auto" else ""))
    for note in notes:
        talk(note)

    # --- data
    tokenizer = load_tokenizer(cfg)
    train_set, eval_set, stats = load_datasets(cfg.datasets, tokenizer, cfg.max_seq_len, cfg.overlong,
                                               cfg.eval_fraction, cfg.seed, cfg.eval_datasets, cfg.system_prompt,
                                               warn=lambda msg: talk(f"warning: {msg}"))
    batches = Batches(train_set, cfg.max_seq_len, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.seed,
                      cfg.packing, rank=accelerator.process_index, world=accelerator.num_processes)
    evals = eval_batches(eval_set, cfg.max_seq_len, cfg.micro_batch_size, tokenizer.pad_token_id, cfg.packing)
    evals = evals[: cfg.eval_batches] if cfg.eval_batches else evals
    talk(f"data: {stats.summary()}; {len(eval_set)} eval examples")
    talk(f"data: {batches.micro_batches_per_epoch()} micro-batches per epoch per rank, packing efficiency "
         f"{batches.efficiency():.1%} ({'packed' if cfg.packing else 'padded'} rows of {cfg.max_seq_len})")
    vocab, top = model_vocab_size(cfg), max(max(e.input_ids) for e in train_set + eval_set)
    if top >= vocab:  # e.g. random:llama2-7b (32000 rows) with the 49152-token SmolLM2 tokenizer
        raise ModelLoadError(f"the data has token id {top} but {cfg.model} has only {vocab} embeddings: use a "
                             "tokenizer that matches the model (--tokenizer) or a model with a larger vocab")

    # --- model and optimizer
    model = load_model(cfg, device, fsdp=accelerator.is_fsdp2)
    backend = attention.use_packed_attention(model, cfg.attn_backend, graphs=cfg.cuda_graphs)
    trainable, total = count_parameters(model)
    talk(f"model: {cfg.model} ({cfg.quant}) trainable {trainable:,} / {total:,} params "
         f"({100 * trainable / total:.3f}%), attention {attention.describe(backend)}, device {device}; {describe_speedups(model)}")
    layerwise = getattr(model, "qlora_layerwise", None)  # qlora/model/layerwise.py built or read it
    if accelerator.is_fsdp2 and layerwise:
        talk("model: read one decoder layer at a time" + ("" if not layerwise["parked_on"] else
             f", each held on {layerwise['parked_on']} until FSDP2 moves this rank's shard to the GPU"))
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, accelerator.is_fsdp2)
    loss_model, optimizer, params, fwd_bwd = prepare_objective(cfg, accelerator, model, optimizer,
                                                               tokenizer.pad_token_id, talk)
    return Run(cfg, accelerator, tokenizer, batches, evals, eval_set, model, loss_model, optimizer, params,
               backend, fwd_bwd, RunLog(out, enabled=accelerator.is_main_process), resume_from)


def prepare_objective(cfg: Config, accelerator, model, optimizer, pad_id: int, talk=say):
    """The loss module (`TokenLoss`) and optimizer prepared by accelerate, the trainable parameters as
    clipping sees them, and the forward+backward to run (one CUDA graph with `cuda_graphs`).
    benchmarks/bench.py uses it too."""
    kernels = resolve_kernels(cfg.kernels, accelerator.device, accelerator.is_fsdp2)
    ce = "liger" if kernels == "liger" and not cfg.cuda_graphs else "fused"  # no logits kept: TokenLoss
    token_loss = TokenLoss(model, ce, dropout_seed(model), cfg.ce_kernel)
    talk("loss head: " + token_loss.head_path(accelerator.device))
    loss_model, optimizer = accelerator.prepare(token_loss, optimizer)
    # FSDP2 swaps every parameter for a sharded DTensor: clip (and gather) the prepared ones
    params = [p for p in loss_model.parameters() if p.requires_grad]
    fwd_bwd = forward_backward
    if cfg.cuda_graphs:  # the same seam, captured: looked up at each capture, so an edit always counts
        fwd_bwd = GraphedForwardBackward(params, cfg.max_seq_len, cfg.micro_batch_size, pad_id,
                                         getattr(torch, cfg.compute_dtype), lambda m, x: micro_batch_loss(m, x), talk)
    return loss_model, optimizer, params, fwd_bwd


def make_accelerator(cfg: Config, log_with=None) -> tuple[Any, Config]:
    """The Accelerator (bf16 autocast on CUDA) and `cfg` with `compute_dtype: auto` resolved for this
    device, so config.yaml and the adapter record what really ran. benchmarks/bench.py uses it too."""
    from accelerate import Accelerator

    on_cuda = torch.cuda.is_available() and not _cpu_requested()
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    cfg = replace(cfg, compute_dtype=str(dtype).removeprefix("torch."))
    mixed = "bf16" if on_cuda and dtype == torch.bfloat16 else "no"
    return Accelerator(mixed_precision=mixed, log_with=log_with, project_dir=cfg.output_dir, cpu=not on_cuda), cfg


def check_resumable(path: Path, cfg: Config, accelerator) -> None:
    """Refuse checkpoint `path` if this run cannot continue it exactly: another layout (FSDP or not, number
    of processes), another optimizer (its state loads without complaint and fails only at the first
    step) or another micro_batch_size or grad_accum (the saved data position counts in them)."""
    world = accelerator.num_processes
    problem = layout_problem(path, accelerator.is_fsdp2, world)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")
    was = saved_world_size(path)
    if not accelerator.is_fsdp2 and was is not None and was != world:  # each rank's data shard and RNG stream
        raise CheckpointError(f"checkpoint {path} was written by {was} processes, this run has {world}: resume with "
                              "the same number")
    problem = resume_problem(path, cfg)
    if problem:
        raise CheckpointError(f"checkpoint {path} cannot be resumed: {problem}")


def restore(run: Run, path: Path) -> None:
    """Continue the run saved in checkpoint `path`: adapter, optimizer, RNG, step and data position
    (under FSDP2 each rank its own shard of them)."""
    acc = run.accelerator
    check_resumable(path, run.cfg, acc)
    if acc.is_fsdp2:
        state = restore_sharded_checkpoint(path, run.cfg, acc, acc.unwrap_model(run.loss_model).model,
                                           run.optimizer, run.cfg.resume_force)
    else:
        state, optim_state, rng = load_checkpoint(path, run.cfg, run.cfg.resume_force)
        saved, want = state_kind(optim_state), STATE_KIND.get(run.cfg.optimizer)
        if None not in (saved, want) and saved != want:  # a checkpoint without config.yaml: its state's keys tell
            raise CheckpointError(f"checkpoint {path} cannot be resumed: its optimizer.pt does not fit optimizer "
                                  f"'{run.cfg.optimizer}' (it holds {saved} state): resume with the optimizer it "
                                  "was saved with")
        load_adapter_weights(run.model, path)
        try:
            run.optimizer.load_state_dict(optim_state)
        except (ValueError, KeyError) as e:  # the same optimizer, saved for other trainable tensors
            why = str(e).partition(": resume with")[0]  # the advice is given once, here
            raise CheckpointError(f"checkpoint {path} cannot be resumed: its optimizer.pt does not fit optimizer "
                                  f"'{run.cfg.optimizer}' ({why}): resume with the optimizer and LoRA config it was "
                                  "saved with") from None
        set_rng_state(rng.get(f"rank{acc.process_index}", rng))
    run.step, run.skipped = state["step"], state.get("skipped_steps", 0)
    run.batches.state = DataState(**state["data"])
    seed = dropout_seed(run.model)
    if seed is not None:  # seeded dropout's counter, advanced once per training micro-batch: where it was
        seed.add_(run.step * run.cfg.grad_accum)
    run.say(f"resume: from {path} at step {run.step} (epoch {run.batches.state.epoch}, "
            f"micro-batch {run.batches.state.index})")


def open_output(run: Run) -> None:
    """The run is known to start: only now is output_dir created and its config.yaml written."""
    acc = run.accelerator
    if acc.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        if run.resume_from is None or run.resume_from.parent.resolve() == run.out.resolve():
            drop_log_after(run.out / "log.jsonl", run.step)  # this run's log: nothing after where it continues
        save_config(run.cfg, run.out / "config.yaml")
    acc.wait_for_everyone()
    setup_gib = allocated_per_rank_gib(acc, run.device)  # weights, adapters, optimizer: before any activation
    if setup_gib:
        run.say(f"memory: {', '.join(f'{g:.2f}' for g in setup_gib)} GiB allocated per rank after setup")
        run.log.write(kind="setup", allocated_gib_per_rank=setup_gib)
    if acc.log_with:
        acc.init_trackers("qlora", config={k: str(v) for k, v in vars(run.cfg).items()})


# =========================================================================== the step

@dataclass
class StepResult:
    loss: float  # token-mean loss over the whole window (all ranks)
    grad_norm: float  # before clipping
    n_supervised: int  # supervised tokens in the window (all ranks)
    stepped: bool  # False: the loss or gradient was not finite, so no update was made


def micro_batch_loss(loss_model, inputs: dict) -> torch.Tensor:
    """The training objective of one micro-batch: the *sum* of token cross-entropies over its supervised
    positions. `inputs` is the micro-batch on the device (`input_ids`, `position_ids`, `targets`,
    `sup_index` and the attention inputs). Add a loss term here (README, "Changing the loop"): every path
    calls this function: the eager step, the CUDA-graph capture, FSDP, the eval passes and bench.py.
    `train_step` divides the sum by the supervised tokens of the whole window."""
    return loss_model(**inputs)


def forward_backward(accelerator, loss_model, batch: dict, backend: str, scale: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one micro-batch (gradients accumulate); returns its summed loss, detached.
    `qlora.speed.cuda_graphs.GraphedForwardBackward` runs the same `micro_batch_loss` as one captured CUDA graph."""
    loss_sum = micro_batch_loss(loss_model, model_inputs(batch, backend, accelerator.device))
    accelerator.backward(loss_sum * scale)
    return loss_sum.detach()


def train_step(accelerator, loss_model, optimizer, params: list, micro: list[dict], lr: float,
               max_grad_norm: float, backend: str, fwd_bwd: Callable = forward_backward) -> StepResult:
    """One optimizer step over the accumulation window `micro` (this rank's micro-batches).

    The gradient is the exact token mean over the window and all ranks: each micro-batch's summed
    loss is divided by the window's supervised-token count (not a mean of micro-batch means).
    Gradients are synchronised once, on the last micro-batch. A non-finite loss or gradient norm
    makes no update (`stepped` False); the caller decides whether that stops the run."""
    device = accelerator.device
    n_sup = accelerator.reduce(torch.tensor(sum(b["n_supervised"] for b in micro), device=device), "sum")
    set_lr(optimizer, lr)
    scale = accelerator.num_processes / n_sup  # DDP averages gradients over ranks: this makes the global token mean
    window_loss = torch.zeros((), device=device)
    for i, batch in enumerate(micro):
        with accelerator.no_sync(loss_model) if i < len(micro) - 1 else nullcontext():
            window_loss += fwd_bwd(accelerator, loss_model, batch, backend, scale)
    grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm or float("inf")))
    loss = (accelerator.reduce(window_loss, "sum") / n_sup).item()  # one host sync per step
    stepped = math.isfinite(loss) and math.isfinite(grad_norm)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, int(n_sup), stepped)


def eval_loss(run: Run) -> float:
    """What an eval pass measures: `micro_batch_loss` (your terms included) in eval mode, no dropout, as a
    token mean over the fixed eval micro-batches."""
    loss_model = run.accelerator.unwrap_model(run.loss_model)
    loss, _ = mean_token_loss(loss_model, run.evals, lambda b: micro_batch_loss(loss_model, model_inputs(
        b, run.backend, run.device)))
    return loss


# =========================================================================== the loop

def fit(run: Run) -> dict:
    """Train from `run.step` to `cfg.max_steps`: step, log, eval, checkpoint; a stop signal (SIGTERM,
    Ctrl-C) on any rank ends in a checkpoint on every rank."""
    cfg, acc = run.cfg, run.accelerator
    speed, last = Throughput(), {}
    # the bar only on a terminal: in a log file the per-step lines say the same without the redraws
    bar = tqdm(total=cfg.max_steps, initial=run.step, disable=not (acc.is_main_process and sys.stderr.isatty()),
               desc="train", dynamic_ncols=True)
    run.loss_model.train()
    with StopRequest() as stop:
        if run.evals and run.step == 0:  # the baseline every later eval is compared with
            log_eval(run, 0, eval_loss(run))
        speed.read()
        while run.step < cfg.max_steps:
            micro = [run.batches.next() for _ in range(cfg.grad_accum)]
            res = train_step(acc, run.loss_model, run.optimizer, run.params, micro, lr_at(run.step, cfg),
                             cfg.max_grad_norm, run.backend, run.fwd_bwd)
            for b in micro:
                speed.add(b["n_tokens"], b["n_supervised"])
            if not res.stepped:
                handle_nonfinite(run, res)
            run.step += 1
            bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                last = log_step(run, res, micro, speed)
                bar.set_postfix(loss=f"{res.loss:.4f}", lr=f"{last['lr']:.1e}")
            if run.evals and (due(run.step, cfg.eval_every) or run.step == cfg.max_steps):
                last["eval_loss"] = log_eval(run, run.step, eval_loss(run))
                speed.read()  # keep eval time out of tokens/s
            stop_now = stop.agreed(acc)
            if due(run.step, cfg.save_every) or stop_now:
                checkpoint(run)
            if stop_now:
                run.say(f"{stop.signal_name or 'stop'}: checkpoint at step {run.step} written; resume with "
                        "--resume auto")
                bar.close()
                acc.end_training()
                return {**last, "stopped": True}
    bar.close()
    return last


def due(step: int, every: int) -> bool:
    return bool(every) and step % every == 0


def handle_nonfinite(run: Run, res: StepResult) -> None:
    """Stop with the last good checkpoint named, or count the skipped step (`skip_nonfinite`)."""
    if not run.cfg.skip_nonfinite:
        good = list_checkpoints(run.out)
        raise NonFiniteError(f"non-finite loss ({res.loss}) or grad norm ({res.grad_norm}) at step {run.step + 1}; "
                             f"last good checkpoint: {good[-1][1] if good else 'none'} "
                             "(lower lr, check the data, or set --skip_nonfinite true)")
    run.skipped += 1
    run.say(f"step {run.step + 1}: non-finite loss or gradient, skipped ({run.skipped} so far)")


def log_step(run: Run, res: StepResult, micro: list[dict], speed: Throughput) -> dict:
    """One log line, one log.jsonl record and the trackers, all with the same numbers."""
    acc = run.accelerator
    sync(run.device)
    tok_s, sup_s, _ = speed.read()
    rec = {"step": run.step, "loss": res.loss, "lr": lr_at(run.step - 1, run.cfg), "grad_norm": res.grad_norm,
           "tokens_per_s": tok_s * acc.num_processes, "supervised_tokens_per_s": sup_s * acc.num_processes,
           "supervised_tokens": res.n_supervised, "epoch": run.batches.state.epoch,
           "packing_efficiency": sum(b["n_tokens"] for b in micro) / sum(b["capacity"] for b in micro),
           "peak_mem_gib": peak_memory_gib(run.device), "skipped_steps": run.skipped}
    run.say(format_step(rec))
    run.log.write(kind="train", **rec)
    acc.log({f"train/{k}": v for k, v in rec.items() if k != "step"}, step=run.step)
    return rec


def log_eval(run: Run, step: int, loss: float) -> float:
    run.say(f"eval  {step:>5} | eval loss {loss:.4f} | ppl {math.exp(min(loss, 700)):.2f}")
    run.log.write(kind="eval", step=step, eval_loss=loss)
    run.accelerator.log({"eval/loss": loss}, step=step)
    return loss


def checkpoint(run: Run) -> None:
    """checkpoint-<step>/ with everything `restore` needs (a collective: every rank calls it)."""
    state = {"step": run.step, "data": vars(run.batches.state), "skipped_steps": run.skipped}
    save = save_sharded_checkpoint if run.accelerator.is_fsdp2 else save_training_checkpoint  # FSDP2: a shard per rank
    path = save(run.accelerator, run.loss_model, run.optimizer, run.tokenizer, run.cfg, run.out, state)
    if path is not None:
        run.say(f"checkpoint: {path}")


# =========================================================================== finish

def finish(run: Run) -> None:
    """Save the final adapter, name any adapter that never trained, and answer a few held-out prompts."""
    acc, final = run.accelerator, run.out / "final"
    adapter = savable_adapter(acc, run.loss_model)  # collective under FSDP
    if acc.is_main_process:
        save_adapter(adapter, run.tokenizer, run.cfg, final)
        run.say(f"saved: adapter in {final}")
        frozen = untrained_adapters(run.model)
        if frozen:
            run.say(f"warning: {len(frozen)} LoRA adapters never moved from their zero init (no gradient reached "
                    f"them): {', '.join(frozen[:6])}{' ...' if len(frozen) > 6 else ''}")
        samples(run)
    acc.wait_for_everyone()
    acc.end_training()


def samples(run: Run) -> None:
    """Greedy answers to the first `sample_prompts` held-out prompts (main process)."""
    if not (run.cfg.sample_prompts and run.eval_set):
        return
    if run.accelerator.is_fsdp2:  # generating on one rank would wait forever for the others' shards
        run.say(f"samples: skipped under FSDP; try the adapter with: python generate.py --adapter {run.out / 'final'}")
        return
    model = run.accelerator.unwrap_model(run.loss_model).model
    for i, ex in enumerate(run.eval_set[: run.cfg.sample_prompts], 1):
        prompt = ex.input_ids[: next(j for j, t in enumerate(ex.labels) if t != -100)]
        answer = generate_ids(model, run.tokenizer, [prompt], run.cfg.max_new_tokens, run.device)[0]
        question = run.tokenizer.decode(prompt, skip_special_tokens=True).strip()
        run.say(f"--- sample {i} (prompt, last 300 characters)\n{question[-300:]}\n>>> {answer}")


# =========================================================================== main

def main(cfg: Config) -> dict:
    """setup -> restore (if resuming) -> fit -> finish; returns the last log record."""
    run = setup(cfg)
    if run.resume_from is not None:
        restore(run, run.resume_from)
    open_output(run)
    result = fit(run)
    if not result.get("stopped"):
        finish(run)
    return result


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
        main(load_config())
    except (ConfigError, DataError, ModelLoadError, CheckpointError, NonFiniteError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
