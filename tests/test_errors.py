"""Bad input ends with one clear message naming what is wrong, before any training starts."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_cfg

FAST = ["--model", "random:tiny", "--quant", "none", "--compute_dtype", "float32", "--max_steps", "1",
        "--tracker", "none", "--sample_prompts", "0"]


def error_of(tmp_path, *args, env=None):
    import os
    r = subprocess.run([sys.executable, "train.py", *FAST, "--output_dir", str(tmp_path / "o"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    return r.stderr.strip().splitlines()[-1]


def test_model_path_that_is_not_a_causal_lm(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    msg = error_of(tmp_path, "--model", str(d))
    assert f"model '{d}' is a 'bert' model, not a causal language model" in msg


def test_tokenizer_ids_beyond_the_model_vocab(tmp_path):
    msg = error_of(tmp_path, "--model", "random:llama2-7b")
    assert "has only 32000 embeddings" in msg and "--tokenizer" in msg


def test_random_model_with_a_wider_vocab_runs_and_a_bad_suffix_fails(tmp_path):
    from qlora.model import ModelLoadError, model_vocab_size

    assert model_vocab_size(tiny_cfg(model="random:llama2-7b:49152")) == 49152
    with pytest.raises(ModelLoadError, match="must be a vocab size, e.g. random:llama2-7b:49152"):
        model_vocab_size(tiny_cfg(model="random:llama2-7b:big"))
    msg = error_of(tmp_path, "--model", "random:huge")
    assert "unknown random shape 'huge'" in msg


def test_liger_kernels_on_cpu_is_a_clear_error(tmp_path):
    msg = error_of(tmp_path, "--kernels", "liger")
    assert "'kernels' = 'liger' needs a CUDA device" in msg


def test_model_dir_without_config(tmp_path):
    msg = error_of(tmp_path, "--model", str(tmp_path))
    assert f"model path {tmp_path} has no config.json" in msg


def test_unknown_hub_model_offline(tmp_path):
    msg = error_of(tmp_path, "--model", "no-such-org/no-such-model-xyz")
    assert "cannot load model 'no-such-org/no-such-model-xyz'" in msg and "offline" in msg


def test_unknown_hub_dataset_offline(tmp_path):
    msg = error_of(tmp_path, "--datasets", "no-such-org/no-such-dataset-xyz")
    assert "dataset 'no-such-org/no-such-dataset-xyz' (split train) could not be loaded" in msg and "offline" in msg


def test_empty_dataset_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    msg = error_of(tmp_path, "--datasets", str(p))
    assert "empty.jsonl" in msg


def test_wrong_type_on_the_command_line(tmp_path):
    assert "config key 'micro_batch_size' from the command line: expected an integer" in \
        error_of(tmp_path, "--micro_batch_size", "two")


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path, monkeypatch):
    import train
    from qlora import loss

    real = loss.TokenLoss.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = real(self, *a, **kw)
        if not self.training:  # eval passes are not training steps
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out

    monkeypatch.setattr(loss.TokenLoss, "forward", poisoned)
    cfg = tiny_cfg(tmp_path, max_steps=5, save_every=1, eval_every=0, grad_accum=1)
    with pytest.raises(train.NonFiniteError, match=r"non-finite loss \(nan\).* at step 3; last good checkpoint: .*checkpoint-2"):
        train.main(cfg)
    calls["n"] = 0
    cfg = tiny_cfg(tmp_path, max_steps=5, save_every=0, eval_every=0, grad_accum=1, skip_nonfinite=True,
                   output_dir=str(tmp_path / "skip"))
    result = train.main(cfg)
    assert result["skipped_steps"] == 1 and result["step"] == 5 and torch.isfinite(torch.tensor(result["loss"]))
