"""Bad input ends with one clear message naming what is wrong, before any training starts."""

import json

import pytest
import torch

from badinput import FAST_TRAIN, assert_one_error, run_cli
from conftest import tiny_cfg


def error_of(tmp_path, *args):
    """The one error line of a train.py run on the tiny model (the harness checks exit 2, no traceback)."""
    return assert_one_error(run_cli(["train.py", *FAST_TRAIN, "--output_dir", str(tmp_path / "o"), *args]))


def test_model_path_that_is_not_a_causal_lm(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    msg = error_of(tmp_path, "--model", str(d))
    assert f"model '{d}' is a 'bert' model, not a causal language model" in msg


def test_random_model_with_a_wider_vocab_runs_and_a_bad_suffix_fails(tmp_path):
    from qlora.model.base import ModelLoadError, model_vocab_size

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


def test_nonfinite_loss_stops_with_step_and_last_checkpoint(tmp_path, monkeypatch):
    import train
    from qlora.training import loss

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


def test_a_bad_tokenizer_path_names_tokenizer_not_model(tmp_path):
    msg = error_of(tmp_path, "--tokenizer", str(tmp_path / "nonexistent"))
    assert f"tokenizer path {tmp_path / 'nonexistent'} does not exist: point --tokenizer at" in msg
    assert "--model" not in msg
    (tmp_path / "file.txt").write_text("x")
    assert "is not a folder: point --tokenizer" in error_of(tmp_path, "--tokenizer", str(tmp_path / "file.txt"))
