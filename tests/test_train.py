"""The training step and the loop: exact accumulation, adapters that reload, the 4-bit path learning,
and end-to-end runs of train.py and generate.py."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import train
from qlora.speed import attention
from qlora.training.checkpoint import save_adapter
from qlora.data.examples import load_datasets
from qlora.model.base import load_base_model
from qlora.training.loss import TokenLoss, supervised_logits
from qlora.model.trainable import load_model
from qlora.training.packing import collate, model_inputs

from conftest import ROOT, tiny_cfg
from helpers import lora_params, randomise_lora_, with_logits_term

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sql_examples(tok):
    train, _, _ = load_datasets(["builtin:sql"], tok, 256, "drop", 0.0, seed=0)
    return train


class GradRecorder(torch.optim.Optimizer):
    """An optimizer whose step() only records the gradients it was given (no update)."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.0})
        self.seen = []

    def step(self, closure=None):
        self.seen.append({id(p): p.grad.clone() for g in self.param_groups for p in g["params"]})


def step_grads(model, micro):
    """The gradients train.train_step hands to the optimizer for the window `micro`, by parameter name."""

    loss_model = TokenLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = GradRecorder(params)
    res = train.train_step(Accelerator(cpu=True), loss_model, opt, params, micro, 0.0, 0.0, "sdpa")
    assert res.stepped
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[i]: g for i, g in opt.seen[-1].items()}, res


def test_accumulation_equals_one_big_batch(sql_examples):
    """train_step over 3 micro-batches of unequal supervised-token counts gives the gradient of one big
    batch: the exact token mean over the window, not a mean of micro-batch means."""
    cfg = tiny_cfg()
    model = load_model(cfg, torch.device("cpu"))
    randomise_lora_(model)
    attention.use_packed_attention(model, "sdpa")
    exs = sql_examples[:6]
    big = collate([[e] for e in exs], pad_id=0)
    small = [collate([[exs[0]]], 0), collate([[exs[1]], [exs[2]], [exs[3]]], 0), collate([[exs[4]], [exs[5]]], 0)]
    counts = [b["n_supervised"] for b in small]
    assert len(set(counts)) > 1  # unequal supervised tokens per micro-batch: a mean of means would differ
    (g_big, r_big), (g_acc, r_acc) = step_grads(model, [big]), step_grads(model, small)
    assert r_big.n_supervised == r_acc.n_supervised == sum(counts)
    assert abs(r_big.loss - r_acc.loss) <= 1e-5 * abs(r_big.loss)
    for n in g_big:
        scale = g_big[n].abs().max().item()
        assert scale > 0
        assert (g_big[n] - g_acc[n]).abs().max().item() <= 1e-5 * max(1.0, scale), n
    # and the naive mean of micro-batch means is measurably different (the test can fail)
    model.zero_grad(set_to_none=True)
    lm = TokenLoss(model)
    for b in small:
        (train.micro_batch_loss(lm, model_inputs(b, "sdpa", CPU)) / b["n_supervised"] / 3).backward()
    naive = {n: p.grad for n, p in lora_params(model).items()}
    assert max((naive[n] - g_big[n]).abs().max().item() for n in g_big) > 1e-4


def test_saved_adapter_reloads_with_peft_and_reproduces_logits(tmp_path, tok):
    from peft import PeftModel

    cfg = tiny_cfg(tmp_path)
    model = load_model(cfg, torch.device("cpu"))
    randomise_lora_(model, seed=1)
    model.eval()
    ids = torch.randint(0, 1000, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_adapter(model, tok, cfg, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "config.yaml", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    base = load_base_model(cfg, torch.device("cpu"))  # same seed -> same random base
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = reloaded(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # the adapter matters: without it the logits differ
        with reloaded.disable_adapter():
            assert not torch.allclose(reloaded(input_ids=ids).logits, want, atol=1e-3)


def test_4bit_path_trains_and_loss_falls(tmp_path):
    """The real embedded model (SmolLM2-135M-Instruct) in NF4 through bitsandbytes on CPU, paged 8-bit
    AdamW (unpaged fallback on CPU), checkpointing and LoRA dropout: the whole QLoRA path, learning."""
    import train

    cfg = tiny_cfg(tmp_path, model="smollm2", quant="nf4", compute_dtype="auto", optimizer="paged_adamw_8bit",
                   lr=1e-3, max_steps=8, warmup_steps=1, eval_every=8, eval_batches=2, save_every=0,
                   micro_batch_size=2, max_seq_len=320, recompute=True, lora_dropout=0.05)
    result = train.main(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if r["kind"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    assert result["eval_loss"] < losses[0]
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()


def run(args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


@pytest.mark.slow
def test_train_py_end_to_end_then_generate(tmp_path):
    out = tmp_path / "e2e"
    r = run(["train.py", "--model", "random:tiny", "--quant", "nf4", "--max_steps", "4", "--save_every", "2",
             "--eval_every", "2", "--max_seq_len", "256", "--micro_batch_size", "2", "--grad_accum", "2",
             "--output_dir", str(out), "--tracker", "tensorboard", "--sample_prompts", "1", "--max_new_tokens", "5"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step     4 | loss" in r.stderr and "eval      4 | eval loss" in r.stderr and "--- sample" in r.stderr
    # ce_kernel is on by default; on the CPU the start-up line says the loss head runs torch ops
    assert "loss head: fused linear + cross-entropy in chunks, softmax and logits gradient by torch ops" in r.stderr
    final = out / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "config.yaml").is_file()
    assert (out / "config.yaml").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert list(out.rglob("events.out.tfevents*")), "tensorboard tracker wrote nothing"
    from safetensors.torch import load_file

    from qlora.model.trainable import untrained_adapters
    assert untrained_adapters(load_file(str(final / "adapter_model.safetensors"))) == []  # every LoRA B moved
    assert "never moved" not in r.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    rec = [r for r in log if r["kind"] == "train"][-1]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gib", "packing_efficiency", "supervised_tokens"):
        assert rec[key] > 0, key
    g = run(["generate.py", "--adapter", str(final), "--prompt", "How many rows?", "--max_new_tokens", "4"])
    assert g.returncode == 0, g.stderr[-3000:]
    assert ">>> How many rows?" in g.stdout


def test_errors_end_with_one_clear_message(tmp_path):
    r = run(["train.py", "--model", "random:tiny", "--max_stepz", "3"])
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'max_stepz'")
    assert "Traceback" not in r.stderr
    r = run(["train.py", "--model", "random:tiny", "--datasets", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "o")])
    assert r.returncode == 2 and "data file" in r.stderr and "none.jsonl not found" in r.stderr
    assert "Traceback" not in r.stderr


# --- "Changing the loop" (README): each common edit has one place, and the loop really uses it

def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_recipe_loss_term_reaches_the_gradient_and_the_eval_loss(sql_examples, monkeypatch):
    """The README's loss-term recipe (c * mean(logits**2) over supervised positions, added in
    `micro_batch_loss`) moves the step's gradient by exactly the term's own gradient over the window's
    supervised tokens, the logged loss by the term's value, and an eval pass (`eval_loss`) by the same."""
    model = load_model(tiny_cfg(), CPU)
    randomise_lora_(model, seed=2)
    attention.use_packed_attention(model, "sdpa")
    micro = [collate([[e] for e in sql_examples[:3]], 0)]
    n_sup, c = micro[0]["n_supervised"], 30.0  # a term whose gradient is of the cross-entropy's size
    lm = TokenLoss(model)
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), loss_model=lm, evals=micro, backend="sdpa", device=CPU)
    g_plain, plain = step_grads(model, micro)
    eval_plain = train.eval_loss(run)
    # the term alone, by autograd; in eval mode too (no dropout there)
    lm.eval()
    with torch.no_grad():
        lm(**model_inputs(micro[0], "sdpa", CPU))
        logits, real = supervised_logits(lm)
        term_eval = c * (logits.pow(2).mean(-1) * real).sum()
    model.zero_grad(set_to_none=True)
    lm.train()
    lm(**model_inputs(micro[0], "sdpa", CPU))
    logits, real = supervised_logits(lm)
    term = c * (logits.pow(2).mean(-1) * real).sum()
    (term / n_sup).backward()
    g_term = {n: p.grad.clone() for n, p in lora_params(model).items()}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(train, "micro_batch_loss", with_logits_term(train.micro_batch_loss, c))
    g_added, added = step_grads(model, micro)
    assert added.loss - plain.loss == pytest.approx(term.item() / n_sup, abs=1e-6 * plain.loss)
    # the summed fp32 loss rounds at ~1.2e-7 of itself: a few of those ulps of the eval loss
    assert train.eval_loss(run) - eval_plain == pytest.approx(term_eval.item() / n_sup, abs=1e-6 * eval_plain)
    for n in g_plain:  # fp32 summation order: measured max 1.9e-6 of the tensor's largest gradient
        scale = g_plain[n].abs().max().item()
        assert g_term[n].abs().max() > 1e-2 * scale, n
        assert (g_added[n] - g_plain[n] - g_term[n]).abs().max() <= 1e-5 * scale, n


def test_recipe_schedule_is_read_from_lr_at(tmp_path, monkeypatch):
    """The schedule is `lr_at`: a zero schedule logs lr 0 and leaves every LoRA B at its zero init."""
    monkeypatch.setattr(train, "lr_at", lambda step, cfg: 0.0)
    train.main(tiny_cfg(tmp_path, max_steps=2, save_every=0, eval_fraction=0.0))
    assert [r["lr"] for r in _log(tmp_path / "run") if r["kind"] == "train"] == [0.0, 0.0]
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    assert all(not v.any() for k, v in saved.items() if "lora_B" in k)


def test_recipe_optimizer_comes_from_make_optimizer(tmp_path, monkeypatch):
    """The optimizer is `make_optimizer`'s: with plain SGD one step moves LoRA B (zero at init) by exactly
    -lr * the gradient train_step handed it."""
    made = []

    class SGDSpy(torch.optim.SGD):
        def step(self, closure=None):
            self.grads = {id(p): p.grad.clone() for g in self.param_groups for p in g["params"]}
            return super().step(closure)

    def make(params, cfg, fsdp=False):
        made.append(SGDSpy(list(params), lr=cfg.lr))
        return made[-1]

    monkeypatch.setattr(train, "make_optimizer", make)
    cfg = tiny_cfg(tmp_path, max_steps=1, save_every=0, eval_fraction=0.0, max_grad_norm=0.0, lr=0.1)
    train.main(cfg)
    assert len(made) == 1
    from safetensors.torch import load_file
    saved = load_file(str(tmp_path / "run" / "final" / "adapter_model.safetensors"))
    params = [p for g in made[0].param_groups for p in g["params"]]
    b_grads = [made[0].grads[id(p)] for p in params if p.shape[1] == cfg.lora_r]  # lora_B: (out, r)
    b_saved = [v for k, v in sorted(saved.items()) if "lora_B" in k]
    from qlora.training.optim import lr_at
    lr0 = lr_at(0, cfg)
    assert len(b_grads) == len(b_saved) > 0
    for want in b_grads:  # each saved B is -lr0 * one of the recorded B gradients
        assert any(v.shape == want.shape and torch.allclose(v, -lr0 * want, atol=1e-7) for v in b_saved)


def test_recipe_eval_is_eval_loss(tmp_path, monkeypatch):
    """What an eval pass measures is `eval_loss(run)`: its value is what is logged, at step 0, every
    eval_every steps and at the end."""
    monkeypatch.setattr(train, "eval_loss", lambda run: 1.25 + run.step)
    train.main(tiny_cfg(tmp_path, max_steps=4, eval_every=3, save_every=0))
    evals = [(r["step"], r["eval_loss"]) for r in _log(tmp_path / "run") if r["kind"] == "eval"]
    assert evals == [(0, 1.25), (3, 4.25), (4, 5.25)]
