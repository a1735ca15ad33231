"""qlora.evaluation.merge: dequantise a tiny NF4 base, merge a random adapter, export, reload without peft.

Tolerance: on random:tiny (fp32 compute, |logits| < ~1) the merged model's logits differ from the 4-bit
base + adapter (fp32 compute) by ~1e-6 at most (measured: max 1.2e-6, mean 7e-8 over 2,510 positions on an
AVX2 CPU; max 9.8e-7, mean 6.8e-8 on an AVX512-BF16 CPU, where the reference must not take bitsandbytes'
bf16 CPU kernel, which put this test 6.3e-3 off; the difference is fp32 rounding of W x + s B(A x) vs
(W + s B A) x). We allow 1e-4, ~100x that, yet ~1000x below the error
of the *wrong* merge (adapter added to the original full-precision weights instead of the NF4 ones
the adapter was trained against), which the last test checks is caught.
"""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora.training.checkpoint import save_adapter
from qlora.evaluation.evaluate import load_eval_rows, loss_examples
from qlora.evaluation.merge import main
from qlora.model.base import load_base_model
from qlora.model.trainable import load_model

from conftest import ROOT, tiny_cfg

TOL = 1e-4


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("merge")
    cfg = tiny_cfg(quant="nf4")
    model = load_model(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA B starts at zero: give the adapter weights that change the output
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, tok, cfg, root / "adapter")
    assert main(["--adapter", str(root / "adapter"), "--out", str(root / "merged"), "--check_rows", "4"]) == 0
    return root, model, cfg


def test_report(merged):
    """The default precision (float32 on every device) keeps the stated merge error on any CPU."""
    root, _, _ = merged
    rep = json.loads((root / "merged" / "merge_report.json").read_text())
    assert rep["check_rows"] == 4 and rep["base_quant"] == "nf4" and rep["merged_dtype"] == "float32"
    assert 0 <= rep["max_abs_logit_error"] < TOL and rep["mean_abs_logit_error"] <= rep["max_abs_logit_error"]
    assert rep["argmax_agreement"] == 1.0
    assert rep["eval_loss_merged"] == pytest.approx(rep["eval_loss_4bit_plus_adapter"], abs=1e-5)


def test_loads_without_peft_and_matches(merged, tok):
    """A fresh interpreter with peft and bitsandbytes made unimportable loads the directory with
    AutoModelForCausalLM; its logits match the 4-bit base + adapter (the trained model) within TOL."""
    root, model, _ = merged
    rows, fmt = load_eval_rows("builtin:sql", limit=2)
    ids = loss_examples(rows, fmt, tok, tiny_cfg())[0].input_ids
    script = (
        "import sys, json, torch\n"
        "sys.modules['peft'] = None; sys.modules['bitsandbytes'] = None\n"  # import would raise
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(root / 'merged')!r}).eval()\n"
        "assert not any('lora' in n for n, _ in m.named_parameters())\n"
        f"ids = torch.tensor([{ids!r}])\n"
        "with torch.no_grad(): out = m(input_ids=ids).logits[0]\n"
        f"torch.save(out, {str(root / 'logits.pt')!r})\n"
    )
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    theirs = torch.load(root / "logits.pt")
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0]
    err = (ours - theirs).abs().max().item()
    assert err < TOL, err
    assert (root / "merged" / "tokenizer.json").is_file() and (root / "merged" / "config.yaml").is_file()
    assert not (root / "merged" / "adapter_config.json").exists()


def test_merging_into_full_precision_weights_would_be_caught(merged, tok):
    """The same adapter merged into the *unquantised* random weights is far off: the check can tell."""
    from peft import PeftModel

    root, model, _ = merged
    fp = load_base_model(tiny_cfg(quant="none"), torch.device("cpu"))  # same seed: the pre-NF4 weights
    wrong = PeftModel.from_pretrained(fp, str(root / "adapter")).merge_and_unload().eval()
    rows, fmt = load_eval_rows("builtin:sql", limit=2)
    ids = torch.tensor([loss_examples(rows, fmt, tok, tiny_cfg())[0].input_ids])
    with torch.no_grad():
        err = (wrong(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    assert err > 100 * TOL, err


def test_half_precision_warns_and_reports_its_error(merged, tmp_path, capsys):
    """--dtype bfloat16 is allowed, says in one warning line that it does not keep the fp32 merge
    error, and its report measures the larger error (bf16 rounding of weights and compute: measured
    max 4.7e-2 and 92.9% argmax agreement over 8 rows of random:tiny, against 9.8e-7 and 100% in fp32)."""
    root, _, _ = merged
    assert main(["--adapter", str(root / "adapter"), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16",
                 "--check_rows", "2"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "--dtype bfloat16" in warnings[0] and "float32" in warnings[0]
    rep = json.loads((tmp_path / "bf16" / "merge_report.json").read_text())
    assert rep["merged_dtype"] == "bfloat16" and rep["max_abs_logit_error"] > 10 * TOL


def test_merged_files_have_the_umask_mode(merged):
    """model.safetensors is written by safetensors through a private (0600) temp file; merge gives it
    the mode any new file gets under the user's umask, like the rest of the folder."""
    root, _, _ = merged
    mask = os.umask(0o022)
    os.umask(mask)
    for f in (root / "merged").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_out_folder_of_something_else_is_refused(merged, tmp_path):
    """--out may name a new folder or an earlier merge's (replaced); one holding anything else is
    refused before any work and left as it was."""
    from badinput import assert_one_error, run_cli, snapshot

    root, _, _ = merged
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    r = run_cli(["-m", "qlora.merge", "--adapter", str(root / "adapter"), "--out", str(other)])
    assert_one_error(r, "already exists and is not a merged model")
    assert snapshot(other) == {"keep.txt": b"mine"}


def test_adapter_on_a_tied_lm_head_loads_merges_and_keeps_the_input_embedding(tmp_path, tok):
    """random:tiny ties lm_head to the input embedding, so lm_head.weight is no tensor of its weights
    file: an adapter targeting lm_head is still checked against the model's modules and loads, and the
    merge gives lm_head its own weight (the input embedding stays the base's) and saves it untied."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qlora.evaluation.inference import base_shapes, load_for_inference

    cfg = tiny_cfg(quant="nf4", lora_targets=["q_proj", "v_proj", "lm_head"])
    assert "lm_head.weight" not in base_shapes(cfg) and "lm_head.weight" in base_shapes(cfg, tied=True)
    model = load_model(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, tok, cfg, tmp_path / "adapter")
    loaded, _, _ = load_for_inference(str(tmp_path / "adapter"), compute_dtype="float32", device="cpu")
    assert any("lm_head.lora_A" in n for n, _ in loaded.named_parameters())
    assert main(["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--check_rows", "2"]) == 0
    rep = json.loads((tmp_path / "merged" / "merge_report.json").read_text())
    assert rep["max_abs_logit_error"] < TOL and rep["argmax_agreement"] == 1.0
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    embed = load_base_model(cfg, torch.device("cpu")).get_input_embeddings().weight.float()
    assert torch.equal(saved["model.embed_tokens.weight"], embed)  # the adapter is not in the input embedding
    assert not torch.equal(saved["lm_head.weight"], embed)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not reloaded.config.tie_word_embeddings
    assert torch.equal(reloaded.get_output_embeddings().weight, saved["lm_head.weight"])
