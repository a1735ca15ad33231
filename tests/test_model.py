"""qlora.model.trainable and qlora.model.quant: the guard that keeps bitsandbytes' CPU inference repack away from every
4-bit linear (an eval pass must not stop the gradient), untrained-adapter detection, a clear error for
a LoRA target the model lacks, and the cached `compute_dtype: auto` choice.

bitsandbytes decides per layer, from the CPU's flags, whether an eval-mode forward without grad
repacks the weight for its bf16 kernel (`qlora.model.quant.REPACK_FLAG`). Setting that flag on by hand makes
any CPU take the AVX512-BF16 CPUs' decision, so the guard is tested on AVX2-only CPUs too."""

from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

import train

from qlora.speed import attention
from qlora.model import quant
from qlora.training.loss import TokenLoss
from qlora.model.base import ModelLoadError, load_base_model
from qlora.model.trainable import add_lora, load_model, untrained_adapters
from qlora.training.packing import collate
from qlora.model.quant import REPACK_FLAG, guard_cpu_4bit_repack, is_repacked, linears_4bit, unguarded_4bit_linears

from badinput import FAST_TRAIN, assert_one_error, run_cli, snapshot
from conftest import tiny_cfg
from helpers import lora_params, randomise_lora_

CPU = torch.device("cpu")
QV = ["q_proj", "v_proj"]
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def batches(tok):
    from qlora.data.examples import load_datasets

    examples = load_datasets(["builtin:sql"], tok, 256, "drop", 0.0, seed=0)[0]
    return [collate([[e] for e in examples[i:i + 2]], pad_id=0) for i in (0, 2)]


def qv_model(**kw):
    """random:tiny NF4 with LoRA on q and v only: k, o, gate, up, down are plain 4-bit linears, and the
    q/v adapters' gradient must pass back through them."""
    model = load_model(tiny_cfg(quant="nf4", lora_targets=QV, **kw), CPU)
    attention.use_packed_attention(model, "sdpa")
    randomise_lora_(model)  # B != 0, so A has a gradient too
    return model


def eval_pass(model, batches) -> None:
    """train.py's eval pass itself (`eval_loss`: eval mode, no grad, the loss seam)."""
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), loss_model=TokenLoss(model), evals=batches[:1],
                          backend="sdpa", device=CPU)
    train.eval_loss(run)


def backward_once(model, batches) -> None:
    """loss.backward() over `batches` in training mode (gradients may stay None: no helper that clones them)."""
    lm = TokenLoss(model.train())
    for b in batches:
        lm(b["input_ids"], b["position_ids"], b["targets"], b["sup_index"],
           **attention.packing_kwargs(b["position_ids"], "sdpa")).backward()


def lora_grads(model, batches) -> dict:
    """The LoRA gradients of one backward over `batches` (zeros where none arrived)."""
    model.zero_grad(set_to_none=True)
    backward_once(model, batches)
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in lora_params(model).items()}


def force_repack_flag(model) -> None:
    """Undo the guard: every layer decides as bitsandbytes does on an AVX512-BF16 CPU."""
    for _, m in linears_4bit(model):
        setattr(m, REPACK_FLAG, True)


# --------------------------------------------------------------------------- the guard


@pytest.mark.parametrize("fused", [True, False])
def test_an_eval_pass_leaves_the_gradients_bitwise_unchanged(batches, fused):
    """Fails without the guard on an AVX512-BF16 CPU: after the eval pass no gradient reaches the q/v
    adapters through the unfused 4-bit linears."""
    before = lora_grads(qv_model(fused_lora=fused), batches)
    model = qv_model(fused_lora=fused)
    eval_pass(model, batches)
    after = lora_grads(model, batches)
    assert before.keys() == after.keys() and len(after) == 2 * 2 * 2  # A and B of q and v, 2 layers
    for name in before:
        assert after[name].abs().max() > 0, f"no gradient reached {name} after an eval pass"
        assert torch.equal(after[name], before[name]), name
    assert not any(is_repacked(m) for _, m in linears_4bit(model))


@pytest.mark.filterwarnings("ignore:.*gemv_4bit")  # torch: the op has no autograd kernel
def test_without_the_guard_an_eval_pass_breaks_training(batches):
    """The failure the guard prevents, with bitsandbytes' AVX512-BF16 decision forced on: one eval pass
    repacks every plain 4-bit linear in place, and training afterwards is wrong on every CPU. Where
    bitsandbytes has its bf16 CPU kernel (AVX512-BF16), that kernel has no backward: no gradient reaches an
    adapter upstream, and the untrained-adapter check names every q/v B. Elsewhere bitsandbytes' fallback
    kernel reads the repacked bytes in the plain layout: the base weights, and so every gradient, are wrong."""
    from bitsandbytes.functional import has_avx512bf16

    guarded = lora_grads(qv_model(fused_lora=True), batches)
    model = qv_model(fused_lora=True)
    force_repack_flag(model)
    eval_pass(model, batches)
    plain = [n for n, m in linears_4bit(model) if not n.endswith(("q_proj.base_layer", "v_proj.base_layer"))]
    assert len(plain) == 2 * 5
    repacked = [n for n, m in linears_4bit(model) if is_repacked(m)]
    # if this fails, bitsandbytes no longer repacks through REPACK_FLAG: the guard needs updating
    assert repacked == plain
    broken = lora_grads(model, batches)
    assert broken.keys() == guarded.keys()
    if not has_avx512bf16():
        # far beyond rounding: the guarded path and a second guarded model agree bit for bit (test above)
        for n in guarded:
            assert float((broken[n] - guarded[n]).abs().max()) > 1e-2 * float(guarded[n].abs().max()), n
        return
    assert not any(g.any() for g in broken.values())
    # one optimizer step from B = 0: the adapters that got no gradient stay exactly at zero
    fresh = qv_model(fused_lora=True)
    with torch.no_grad():
        for n, p in lora_params(fresh).items():
            if "lora_B" in n:
                p.zero_()
    force_repack_flag(fresh)
    eval_pass(fresh, batches)
    opt = torch.optim.AdamW(lora_params(fresh).values(), lr=1e-2)
    backward_once(fresh, batches)
    opt.step()
    assert sorted(untrained_adapters(fresh)) == sorted(n for n in lora_params(fresh) if "lora_B" in n)


@pytest.mark.parametrize("kw", [dict(lora_targets=QV), dict(lora_targets=QV, fused_lora=False),
                                dict(lora_targets=ALL7, recompute=True),
                                dict(lora_targets=ALL7, fused_lora=False)])
def test_every_4bit_linear_of_a_training_model_is_guarded(kw):
    """On any CPU: every Linear4bit of a loaded training model has the repack turned off."""
    model = load_model(tiny_cfg(quant="nf4", **kw), CPU)
    assert len(linears_4bit(model)) == 2 * 7
    assert unguarded_4bit_linears(model) == []
    force_repack_flag(model)
    assert len(unguarded_4bit_linears(model)) == 2 * 7  # the check sees a layer without the guard


def test_models_loaded_from_a_directory_are_guarded(tmp_path):
    """The transformers + BitsAndBytesConfig path (hub ids, local dirs, smollm2) gets the guard too,
    and so does the FSDP training model and quantize_linears_ used on its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora.model.base import random_shape

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**random_shape("tiny"))).save_pretrained(tmp_path / "m")
    base = load_base_model(tiny_cfg(model=str(tmp_path / "m"), quant="nf4"), CPU)
    assert len(linears_4bit(base)) == 2 * 7 and unguarded_4bit_linears(base) == []
    fsdp = load_model(tiny_cfg(quant="nf4", quant_storage="float32"), CPU, fsdp=True)
    assert len(linears_4bit(fsdp)) == 2 * 7 and unguarded_4bit_linears(fsdp) == []
    plain = load_base_model(tiny_cfg(), CPU)
    quant.quantize_linears_(plain, tiny_cfg(quant="nf4"), torch.float32, CPU)
    assert len(linears_4bit(plain)) == 2 * 7 and unguarded_4bit_linears(plain) == []


def test_guarding_a_model_that_was_already_repacked_is_an_error(batches):
    model = qv_model()
    force_repack_flag(model)
    eval_pass(model, batches)
    with pytest.raises(RuntimeError, match="already repacked"):
        guard_cpu_4bit_repack(model)


# --------------------------------------------------------------------------- untrained adapters


def test_untrained_adapters_names_the_lora_b_weights_still_at_zero(tmp_path, batches):
    model = load_model(tiny_cfg(quant="nf4", lora_targets=QV), CPU)
    attention.use_packed_attention(model, "sdpa")
    b_names = sorted(n for n in lora_params(model) if "lora_B" in n)
    assert len(b_names) == 4 and sorted(untrained_adapters(model)) == b_names  # peft's init: B = 0
    opt = torch.optim.AdamW(lora_params(model).values(), lr=1e-3)
    backward_once(model, batches)
    opt.step()
    assert untrained_adapters(model) == []
    frozen = b_names[1]
    with torch.no_grad():
        dict(model.named_parameters())[frozen].zero_()
    assert untrained_adapters(model) == [frozen]
    # the saved adapter (peft's file names, no ".default") is judged the same way
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert untrained_adapters(saved) == [frozen.replace(".default", "")]


# --------------------------------------------------------------------------- lora_targets and compute dtype


def test_an_unknown_lora_target_names_the_key_the_bad_names_and_the_real_ones():
    base = load_base_model(tiny_cfg(), CPU)
    with pytest.raises(ModelLoadError) as e:
        add_lora(base, tiny_cfg(lora_targets=["q_proj", "qkv_proj", "mlp"]))
    msg = str(e.value)
    assert "'lora_targets'" in msg and "qkv_proj, mlp" in msg
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in msg


def test_train_with_an_unknown_lora_target_is_one_error_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    before = snapshot(out)
    r = run_cli(["train.py", *FAST_TRAIN, "--lora_targets", "q_proj,qkv", "--output_dir", str(out)])
    assert_one_error(r, "lora_targets", "qkv", "q_proj, k_proj")
    assert snapshot(out) == before


def test_auto_compute_dtype_is_timed_once_and_explicit_dtypes_never(monkeypatch):
    calls = []

    def fake_ms(dtype, *a, **k):
        calls.append(dtype)
        return {torch.bfloat16: 1.0, torch.float32: 2.0}[dtype]

    monkeypatch.setattr(quant, "cpu_matmul_ms", fake_ms)
    quant.fastest_cpu_dtype.cache_clear()
    try:
        assert quant.resolve_compute_dtype("float32", CPU) == torch.float32 and calls == []
        assert quant.resolve_compute_dtype("auto", CPU) == torch.bfloat16
        assert quant.compute_dtype_name("auto", CPU) == "bfloat16"
        assert calls == [torch.bfloat16, torch.float32]  # the second call used the cached choice
    finally:
        quant.fastest_cpu_dtype.cache_clear()  # later tests time the real CPU again


def test_a_saved_tokenizer_folder_is_a_tokenizer_source(tok, tmp_path):
    """--tokenizer DIR takes a folder holding only a tokenizer (no model config.json); a folder without
    one is a clear error naming the files it looks for."""
    from qlora.model.base import load_tokenizer

    tok.save_pretrained(tmp_path / "tok")
    got = load_tokenizer(tiny_cfg(tokenizer=str(tmp_path / "tok")))
    text = "SELECT name FROM singer WHERE age > 20"
    assert got(text)["input_ids"] == tok(text)["input_ids"] and got.eos_token_id == tok.eos_token_id
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no tokenizer.json"):
        load_tokenizer(tiny_cfg(tokenizer=str(tmp_path / "empty")))
