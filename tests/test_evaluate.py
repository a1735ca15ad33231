"""qlora.evaluation.evaluate and qlora.evaluation.inference: the training prompt, end-to-end evaluation of a tiny model + adapter,
report fields, the eval loss against an unpacked reference, and dequantised vs 4-bit inference."""

import json

import pytest
import torch

from qlora.training.checkpoint import save_adapter
from qlora.data.examples import IGNORE
from qlora.evaluation.evaluate import eval_loss, eval_prompts, evaluate, load_eval_rows, loss_examples, main
from qlora.evaluation.inference import load_for_inference
from qlora.model.trainable import load_model

from conftest import shared_file, tiny_cfg

FIELDS = {"n", "scored", "skipped_gold_failed", "execution_accuracy", "exact_match", "pred_error_rate",
          "eval_loss", "ppl", "predictions"}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tok):
    """A tiny random NF4 base + a LoRA adapter with non-zero weights, saved like train.py saves it."""
    path = tmp_path_factory.mktemp("eval") / "adapter"
    cfg = tiny_cfg(quant="nf4")
    model = load_model(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    save_adapter(model, tok, cfg, path)
    return path


@pytest.fixture(scope="module")
def loaded(adapter_dir):
    return load_for_inference(str(adapter_dir))


def test_prompt_is_the_training_prompt(tok):
    """The generation prompt is token for token what training saw before the first supervised token."""
    cfg = tiny_cfg(system_prompt="You write SQLite.")
    rows, fmt = load_eval_rows("builtin:sql", limit=5)
    assert fmt == "gretel_sql"
    for prompt, ex in zip(eval_prompts(rows, fmt, tok, cfg.system_prompt), loss_examples(rows, fmt, tok, cfg)):
        first = next(i for i, t in enumerate(ex.labels) if t != IGNORE)
        assert prompt == ex.input_ids[:first]
        assert "You write SQLite." in tok.decode(prompt)


def test_eval_rows_of_a_spider_file_without_its_databases_are_an_error(tmp_path):
    """load_eval_rows gives the Spider formatter the file's path, as training does; a row whose database is
    absent is a DataError naming the row, not a SkipRow traceback."""
    from qlora.data.examples import DataError

    p = tmp_path / "dev.json"
    p.write_text(json.dumps([{"question": "How many?", "query": "SELECT 1", "db_id": "nowhere"}]))
    with pytest.raises(DataError, match=rf"^{p} row 0 \(0-based\): Spider database missing; Spider files are scored"):
        load_eval_rows(str(p))


def test_gold_predictions_score_perfectly(loaded):
    """With the generator replaced by one that answers the gold SQL, every scored row matches."""
    model, tok, cfg = loaded
    rows, fmt = load_eval_rows("builtin:sql", limit=6)
    by_prompt = {tuple(p): r["sql"] for p, r in zip(eval_prompts(rows, fmt, tok, cfg.system_prompt), rows)}

    def gold(model, tokenizer, prompts, max_new_tokens, device):
        return [f"```sql\n{by_prompt[tuple(p)]}\n```" for p in prompts]

    rep = evaluate(model, tok, cfg, rows, fmt, batch_size=4, generate_fn=gold, progress=False)
    assert FIELDS <= set(rep)
    assert rep["n"] == 6 and rep["scored"] + rep["skipped_gold_failed"] == 6 and rep["scored"] > 0
    assert rep["execution_accuracy"] == 1.0 and rep["exact_match"] == 1.0 and rep["pred_error_rate"] == 0.0
    assert [p["id"] for p in rep["predictions"]] == [r["id"] for r in rows]  # row order kept
    assert rep["eval_loss_examples"] == 6 and rep["eval_loss"] > 0 and rep["ppl"] > 1


def test_real_rows_skip_gold_failures(loaded):
    """The 25 real gretel rows: the 7 whose gold SQL does not run in sqlite are skipped, not counted wrong."""
    model, tok, cfg = loaded
    rows, fmt = load_eval_rows(str(shared_file("gretel-synthetic-text-to-sql-25.jsonl")))
    rep = evaluate(model, tok, cfg, rows, fmt, generate_fn=lambda m, t, ps, n, d: ["SELECT 1;"] * len(ps),
                   progress=False)
    assert rep["n"] == 25 and rep["scored"] == 18 and rep["skipped_gold_failed"] == 7
    assert rep["pred_error_rate"] == 0.0 and rep["execution_accuracy"] < 1.0


def test_cli_end_to_end_is_deterministic(adapter_dir, tmp_path, capsys):
    """Real greedy generation with the tiny adapter through the CLI; two runs give the same report."""
    outs = []
    for k in range(2):
        out = tmp_path / f"r{k}.json"
        assert main(["--adapter", str(adapter_dir), "--limit", "3", "--batch_size", "2", "--max_new_tokens", "6",
                     "--out", str(out), "--progress", "false"]) == 0
        outs.append(json.loads(out.read_text()))
    a, b = outs
    assert FIELDS <= set(a) and a["n"] == 3 and len(a["predictions"]) == 3
    assert a["config"]["adapter"] == str(adapter_dir) and a["config"]["model"] == "random:tiny"
    assert [p["prediction"] for p in a["predictions"]] == [p["prediction"] for p in b["predictions"]]
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)
    assert "execution_accuracy=" in capsys.readouterr().out


def test_adapter_changes_the_eval_loss(adapter_dir, loaded):
    """Base alone vs base + adapter: same rows, different loss (the adapter is really applied)."""
    model, tok, cfg = loaded
    base, _, _ = load_for_inference(None, "random:tiny", quant="nf4", compute_dtype="float32")
    rows, fmt = load_eval_rows("builtin:sql", limit=4)
    ex = loss_examples(rows, fmt, tok, cfg)
    with_adapter, n1 = eval_loss(model, ex, tok.pad_token_id)
    without, n2 = eval_loss(base, ex, tok.pad_token_id)
    assert n1 == n2 > 0 and abs(with_adapter - without) > 1e-3


def test_generation_helpers_are_shared():
    """generate.py, train.py and qlora.evaluation.evaluate use the same helpers from qlora.evaluation.generation, and the
    one loader from qlora.evaluation.inference; importing qlora.evaluation.evaluate does not need the repo root on sys.path."""
    import generate
    import train
    from qlora.evaluation import evaluate as ev
    from qlora.evaluation import generation, inference, merge

    assert generate.generate_ids is generation.generate_ids is ev.generate_ids is train.generate_ids
    assert generate.prompt_ids is generation.prompt_ids is ev.prompt_ids
    assert generate.load_for_inference is ev.load_for_inference is merge.load_for_inference is inference.load_for_inference


def test_eval_loss_matches_an_unpacked_reference(loaded):
    """eval_loss (packed rows, TokenLoss via qlora.training.loss.mean_token_loss) equals the token-mean
    cross-entropy of each example run alone through the plain model, labels shifted by hand.
    Measured difference 1e-7 relative (fp32 summation order); allowed 1e-5."""
    import torch.nn.functional as F

    model, tok, cfg = loaded
    rows, fmt = load_eval_rows("builtin:sql", limit=5)
    examples = loss_examples(rows, fmt, tok, cfg)
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            logits = model(input_ids=torch.tensor([ex.input_ids])).logits[0, :-1].float()
            labels = torch.tensor(ex.labels[1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
    loss, n = eval_loss(model, examples, tok.pad_token_id, batch_size=2)
    assert n == count > 0
    assert loss == pytest.approx(total / count, rel=1e-5)


def test_dequantized_inference_computes_the_4bit_model(adapter_dir):
    """dequantize=True (plain linears holding the dequantised NF4 weights) gives the logits of the
    4-bit base + adapter in fp32, and the same greedy text. Measured max |difference| 0.0 on this
    model (both dequantise the same NF4 blocks to fp32 and multiply in fp32); allowed 1e-5."""
    from qlora.evaluation.generation import generate_ids
    from qlora.evaluation.inference import linears_4bit

    four, tok, cfg = load_for_inference(str(adapter_dir), compute_dtype="float32")
    plain, _, _ = load_for_inference(str(adapter_dir), compute_dtype="float32", dequantize=True)
    assert linears_4bit(four) and not linears_4bit(plain)
    rows, fmt = load_eval_rows("builtin:sql", limit=3)
    prompts = eval_prompts(rows, fmt, tok, cfg.system_prompt)
    ids = torch.tensor([prompts[0] + prompts[1]])
    with torch.no_grad():
        a, b = four(input_ids=ids).logits, plain(input_ids=ids).logits
    assert (a - b).abs().max().item() <= 1e-5 and a.abs().max().item() > 0.1
    cpu = torch.device("cpu")
    assert generate_ids(four, tok, prompts, 8, cpu) == generate_ids(plain, tok, prompts, 8, cpu)
