"""GGUF files of the families, written by qlora/evaluation/gguf_write.py and read back through
qlora.model.base.convert_gguf, with what transformers' GGUF reader drops restored (qlora/model/gguf_restore.py):
Llama 3, Mistral, Qwen2, Qwen3 and Phi-3 with their weights, Llama 3.1 rope scaling, Phi-3 LongRoPE, partial
rotary width and sliding window; refusals are one line."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qlora.model.base import ModelLoadError
from qlora.model.gguf_restore import set_rope

from test_families import TWO_TURNS, family_dir


def refused_as_misread(path) -> bool:
    """Under a transformers that would misread the file's tokenizer (5.17 takes every Phi-3 file's as
    SentencePiece), converting stops with one line naming the file and nothing is converted: True. Else False."""
    import gguf as gguf_py

    from qlora.model.base import convert_gguf
    from qlora.model.gguf_restore import misread_tokenizer

    if misread_tokenizer(gguf_py.GGUFReader(path)) is None:
        return False
    with pytest.raises(ModelLoadError) as e:
        convert_gguf(path, out_dir=path.parent / "refused")
    assert "\n" not in str(e.value) and str(path) in str(e.value) and "SentencePiece" in str(e.value)
    assert not (path.parent / "refused").exists()
    return True


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3", "phi3"])
def test_a_gguf_file_of_the_family_loads_as_the_model_it_was_written_from(family, tmp_path):
    """`--model file.gguf` for the families transformers reads from GGUF and qlora.export writes: the tiny
    checkpoint written as an f16 GGUF, then converted as train.py converts it, has the f16-rounded weights
    (the logits of the original with every matrix rounded to f16, to fp32 rounding), and its tokenizer gives
    the same ids through the family's chat template (so the response masks are the same)."""
    from qlora.evaluation.gguf_write import write_gguf
    from qlora.model.base import convert_gguf

    # a 1,024-token vocabulary: every GGUF reader parses the vocabulary token by token (seconds for 49,152)
    folder = family_dir(tmp_path, family, vocab=1024)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    write_gguf(model, tok, tmp_path / f"{family}.gguf", "f16")
    if refused_as_misread(tmp_path / f"{family}.gguf"):
        pytest.skip("this transformers misreads a Phi-3 file's BPE tokenizer; the one-line refusal was checked")
    converted = convert_gguf(tmp_path / f"{family}.gguf", out_dir=tmp_path / "converted")
    loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())  # the reference: what f16 storage keeps
    def chat_ids(t):
        return t(t.apply_chat_template(TWO_TURNS, tokenize=False), add_special_tokens=False).input_ids

    ids = torch.tensor([chat_ids(tok)])
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert want.abs().max() > 1e-3  # a real signal
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())
    gguf_tok = AutoTokenizer.from_pretrained(converted)
    assert chat_ids(gguf_tok) == ids[0].tolist()
    assert gguf_tok.convert_ids_to_tokens(gguf_tok.eos_token_id) == tok.eos_token


LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_llama3_1_rope_scaling_goes_through_gguf_both_ways(tmp_path):
    """Llama 3.1/3.2/3.3 scale their rotary frequencies (`rope_type: llama3`); a GGUF file holds that only as
    llama.cpp's `rope_freqs.weight`, which transformers' reader ignores. Written: the factors are 1 for the
    fast pairs, 8 for the slow ones and in between for the blend (head_dim 16, theta 500,000: wavelengths
    6 to 750,000 tokens span all three bands). Read back: the converted model has the same scaling and its
    logits at positions 500 apart equal the original's (f16-rounded weights); with plain rope they would not."""
    from qlora.evaluation.gguf_write import write_gguf
    from qlora.model.base import convert_gguf
    from qlora.model.gguf_restore import GGUF_NAME, rope_settings

    folder = family_dir(tmp_path, "llama3", vocab=1024)
    config = AutoConfig.from_pretrained(folder)
    set_rope(config, LLAMA31_ROPE)
    config.max_position_embeddings = 131072
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharp attention, so that where each key sits (its rotation) shows in the logits
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    tok = AutoTokenizer.from_pretrained(folder)
    write_gguf(model, tok, tmp_path / "l31.gguf", "f16")
    import gguf
    factors = next(t for t in gguf.GGUFReader(tmp_path / "l31.gguf").tensors if t.name == GGUF_NAME).data
    head_dim = config.hidden_size // config.num_attention_heads
    assert len(factors) == head_dim // 2 == 8
    assert list(factors[:4]) == pytest.approx([1.0] * 4) and list(factors[5:]) == pytest.approx([8.0] * 3)
    assert 1.0 < factors[4] < 8.0  # wavelength 4,967 tokens: between 8,192 / 4 and 8,192

    converted = convert_gguf(tmp_path / "l31.gguf", out_dir=tmp_path / "converted")
    loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    got_rope = rope_settings(loaded.config)
    assert {k: got_rope[k] for k in LLAMA31_ROPE} == LLAMA31_ROPE
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    ids = torch.tensor([tok("What is 12 times 7? It is 84, a number.", add_special_tokens=False).input_ids])
    pos = torch.arange(ids.shape[1])[None] * 500  # keys up to ~7,000 tokens back: the slow pairs turn
    plain_config = AutoConfig.from_pretrained(converted)
    set_rope(plain_config, {"rope_type": "default", "rope_theta": 500000.0})
    plain = AutoModelForCausalLM.from_config(plain_config).eval()
    plain.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        want, got = model(input_ids=ids, position_ids=pos).logits, loaded(input_ids=ids, position_ids=pos).logits
        unscaled = plain(input_ids=ids, position_ids=pos).logits
    scale = want.abs().max().item()
    # measured (2-core CPU, fp32): converted vs original 0.0, plain rope vs original 0.85, relative to the
    # largest logit; 1e-5 leaves room for other CPUs' summation order
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    assert (unscaled - want).abs().max().item() > 1e-1 * scale  # the scaling matters at these positions


def test_phi3_longrope_partial_rotary_and_window_go_through_gguf_both_ways(tmp_path):
    """Phi-3-*-128k / Phi-3.5 scale rotary frequencies per pair with one set of factors for short contexts
    and one for long (LongRoPE), Phi-4-mini rotates part of each head, and Phi-3 attends within a sliding
    window. GGUF keeps the factors as tensors and the rest as keys, all dropped by transformers' reader.
    Round trip: the converted model has them back, and its logits equal the original's (f16-rounded weights)
    in the short regime and in the long one (positions past the original context), where the plain
    reading would differ."""
    from qlora.evaluation.gguf_write import write_gguf
    from qlora.model.base import convert_gguf
    from qlora.model.gguf_restore import restore, rope_settings

    folder = family_dir(tmp_path, "phi3", vocab=1024, sliding_window=8)
    config = AutoConfig.from_pretrained(folder)
    long_factor, short_factor = [1.0, 1.5, 2.0, 4.0, 8.0, 16.0], [1.0, 1.0, 1.1, 1.2, 1.5, 2.0]
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "long_factor": long_factor, "short_factor": short_factor,
            "original_max_position_embeddings": 64, "partial_rotary_factor": 0.75}
    set_rope(config, rope)
    config.partial_rotary_factor, config.original_max_position_embeddings = 0.75, 64
    config.max_position_embeddings = 4096
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharp attention, so that rotations and the window show in the logits
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight.mul_(30)
    tok = AutoTokenizer.from_pretrained(folder)
    write_gguf(model, tok, tmp_path / "phi.gguf", "f16")
    import gguf
    reader = gguf.GGUFReader(tmp_path / "phi.gguf")
    attn = reader.fields["phi3.rope.scaling.attn_factor"].contents()  # always written, as llama.cpp reads it
    assert attn == pytest.approx(model.model.rotary_emb.attention_scaling) and attn == pytest.approx(2 ** 0.5)
    if refused_as_misread(tmp_path / "phi.gguf"):  # the weights and config still read: restore on those
        config = AutoConfig.from_pretrained(tmp_path, gguf_file="phi.gguf")
        restore(reader, config, "phi.gguf")
        config.pad_token_id = None  # Phi3Config's default (32,000) is past this tiny vocabulary
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="phi.gguf", config=config,
                                                      dtype=torch.float32).eval()
    else:
        converted = convert_gguf(tmp_path / "phi.gguf", out_dir=tmp_path / "converted")
        loaded = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    got = rope_settings(loaded.config)
    assert got["rope_type"] == "longrope" and loaded.config.sliding_window == 8
    assert got["long_factor"] == pytest.approx(long_factor) and got["short_factor"] == pytest.approx(short_factor)
    assert got["original_max_position_embeddings"] == 64 and got["partial_rotary_factor"] == 0.75
    plain_config = type(loaded.config).from_dict(loaded.config.to_dict())
    set_rope(plain_config, {"rope_type": "default", "rope_theta": 10000.0})
    plain_config.sliding_window, plain_config.partial_rotary_factor = None, 1.0
    plain = AutoModelForCausalLM.from_config(plain_config).eval()
    plain.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(p.half().float())
    ids = torch.tensor([tok("Name a prime number larger than ten and smaller than twenty, please.",
                            add_special_tokens=False).input_ids])
    # measured (2-core CPU, fp32), relative to the largest logit: converted vs original 0.0 in both regimes,
    # the plain reading 1.2-1.3; 1e-5 leaves room for other CPUs' summation order
    for pos in (torch.arange(ids.shape[1])[None], torch.arange(ids.shape[1])[None] * 20):  # short, then long
        with torch.no_grad():
            want = model(input_ids=ids, position_ids=pos).logits
            out, off = loaded(input_ids=ids, position_ids=pos).logits, plain(input_ids=ids, position_ids=pos).logits
        scale = want.abs().max().item()
        torch.testing.assert_close(out, want, rtol=0, atol=1e-5 * scale)
        assert (off - want).abs().max().item() > 1e-1 * scale


def test_rope_factors_no_llama3_scaling_gives_are_one_line(tmp_path):
    import gguf as gguf_py

    from qlora.model.base import convert_gguf
    from qlora.model.gguf_restore import GGUF_NAME, llama3_factors, llama3_parameters

    from transformers import LlamaConfig

    from qlora.model.gguf_restore import rope_factors
    # head_dim 128 as in Llama 3.x: the factors from the model's float32 inv_freq carry noise (8.000001); the
    # parameters read back are the released ones exactly
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                         num_hidden_layers=1, vocab_size=64)
    for factor in (8.0, 32.0):  # Llama 3.1, Llama 3.2
        set_rope(config, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        got = llama3_parameters(rope_factors(AutoModelForCausalLM.from_config(config)).float(), 500000.0, 128, "f")
        assert got["factor"] == factor and got["original_max_position_embeddings"] == 8192
    exact = llama3_factors(500000.0, 16, 8.0, 1.0, 4.0, 8192)
    assert llama3_parameters(exact.float(), 500000.0, 16, "f")["original_max_position_embeddings"] == 8192
    assert llama3_parameters(torch.ones(8), 500000.0, 16, "f") is None
    with pytest.raises(ValueError, match="is not a Llama 3 frequency scaling"):
        llama3_parameters(exact.float() * torch.linspace(1, 1.1, 8), 500000.0, 16, "f")
    # a file with such factors: one line naming it, nothing converted
    from qlora.evaluation.gguf_write import write_gguf
    folder = family_dir(tmp_path, "llama3", vocab=1024)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    path = tmp_path / "odd.gguf"
    write_gguf(model, AutoTokenizer.from_pretrained(folder), path, "f16")
    reader = gguf_py.GGUFReader(path)
    writer = gguf_py.GGUFWriter(tmp_path / "odd2.gguf", "llama")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if field.types[0] == gguf_py.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    writer.add_tensor(GGUF_NAME, (torch.linspace(1, 3, 8)).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as e:
        convert_gguf(tmp_path / "odd2.gguf", out_dir=tmp_path / "c")
    assert "\n" not in str(e.value) and "odd2.gguf" in str(e.value) and "not a Llama 3 frequency scaling" in str(e.value)
    assert not (tmp_path / "c").exists()


