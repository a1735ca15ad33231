"""benchmarks/bench.py: the CPU smoke run (--tiny --compare) end to end, the FLOPs model, the synthetic
guanaco data, and that a failing setting is recorded instead of ending the sweep."""

from __future__ import annotations

import csv
import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_interpreted

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench.py"
sys.path.insert(0, str(ROOT / "benchmarks"))

POSITIVE = ("tokens_per_s", "supervised_tokens_per_s", "response_tokens_per_s", "step_time_s", "tokens_per_step",
            "peak_allocated_gib", "peak_reserved_gib", "base_weights_gib", "mfu", "hfu", "achieved_tflops",
            "model_tflops_per_step", "n_matmul_params", "n_lora_params", "timed_steps")


def _run(args, timeout=150):
    return subprocess.run([sys.executable, str(BENCH), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_tiny_compare_writes_both_runs(tmp_path):
    proc = _run(["--tiny", "--compare", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [r["impl"] for r in records] == ["ours", "baseline"]
    for r in records:
        assert r["status"] == "ok", r.get("error")
        for key in POSITIVE:
            assert isinstance(r.get(key), (int, float)) and r[key] > 0, (r["impl"], key, r.get(key))
        assert r["timed_steps"] == 1 and r["warmup"] == 2
        for key in ("card", "torch", "transformers", "peft", "accelerate", "lora_optimizer_gib", "activations_gib"):
            assert key in r
        # random tokens: the loss starts near ln(vocab)
        assert abs(r["loss_first"] - math.log(49152)) < 1.0
    ours, base = records
    # same data, same shapes: same token count per step and the same FLOPs per step
    assert ours["tokens_per_step"] == base["tokens_per_step"] == 2 * 2 * 64
    assert ours["model_tflops_per_step"] == pytest.approx(base["model_tflops_per_step"], rel=1e-9)
    rows = list(csv.DictReader(open(tmp_path / "bench.csv")))
    assert [r["impl"] for r in rows] == ["ours", "baseline"]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "bench.png").stat().st_size > 1000


def test_failed_setting_is_recorded_not_fatal(tmp_path):
    # fails inside the worker subprocess (before its slow imports): recorded, the sweep goes on
    proc = _run(["--tiny", "--compare", "--data", "no-such-data", "--out", str(tmp_path), "--no_plot"])
    assert proc.returncode == 1
    recs = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [r["impl"] for r in recs] == ["ours", "baseline"]
    assert all(r["status"] == "error" and "no-such-data" in r["error"] for r in recs)
    assert (tmp_path / "bench.csv").is_file()


def test_flops_model_llama2_7b():
    from types import SimpleNamespace

    import common

    cfg = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=32, vocab_size=32000)
    shape = common.matmul_params(cfg)
    assert shape["N"] == 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) == 6_476_005_376
    # one 512-token document, all positions in the loss, no LoRA
    pairs = common.causal_pairs([512])
    assert pairs == 512 * 513 // 2
    model, hw = common.step_flops(shape, 0, 512, pairs, 512, recompute=True)
    assert model == pytest.approx(512 * 4 * shape["N"] + 12 * 32 * 4096 * pairs + 512 * 4 * 4096 * 32000)
    assert hw - model == pytest.approx(512 * 2 * shape["N"] + 4 * 32 * 4096 * pairs)
    assert common.step_flops(shape, 0, 512, pairs, 512, recompute=False)[1] == model


def test_guanaco_lengths_and_synthetic_examples():
    import common

    lengths = common.guanaco_lengths()
    assert len(lengths) == 1000 and all(0 < s <= t for t, s in lengths)
    vocab = 32000
    ex = common.synth_examples("guanaco", 2048, 50, vocab, seed=0)
    kept = {t for t, _ in lengths if t <= 2048}
    assert len(ex) >= 50 and all(len(ids) in kept for ids, _ in ex)
    for ids, n_prompt in ex[:20]:
        assert all(3 <= t < vocab // 2 for t in ids[:n_prompt]) and all(vocab // 2 <= t < vocab for t in ids[n_prompt:])
        assert (len(ids), len(ids) - n_prompt) in set(map(tuple, lengths))
    rows = common.synth_examples("random", 64, 3, vocab, seed=0)
    assert [len(ids) for ids, _ in rows] == [64, 64, 64] and all(p == 1 for _, p in rows)


def test_config_keys_are_taken_and_old_flags_name_the_new_key(tmp_path):
    # Config's own keys select the setting; each setting of a comma list is one record
    proc = _run(["--tiny", "--micro_batch_size", "1", "--grad_accum", "2", "--recompute_layers=1",
                 "--deterministic", "off,on", "--optimizer", "adamw", "--no_plot", "--out", str(tmp_path)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert sorted((r["grad_accum"], r["deterministic"]) for r in recs) == [(2, False), (2, True)]
    # the optimizer key reaches the step: torch's AdamW, not the default bitsandbytes one
    assert all(r["optimizer"] == "adamw" and r["optimizer_class"].startswith("torch.optim") for r in recs), \
        [r.get("optimizer_class") for r in recs]
    assert all(r["status"] == "ok" and r["micro_batch_size"] == 1 and r["recompute_layers"] == 1 for r in recs)
    assert all(r["tokens_per_step"] == 64 * r["grad_accum"] for r in recs)
    # a flag of the old bench.py: one line that names the key to use, nothing runs
    for old, new in (("--micro_batch", "--micro_batch_size"), ("--fp8", "--base_fp8")):
        proc = _run([old, "2", "--tiny", "--out", str(tmp_path / "old")])
        assert proc.returncode == 2
        assert f"{old} was renamed to {new}" in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "old").exists()
    # a bad value in a sweep list: one error line naming the option, no traceback, nothing runs
    for flag, bad, want in (("--recompute_attention", "on,maybe", "expected on or off"),
                            ("--recompute_layers", "1,x", "expected int values")):
        proc = _run([flag, bad, "--tiny", "--out", str(tmp_path / "bad")])
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1] == f"error: {flag}: {want} (a comma list to sweep), got {bad.split(',')[1]!r}"
        assert not (tmp_path / "bad" / "bench.jsonl").exists()


def test_spider_table_aggregates_seeds_and_tests_parity(tmp_path):
    """benchmarks/spider_table.py on reports written the way qlora.evaluate --decoding schema writes them."""
    import numpy as np

    import spider_table

    ex = {"lora16": [0.28, 0.30, 0.29], "nf4": [0.27, 0.31, 0.30], "fp8": [0.20, 0.21, 0.22]}
    for variant, values in ex.items():
        for seed, v in enumerate(values, 1):
            report = {"execution_accuracy": v + 0.05, "execution_accuracy_ci95": [v, v + 0.1], "exact_match": v / 2,
                      "n_scored": 972, "plain": {"execution_accuracy": v, "execution_accuracy_ci95": [v - 0.03, v + 0.03],
                                                 "exact_match": v / 3}}
            if variant == "nf4":  # kept gzip-compressed, as the committed reports are
                (tmp_path / f"{variant}_s{seed}_spider_dev.json.gz").write_bytes(gzip.compress(json.dumps(report).encode()))
            else:
                (tmp_path / f"{variant}_s{seed}_spider_dev.json").write_text(json.dumps(report))
            (tmp_path / f"{variant}_s{seed}.log.jsonl").write_text(
                json.dumps({"kind": "eval", "step": 0, "eval_loss": 2.0}) + "\n"
                + json.dumps({"kind": "train", "step": 310, "loss": 0.1}) + "\n"
                + json.dumps({"kind": "eval", "step": 310, "eval_loss": 0.1 * seed}) + "\n")
    table = spider_table.collect(tmp_path)
    assert sorted(table["nf4"]["seeds"]) == [1, 2, 3]
    for variant, values in ex.items():
        s = table[variant]["summary"]
        assert s["exec_plain"]["mean"] == pytest.approx(np.mean(values))
        assert s["exec_plain"]["std"] == pytest.approx(np.std(values, ddof=1))
        assert s["exec_schema"]["mean"] == pytest.approx(np.mean(values) + 0.05)
        assert s["eval_loss"]["mean"] == pytest.approx(0.2)  # the last eval record of each log: 0.1, 0.2, 0.3
    par = spider_table.parity(table)
    assert par["nf4"]["within"] and par["nf4"]["seed_spread"] == pytest.approx(0.04)
    assert not par["fp8"]["within"] and par["fp8"]["difference"] == pytest.approx(0.21 - 0.29)
    text = spider_table.markdown(table)
    assert "NOT within" in text and text.count("| QLoRA") == 2
    assert spider_table.main([str(tmp_path / "missing")]) == 2


def test_loss_memory_benchmark_measures_both_kinds(tmp_path, capsys):
    """benchmarks/loss_memory.py: each kind in its own process, equal losses, and the memory it reports is
    the logits' own size: plain keeps about positions x vocab fp32 for backward, fused a small part of it."""
    import loss_memory

    assert loss_memory.main(["--vocab", "32768", "--hidden", "64", "--positions", "2048", "--reps", "1",
                             "--out", str(tmp_path)]) == 0
    rec = {r["kind"]: r for r in json.loads((tmp_path / "loss_memory.json").read_text())}
    assert set(rec) == {"plain", "fused"} and (tmp_path / "loss_memory.png").is_file()
    assert rec["fused"]["loss"] == pytest.approx(rec["plain"]["loss"], rel=1e-5)
    logits_gib = 2048 * 32768 * 4 / 2**30  # 0.25 GiB
    assert 0.9 * logits_gib < rec["plain"]["held_gib"] < 1.5 * logits_gib, rec["plain"]
    assert rec["fused"]["held_gib"] < 0.25 * logits_gib, rec["fused"]
    capsys.readouterr()
    assert loss_memory.main(["--kinds", "liger"]) == 2
    assert capsys.readouterr().err.startswith("error: --kinds liger runs on CUDA only")


def test_nf4_probe_runs_on_the_cpu_interpreter():
    """benchmarks/nf4_dequant_probe.py, which times nf4_kernel's tiles on a GPU, runs its equality check on the
    CPU through Triton's interpreter (within one bf16 step there: the interpreter casts by truncation)."""
    probe = ["nf4_dequant_probe.py", "--check_only", "--device", "cpu"]
    out = run_interpreted(f"benchmarks/{probe[0]}", *probe[1:])
    assert out.strip().endswith("all PASS"), out[-2000:]
