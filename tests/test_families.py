"""The model families beside Llama 2 (Llama 3, Mistral, Qwen2.5, Qwen3, Gemma 3, Phi-3) on the CPU, with tiny
random hub-format checkpoints built here (2 layers, each family's own layer kinds, its real chat template
and special tokens on the embedded SmolLM2 tokenizer): response-only masks through each template, packed
rows equal to each example alone (Gemma 3's sliding-window layers and logit soft-capping included),
LoRA targets per family, Qwen2's q/k/v bias in the fused node, exact resume, the liger dispatch, padding for
tokenizers with no pad, and each family's adapter in peft and merged. GGUF files of the families:
tests/test_gguf_restore.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from qlora.speed import attention, kernels
from qlora.model.base import ModelLoadError, load_base_model, load_tokenizer, random_config, resolve_source
from qlora.data.examples import IGNORE, encode, stop_ids
from qlora.training.loss import TokenLoss
from qlora.model.trainable import describe_speedups, load_model
from qlora.training.packing import collate
from qlora.signals import StopRequest

from conftest import tiny_cfg
from helpers import lora_params, randomise_lora_, small_tokenizer

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
        "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first)"
        " %}{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
GEMMA = ("{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}{%- set first_user_prefix = messages[0]['content'] + "
         "'\n\n' -%}{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
         "{%- set loop_messages = messages -%}{%- endif -%}{%- for message in loop_messages -%}"
         "{%- if (message['role'] == 'assistant') -%}{%- set role = \"model\" -%}{%- else -%}"
         "{%- set role = message['role'] -%}{%- endif -%}{{ '<start_of_turn>' + role + '\n' + "
         "(first_user_prefix if loop.first else \"\") }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
         "{%- endfor -%}{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}")
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
PHI3 = ("{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
        "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
        "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")

# family: (random shape, chat template, special tokens, bos, eos, the token that ends an assistant turn)
FAMILIES = {
    "llama3": ("tiny", LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "mistral": ("tiny-mistral", MISTRAL, ["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
    "qwen2": ("tiny-qwen2", QWEN, [], None, "<|im_end|>", "<|im_end|>"),
    "qwen3": ("tiny-qwen3", QWEN, [], None, "<|im_end|>", "<|im_end|>"),
    "gemma3": ("tiny-gemma3", GEMMA, ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
               "<end_of_turn>"),
    "phi3": ("tiny-phi3", PHI3, ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|endoftext|>",
             "<|end|>"),
}
TWO_TURNS = [{"role": "user", "content": "What is 12 times 7?"}, {"role": "assistant", "content": "It is 84."},
             {"role": "user", "content": "And 9 times 8, written out in words?"},
             {"role": "assistant", "content": "Seventy-two, which is 72."}]


def family_dir(root, family: str, vocab: int = 49152, **config_kw):
    """A tiny random checkpoint of `family` (fp32 safetensors, attention_dropout 0) with its tokenizer: the
    SmolLM2 tokenizer's first `vocab` tokens and the family's special tokens."""
    shape, template, specials, bos, eos, _ = FAMILIES[family]
    folder = root / family
    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2"))
    if vocab < 49152:
        tok = small_tokenizer(tok, vocab)
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = template
    tok.eos_token = eos
    if bos:
        tok.bos_token = bos
    config = random_config(shape)
    config.vocab_size = vocab + 64  # room for the added special tokens
    config.update(config_kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    # Gemma 3: a window of 8 tokens (shorter than every example) and soft-capped logits, so both matter
    return {f: family_dir(root, f, **({"final_logit_softcapping": 5.0} if f == "gemma3" else {})) for f in FAMILIES}


def family_cfg(folder, **kw):
    return tiny_cfg(model=str(folder), **kw)


# --------------------------------------------------------------------------- (a) response-only masks

def reference_labels(tok, messages, marker: str) -> list[int]:
    """Supervised token ids by rendering the template with and without each response: the text between
    the generation prompt and the end-of-turn marker (inclusive) of each assistant turn."""
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            spans.append((start, text.index(marker, start) + len(marker)))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return [t for t, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if any(s <= a and b <= e for s, e in spans)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_response_masks_through_the_family_chat_template(families, family):
    tok = load_tokenizer(family_cfg(families[family]))
    marker = FAMILIES[family][5]
    messages = TWO_TURNS  # Phi-3's template ends the conversation with EOS: not after the first turn
    ex, why = encode(messages, tok, 512)
    assert ex is not None, why
    got = [t for t in ex.labels if t != IGNORE]
    want = reference_labels(tok, messages, marker)
    assert got == want, (tok.decode(got), tok.decode(want))
    turns = sum(m["role"] == "assistant" for m in messages)
    assert got.count(tok.convert_tokens_to_ids(marker)) == turns  # each response closed by its marker
    assert tok.decode(got).endswith(marker) and messages[-1]["content"] in tok.decode(got)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_stops_at_the_family_turn_closer(families, family):
    """Training supervises each answer through its turn closer (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`,
    which are not EOS), so a fine-tuned model writes the closer when it is done: every decoding path stops
    there. A model made to write the closer first takes one decode step, not max_new_tokens."""
    from qlora.evaluation.beam_search import beam_grouped
    from qlora.evaluation.generation import generate_ids, prompt_ids
    from qlora.evaluation.shared_prefix import generate_grouped

    tok = load_tokenizer(family_cfg(families[family]))
    closer = tok.convert_tokens_to_ids(FAMILIES[family][5])
    assert stop_ids(tok) == {tok.eos_token_id, closer}
    model = AutoModelForCausalLM.from_pretrained(families[family], dtype=torch.float32)
    calls = []

    def closer_first(module, args, kwargs, out):
        calls.append(1)
        out.logits[..., closer] = out.logits.max() + 100.0
        return out

    model.register_forward_hook(closer_first, with_kwargs=True)
    ids = prompt_ids(tok, "What is 12 times 7?")
    assert generate_grouped(model, tok, {"g": [ids]}, max_new_tokens=8) == {"g": [""]}
    assert len(calls) == 2  # the shared prefix, then one step that writes the closer
    calls.clear()
    assert generate_ids(model, tok, [ids], max_new_tokens=8, device=torch.device("cpu")) == [""]
    assert len(calls) == 1
    calls.clear()
    beam_grouped(model, tok, {"g": [ids]}, max_new_tokens=8, num_beams=2)
    assert len(calls) < 8


# Real special-token layouts with no pad distinct from EOS: Llama 3.1 (no pad, no unk, a pad-named reserved
# token), Llama 3.0 (only reserved tokens), Qwen base models (pad is EOS, no unk), and a tokenizer with
# nothing to spare (padding then holds EOS, which must stay a turn closer and a stop token).
PAD_LAYOUTS = {
    "llama3.1": (["<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"], None, "<|finetune_right_pad_id|>"),
    "llama3.0": (["<|reserved_special_token_0|>", "<|reserved_special_token_1|>"], None,
                 "<|reserved_special_token_0|>"),
    "qwen-base": (["<|fim_pad|>"], "<|eot_id|>", "<|fim_pad|>"),
    "nothing spare": ([], None, "<|eot_id|>"),
}


@pytest.mark.parametrize("layout", list(PAD_LAYOUTS))
def test_a_tokenizer_with_no_pad_but_eos_trains_and_stops_right(families, tmp_path, layout):
    """A tokenizer with no pad distinct from EOS and no unk (every Llama 3; Qwen's base models) loads: the
    padding token is a spare special token where one exists, EOS otherwise; the response mask still ends
    each answer with its closer, generation still stops there, and a padded micro-batch is the same loss
    as each example alone (padding is never attended nor supervised). train.py runs two steps on it."""
    extra, pad, want = PAD_LAYOUTS[layout]
    tok = AutoTokenizer.from_pretrained(families["llama3"])
    tok.add_special_tokens({"additional_special_tokens": extra})
    tok.pad_token, tok.unk_token = pad, None
    folder = tmp_path / "tok"
    tok.save_pretrained(folder)
    cfg = family_cfg(families["llama3"], tokenizer=str(folder))
    tok = load_tokenizer(cfg)
    assert tok.pad_token == want and tok.unk_token is None and tok.eos_token == "<|eot_id|>"
    ex, why = encode(TWO_TURNS, tok, 512)
    assert ex is not None, why
    got = [t for t in ex.labels if t != IGNORE]
    assert got == reference_labels(tok, TWO_TURNS, "<|eot_id|>") and got.count(tok.eos_token_id) == 2
    assert stop_ids(tok) == {tok.eos_token_id}
    model = load_model(family_cfg(families["llama3"]), torch.device("cpu"))
    randomise_lora_(model)
    short, long_ = examples(tok, 2)
    padded = collate([[short], [long_]], tok.pad_token_id)
    assert (padded["input_ids"] == tok.pad_token_id).any()
    loss, _ = loss_and_grads(model, padded, "varlen")
    alone = sum(loss_and_grads(model, collate([[e]], tok.pad_token_id))[0] for e in (short, long_))
    assert torch.allclose(loss, alone, rtol=1e-5), (loss, alone)
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n"
                            for i in range(8)))
    out = train.main(family_cfg(families["llama3"], tokenizer=str(folder), datasets=[str(data)], max_seq_len=64,
                                max_steps=2, save_every=0, eval_every=0, output_dir=str(tmp_path / "run")))
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file(), out
    assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").pad_token == want  # saved beside the adapter


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_adapter_loads_in_peft_and_merges_per_family(families, family, tmp_path):
    """The adapter trained through the fused NF4+LoRA node of each family (Phi-3's fused qkv_proj and
    gate_up_proj as targets, Qwen2's q/k/v bias, Gemma 3's tied embeddings) gives the training model's
    logits through peft's own LoRA layers on the same 4-bit base, and through the merged plain model that
    `qlora.evaluation.merge` writes (loaded by transformers alone)."""
    from peft import PeftModel

    from qlora.evaluation.merge import merge
    from qlora.training.checkpoint import save_adapter

    cfg = family_cfg(families[family], quant="nf4")
    model = load_model(cfg, torch.device("cpu"))
    assert describe_speedups(model).count("fused NF4+LoRA linears 0") == 0
    randomise_lora_(model, seed=1)
    model.eval()
    tok = load_tokenizer(cfg)
    ids = torch.tensor([tok(tok.apply_chat_template(TWO_TURNS, tokenize=False), add_special_tokens=False).input_ids])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_adapter(model, tok, cfg, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_base_model(cfg, torch.device("cpu")), str(tmp_path / "adapter")).eval()
    merge(str(tmp_path / "adapter"), str(tmp_path / "merged"), device="cpu", check_rows=2)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        by_peft, by_merge = reloaded(input_ids=ids).logits, merged(input_ids=ids).logits
        with reloaded.disable_adapter():
            base = reloaded(input_ids=ids).logits
    scale = want.abs().max().item()
    # measured (2-core CPU, fp32 compute), relative to the largest logit: peft 0.0 for every family, merged
    # 7.4e-7 to 1.6e-6 (fp32 rounding of W x + s B A x vs (W + s B A) x), without the adapter 1.4 to 1.9;
    # 1e-4 leaves room for other CPUs' kernels (test_merge.py: ~1e-6 on AVX2 and AVX512-BF16 alike)
    assert (by_peft - want).abs().max().item() <= 1e-4 * scale
    assert (by_merge - want).abs().max().item() <= 1e-4 * scale
    assert (base - want).abs().max().item() > 1e-2 * scale  # the adapter matters


# --------------------------------------------------------------------------- (b) packed == alone

def examples(tok, n=3):
    qs = ["Name a prime number larger than ten and smaller than twenty.", "What colour is the sky on a clear day?",
          "Spell the word cat backwards, letter by letter."]
    rs = ["Thirteen is one; so are 11, 17 and 19.", "It is blue, because air scatters blue light most.",
          "T, a, c: the word is tac."]
    out = [encode([{"role": "user", "content": q}, {"role": "assistant", "content": r}], tok, 512)[0]
           for q, r in zip(qs[:n], rs[:n])]
    assert all(e is not None and len(e.input_ids) > 16 for e in out)  # longer than Gemma's window of 8
    return out


def loss_and_grads(model, batch, backend=None):
    """Summed token loss and LoRA gradients of one micro-batch; `backend` None = transformers' own
    attention on an unpacked row (its own causal and sliding-window masks)."""
    model.zero_grad(set_to_none=True)
    kw = attention.packing_kwargs(batch["position_ids"], backend) if backend else {}
    loss = TokenLoss(model)(batch["input_ids"], batch["position_ids"], batch["targets"], batch["sup_index"], **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lora_params(model).items()}


# tolerance: measured in fp32 on a 2-core CPU, packed vs alone differ by <= 1.9e-7 (loss, relative) and
# <= 9.5e-7 (each gradient, relative to its largest entry) across the six families; 1e-5 leaves room for
# other CPUs' summation order. Dropping Gemma 3's window from the packed path moves its loss by 2.5e-3.
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_row_equals_each_example_alone(families, family):
    cfg = family_cfg(families[family], quant="nf4", compute_dtype="float32")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, torch.device("cpu"))
    assert "fused NF4+LoRA linears 0" not in describe_speedups(model)
    randomise_lora_(model)
    exs = examples(tok)
    packed_loss, packed_grads = loss_and_grads(model, collate([exs], tok.pad_token_id),
                                               attention.use_packed_attention(model, "sdpa"))
    attention.use_default_attention(model, "sdpa")
    alone = [loss_and_grads(model, collate([[e]], tok.pad_token_id, length=len(e.input_ids))) for e in exs]
    want = sum(a[0] for a in alone)
    assert abs(float(packed_loss - want)) <= 1e-5 * float(want)
    for n, g in packed_grads.items():
        ref = sum(a[1][n] for a in alone)
        assert ref.abs().max() > 0, n
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-5 * float(ref.abs().max()), msg=n)


def test_gemma3_window_and_softcap_are_what_the_packed_path_honours(families):
    """The tiny Gemma 3's sliding window changes the result (so the test above checks it) and the loss is
    the cross-entropy of the model's own soft-capped logits."""
    cfg = family_cfg(families["gemma3"], compute_dtype="float32")
    tok = load_tokenizer(cfg)
    model = load_model(cfg, torch.device("cpu"))
    ex = examples(tok, 1)[0]
    batch = collate([[ex]], tok.pad_token_id, length=len(ex.input_ids))
    backend = attention.use_packed_attention(model, "sdpa")
    with torch.no_grad():
        ours = TokenLoss(model)(batch["input_ids"], batch["position_ids"], batch["targets"], batch["sup_index"],
                                **attention.packing_kwargs(batch["position_ids"], backend))
        attention.use_default_attention(model, "sdpa")
        logits = model(input_ids=batch["input_ids"]).logits[0]
        want = F.cross_entropy(logits, batch["targets"][0], reduction="sum")
        assert logits.abs().max() < 5.0  # capped at final_logit_softcapping
        assert float(ours) == pytest.approx(float(want), rel=1e-5)
        base = model.get_base_model()
        base.config.sliding_window = 10_000  # every layer global: another result
        wide = TokenLoss(model)(batch["input_ids"], batch["position_ids"], batch["targets"], batch["sup_index"])
        assert abs(float(wide) - float(want)) > 1e-3 * float(want)


# --------------------------------------------------------------------------- LoRA targets, fused node

def test_phi3_default_targets_are_its_fused_projections(families):
    model = load_model(family_cfg(families["phi3"]), torch.device("cpu"))
    names = {n.split(".")[-4] for n in lora_params(model) if "lora_A" in n}
    assert names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}


def test_a_missing_target_names_the_linears_that_exist(families):
    with pytest.raises(ModelLoadError) as e:
        load_model(family_cfg(families["phi3"], lora_targets=["q_proj", "o_proj"]), torch.device("cpu"))
    msg = str(e.value)
    assert "\n" not in msg and "q_proj is not a linear layer" in msg and "q_proj is part of qkv_proj" in msg
    assert "its linear layers are o_proj, qkv_proj, gate_up_proj, down_proj, lm_head" in msg


def test_fused_node_keeps_qwen2_qkv_bias_exact(families):
    """Qwen2's q/k/v carry a bias: the fused NF4+LoRA node adds it in fp32 and matches peft's path."""
    cfg = family_cfg(families["qwen2"], quant="nf4", compute_dtype="float32")
    tok = load_tokenizer(cfg)
    peft_path, fused = (load_model(family_cfg(families["qwen2"], quant="nf4", compute_dtype="float32",
                                              fused_lora=f), torch.device("cpu")) for f in (False, True))
    for m in (peft_path, fused):
        randomise_lora_(m)
        with torch.no_grad():  # a bias of real size, the same on both
            for n, p in m.named_parameters():
                if n.endswith("proj.base_layer.bias"):
                    p.copy_(torch.linspace(-1, 1, p.numel()))
    assert "fused NF4+LoRA linears 14" in describe_speedups(fused)  # q, k, v (biased), o, gate, up, down x 2
    batch = collate([examples(tok, 2)], tok.pad_token_id)
    (lp, gp), (lf, gf) = (loss_and_grads(m, batch, attention.use_packed_attention(m, "sdpa"))
                          for m in (peft_path, fused))
    assert float(lf) == pytest.approx(float(lp), rel=1e-6)
    # tolerance: measured in fp32, the two paths' gradients differ by <= 2.4e-6 of each tensor's largest entry
    # (AVX2-only EPYC; summation order differs between the paths), while single entries near zero differ by
    # far more than an elementwise rtol allows; 2e-5 of the largest entry leaves 8x room for other CPUs.
    for n in gp:
        torch.testing.assert_close(gf[n], gp[n], rtol=0, atol=2e-5 * float(gp[n].abs().max()), msg=n)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_layer_by_layer_load_equals_from_pretrained(families, family):
    """The FSDP low-memory load (qlora/model/layerwise.py) reads each family as from_pretrained does: Qwen2's
    biases, Gemma 3's zero-centred norms, scaled embeddings and per-layer-kind rotary tables."""
    cfg = family_cfg(families[family], quant="nf4", compute_dtype="float32")
    whole, layerwise = (load_base_model(cfg, torch.device("cpu"), layerwise=lw) for lw in (False, True))
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        assert torch.equal(whole(input_ids=ids).logits, layerwise(input_ids=ids).logits)


# --------------------------------------------------------------------------- (c) resume

def test_qwen3_two_steps_then_resume_equals_uninterrupted(families, tmp_path, monkeypatch):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}."}) + "\n"
                            for i in range(40)))
    kw = dict(datasets=[str(data)], max_seq_len=64, max_steps=3, save_every=2, lr=1e-3, eval_every=0,
              lora_dropout=0.05)
    train.main(family_cfg(families["qwen3"], output_dir=str(tmp_path / "ref"), **kw))
    calls = []
    with monkeypatch.context() as m:  # a stop request at the step-2 boundary, as SIGTERM makes one
        m.setattr(StopRequest, "agreed", lambda self, acc: calls.append(1) or len(calls) == 2)
        assert train.main(family_cfg(families["qwen3"], output_dir=str(tmp_path / "cut"), **kw))["stopped"]
    assert (tmp_path / "cut" / "checkpoint-2").is_dir() and not (tmp_path / "cut" / "final").exists()
    train.main(family_cfg(families["qwen3"], output_dir=str(tmp_path / "cut"), resume="auto", **kw))

    def losses(out):
        return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())
                if r["kind"] == "train"}
    assert losses(tmp_path / "cut") == losses(tmp_path / "ref") and len(losses(tmp_path / "ref")) == 3
    logged = [r for r in map(json.loads, (tmp_path / "cut" / "log.jsonl").read_text().splitlines())
              if r["kind"] == "train"]
    assert [r["step"] for r in logged] == [1, 2, 3]  # step 3 came from the checkpoint, not a rerun
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("ref", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- liger dispatch

def test_liger_patch_is_chosen_by_model_type():
    assert {t: kernels.liger_patch(t) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")} == {
        "llama": "patch_llama", "mistral": "apply_liger_kernel_to_mistral", "qwen2": "apply_liger_kernel_to_qwen2",
        "qwen3": "apply_liger_kernel_to_qwen3", "gemma3_text": "apply_liger_kernel_to_gemma3_text",
        "phi3": "apply_liger_kernel_to_phi3"}
    assert kernels.liger_patch("gpt_neox") is None


def test_liger_dispatch_calls_the_family_patch_on_this_model(families, monkeypatch):
    """On a CPU, with liger's modules faked: Gemma 3 gets apply_liger_kernel_to_gemma3_text on its own
    (unwrapped) model, GeGLU on, RoPE/cross-entropy off, norms not in place; a family liger has no
    patch for trains without kernels and the start-up line names it."""
    import sys
    import types

    calls = []

    def apply_liger_kernel_to_gemma3_text(rope=True, cross_entropy=False, fused_linear_cross_entropy=True,
                                          rms_norm=True, geglu=True, model=None):
        calls.append(dict(rope=rope, cross_entropy=cross_entropy, fused=fused_linear_cross_entropy,
                          rms_norm=rms_norm, geglu=geglu, model=type(model).__name__))
        norm = model.model.norm
        norm.in_place = True  # as liger's own patch leaves it
        norm.forward = norm.forward
        norm._get_name = lambda: "LigerRMSNormForGemma3"

    fake = {"liger_kernel.transformers.monkey_patch": types.SimpleNamespace(
                apply_liger_kernel_to_gemma3_text=apply_liger_kernel_to_gemma3_text),
            "liger_kernel.transformers.rope": types.SimpleNamespace(liger_rotary_pos_emb=None)}
    fake["liger_kernel.transformers"] = types.SimpleNamespace(monkey_patch=fake["liger_kernel.transformers.monkey_patch"])
    for name, mod in fake.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(kernels, "resolve_kernels", lambda mode, device, fsdp=False: "liger")
    model = load_model(family_cfg(families["gemma3"]), torch.device("cpu"))  # kernels applied in load_model
    assert calls == [dict(rope=False, cross_entropy=False, fused=False, rms_norm=True, geglu=True,
                          model="Gemma3ForCausalLM")]
    base = model.get_base_model()
    assert base.model.norm.in_place is False
    assert "liger kernels on (3 modules)" in describe_speedups(model)  # the norm and 2 attention modules' RoPE
    monkeypatch.setitem(kernels.LIGER_PATCHES, "gemma3_text", None)
    model = load_model(family_cfg(families["gemma3"]), torch.device("cpu"))
    assert "liger kernels off (liger-kernel has no patch for model type 'gemma3_text')" in describe_speedups(model)


def test_a_multimodal_checkpoint_is_one_clear_line(tmp_path):
    from transformers import Gemma3Config

    from qlora.model.base import _check_causal_lm

    (tmp_path / "g").mkdir()
    Gemma3Config(architectures=["Gemma3ForConditionalGeneration"]).save_pretrained(tmp_path / "g")
    with pytest.raises(ModelLoadError) as e:
        _check_causal_lm(str(tmp_path / "g"), False)
    assert "\n" not in str(e.value) and "multimodal 'gemma3' checkpoint" in str(e.value)
    assert "random:gemma3-4b" in str(e.value)


# --------------------------------------------------------------------------- system turns

def family_tokenizer(family: str | None):
    """The SmolLM2 tokenizer with `family`'s chat template and special tokens (None: SmolLM2's own template)."""
    tok = AutoTokenizer.from_pretrained(resolve_source("smollm2"))
    if family:
        _, template, specials, bos, eos, _ = FAMILIES[family]
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.chat_template, tok.eos_token = template, eos
        if bos:
            tok.bos_token = bos
    return tok


def test_a_template_that_drops_system_turns_is_warned_about_once(tmp_path, capsys):
    from qlora.data.examples import load_datasets

    plain, own = tmp_path / "plain.jsonl", tmp_path / "own.jsonl"
    plain.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(4)))
    own.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}", "system": "Be brief."}) + "\n"
                           for i in range(4)))

    def warnings_of(tok, specs, system_prompt=""):
        said = []
        load_datasets(specs, tok, 256, "drop", 0.25, seed=0, system_prompt=system_prompt, warn=said.append)
        return said

    head = "the tokenizer's chat template drops system turns: "
    mistral = family_tokenizer("mistral")
    assert "Be terse." not in mistral.apply_chat_template(
        [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}], tokenize=False)
    assert warnings_of(mistral, [str(plain)], "Be terse.") == [
        head + "--system_prompt is not in the training text"]
    assert warnings_of(mistral, [str(own)]) == [head + "the rows' system text is not in the training text"]
    assert warnings_of(mistral, [str(plain), str(own)], "Be terse.") == [  # one line for all sources
        head + "--system_prompt and the rows' system text are not in the training text"]
    assert warnings_of(mistral, [str(plain)]) == []  # no system text: nothing lost

    for keeps in (family_tokenizer(None), family_tokenizer("llama3")):  # SmolLM2's template renders system turns
        assert warnings_of(keeps, [str(plain), str(own)], "Be terse.") == []

    capsys.readouterr()
    load_datasets([str(plain)], mistral, 256, "drop", 0.0, seed=0, system_prompt="Be terse.")
    err = capsys.readouterr().err  # without a callback: one warning line on stderr
    assert err == "warning: " + head + "--system_prompt is not in the training text\n"

    from conftest import tiny_cfg
    from qlora.evaluation.evaluate import loss_examples

    rows = [{"prompt": "q", "response": "a"}]
    for _ in range(2):  # qlora.evaluate's eval loss: the same line, once per process
        loss_examples(rows, "prompt_response", mistral, tiny_cfg(system_prompt="Be terse."))
    assert capsys.readouterr().err == "warning: " + head + "--system_prompt is not in the text the eval loss scores\n"
    loss_examples(rows, "prompt_response", family_tokenizer(None), tiny_cfg(system_prompt="Be terse."))
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- random:<shape>

# parameters of the real models (model cards; Gemma 3: the text model, its ~0.4B vision tower apart)
PUBLISHED = {"llama2-7b": 6.738e9, "llama3-8b": 8.030e9, "mistral-7b": 7.248e9, "qwen2.5-7b": 7.616e9,
             "qwen3-8b": 8.191e9, "gemma3-4b": 3.880e9, "gemma3-12b": 11.766e9, "phi3-mini": 3.821e9}


@pytest.mark.parametrize("shape", list(PUBLISHED))
def test_random_shapes_have_the_real_models_parameter_count(shape):
    config = random_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(PUBLISHED[shape], rel=1e-3)
    assert model.get_input_embeddings().weight.shape[0] == {"llama3-8b": 128256, "mistral-7b": 32768,
                                                            "qwen2.5-7b": 152064, "qwen3-8b": 151936,
                                                            "gemma3-4b": 262208, "gemma3-12b": 262208,
                                                            "phi3-mini": 32064}.get(shape, 32000)


def test_train_and_eval_keep_the_instance_forwards_that_kernels_set(families):
    """transformers with the `kernels` package re-kernelizes hub-decorated layers (RMSNorm) at every
    train()/eval() of a from_pretrained model, which would reset the forwards liger and rebuild_inputs set."""
    model = load_base_model(family_cfg(families["qwen2"], quant="nf4"), torch.device("cpu"))
    norm = model.model.layers[0].input_layernorm
    norm.forward = lambda x: x  # as qlora.speed.kernels does, per instance
    model.train()
    model.eval()
    model.train()
    assert "forward" in norm.__dict__
    assert not getattr(model, "use_kernels", False)
