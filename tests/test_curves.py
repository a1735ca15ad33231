"""qlora.training.curves: a PNG from a synthetic log.jsonl."""

import json
import math

from qlora.training.curves import main, read_log


def write_log(path, steps=30, eval_every=10):
    lines = []
    for s in range(1, steps + 1):
        lines.append({"kind": "train", "step": s, "loss": 2.0 * math.exp(-s / 10) + 0.3, "lr": 1e-4 * min(1, s / 3),
                      "tokens_per_s": 1000 + 10 * s, "grad_norm": 1.0})
        if s % eval_every == 0:
            lines.append({"kind": "eval", "step": s, "eval_loss": 2.0 * math.exp(-s / 12) + 0.4})
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"kind": "train", "st'  # a line cut by a kill
    path.write_text(text)


def test_png_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write_log(run / "log.jsonl")
    assert main([str(run)]) == 0
    png = run / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    out = tmp_path / "x" / "c.png"
    assert main([str(run), "--out", str(out)]) == 0 and out.is_file()


def test_read_log_later_line_wins_and_bad_lines_skipped(tmp_path):
    log = tmp_path / "log.jsonl"
    write_log(log, steps=5, eval_every=5)
    log.write_text(log.read_text() + "\n" + json.dumps({"kind": "train", "step": 5, "loss": 9.0, "lr": 0.0,
                                                        "tokens_per_s": 1.0}) + "\n")
    train, evals = read_log(log)
    assert list(train) == [1, 2, 3, 4, 5] and train[5]["loss"] == 9.0 and list(evals) == [5]


def test_missing_log_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "log.jsonl" in capsys.readouterr().err
