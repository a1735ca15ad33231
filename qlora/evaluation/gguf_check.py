"""Check a GGUF file written by `qlora.evaluation.export` against the model it was written from, reading it back two
independent ways:

- `transformers`: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` and its tokenizer
  (transformers' own GGUF reader: its dequantisation, its q/k un-permutation, its tokenizer builder);
- the project's loader: `qlora.model.base.convert_gguf`, what `--model file.gguf` runs for train.py,
  generate.py and evaluate (converted into a temporary folder here, so the user's cache is not filled).

On held-out rows of the default job (`builtin:sql`, encoded as training encodes them) each read-back
model's logits at every position are compared with the source model's (`qlora.evaluation.merge.logit_errors`: max
and mean |logit error|, argmax agreement), the GGUF tokenizer must encode the rows to the same ids, and
greedy answers to the first eval prompts (the prompts train.py's end-of-run samples use) are compared
(`prompts=0`: none; `greedy_equal` is then None).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from ..model.base import convert_gguf
from .evaluate import eval_prompts, load_eval_rows, loss_examples
from .generation import generate_ids
from .merge import logit_errors


def read_with_transformers(path: Path, device):
    """(model, tokenizer) from transformers' own GGUF reader, fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 device_map={"": device})
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model.eval(), tokenizer


def read_with_project(path: Path, folder: Path, device):
    """The model `--model path` trains and generates from: `convert_gguf` into `folder`, loaded in fp32."""
    from transformers import AutoModelForCausalLM

    converted = convert_gguf(path, folder / "converted")
    return AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32, device_map={"": device}).eval()


@torch.no_grad()
def check_gguf_file(path, model, tokenizer, cfg, rows: int = 4, prompts: int = 2, max_new_tokens: int = 64,
                    data: str = "builtin:sql", readers=("transformers", "project_loader")) -> dict:
    """Compare `path` read back both ways (or the `readers` named) with `model` (the source, e.g. the merged
    model); returns the report."""
    path = Path(path)
    device = next(model.parameters()).device
    eval_rows, fmt = load_eval_rows(data, max(rows, prompts))
    ids = [ex.input_ids for ex in loss_examples(eval_rows[:rows], fmt, tokenizer, cfg)]
    questions = eval_prompts(eval_rows[:prompts], fmt, tokenizer, cfg.system_prompt)
    answers = (lambda m: generate_ids(m, tokenizer, questions, max_new_tokens, device) if questions else None)
    expected = answers(model)
    report = {"file": str(path), "file_bytes": path.stat().st_size, "check_rows": len(ids),
              "greedy_prompts": len(questions), "max_new_tokens": max_new_tokens}
    if "transformers" in readers:
        report["transformers"] = check_transformers(path, model, tokenizer, ids, answers, expected)
    if "project_loader" in readers:
        folder = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".check-{path.stem}-"))
        try:
            own = read_with_project(path, folder, device)
            report["project_loader"] = {**logit_errors(model, own, ids), "greedy_equal": answers(own) == expected}
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    report["greedy_answers"] = expected
    return report


def check_transformers(path: Path, model, tokenizer, ids, answers, expected) -> dict:
    """Logit errors, tokenizer agreement and greedy answers (`answers(model)`) of `path` read by transformers."""
    hf_model, hf_tok = read_with_transformers(path, next(model.parameters()).device)
    texts = [tokenizer.decode(r) for r in ids]  # the same text through both tokenizers
    same_ids = [hf_tok(t, add_special_tokens=False)["input_ids"] == tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in texts]
    return {**logit_errors(model, hf_model, ids), "tokenizer_same_ids": sum(same_ids) / len(ids),
            "greedy_equal": answers(hf_model) == expected}
