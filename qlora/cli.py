"""Plumbing shared by the inference command lines (generate.py, `python -m qlora.evaluate`,
`python -m qlora.merge`): an argparse whose usage errors are one `error:` line, argument types, the
model arguments `qlora.evaluation.inference.load_for_inference` takes, and an early check that an output path
can be written."""

from __future__ import annotations

import argparse
import difflib
import gzip
import json
import os
import sys
from pathlib import Path

import torch

from .config import ConfigError


class ArgParser(argparse.ArgumentParser):
    """argparse for the project's command lines: a usage error is one `error:` line (exit code 2), like
    every other bad input; each `--snake_case` flag is accepted as `--snake-case` too (train.py's
    config keys are), and an unknown flag is answered with the nearest known one."""

    def parse_known_args(self, args=None, namespace=None):
        args = [self._snake(a) for a in (sys.argv[1:] if args is None else args)]
        unknown = [a for a in args if a.startswith("--") and a != "--" and not self._known(a.partition("=")[0])]
        if unknown:  # before argparse's own checks, which would name a missing required flag first
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return super().parse_known_args(args, namespace)

    def _known(self, flag: str) -> bool:
        """`flag` names an option, exactly or as an unambiguous prefix (argparse's abbreviations)."""
        return flag in self._option_string_actions or (self.allow_abbrev and len(
            [f for f in self._option_string_actions if f.startswith(flag)]) == 1)

    def _snake(self, arg: str) -> str:
        """`--max-new-tokens[=v]` -> `--max_new_tokens[=v]` where only the underscore spelling is a flag."""
        if not arg.startswith("--"):
            return arg
        name, eq, value = arg.partition("=")
        snake = "--" + name[2:].replace("-", "_")
        known = self._option_string_actions
        return snake + eq + value if name not in known and snake in known else arg

    def error(self, message: str):
        if message.startswith("unrecognized arguments: "):
            first = message.removeprefix("unrecognized arguments: ").split()[0].partition("=")[0]
            flags = [f for f in self._option_string_actions if f.startswith("--")]
            near = difflib.get_close_matches(first.replace("-", "_"), flags, n=1, cutoff=0.6)
            message += f"; did you mean {near[0]}?" if near else ""
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def count(minimum: int):
    """argparse type: an integer >= `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= {minimum}")
        return value
    return parse


def flag(text: str) -> bool:
    """argparse type: true/false, as the config's booleans are written."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return text.lower() == "true"


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """--adapter, --model, --quant, --compute_dtype, --dequantize: what `load_for_inference` takes."""
    ap.add_argument("--adapter", help="adapter folder written by train.py (e.g. runs/default/final)")
    ap.add_argument("--model", help="with --adapter: another base model; alone: a base model (smollm2, hub id, "
                    "dir, .gguf, random:tiny) or a merged dir written by qlora.evaluation.merge")
    ap.add_argument("--quant", choices=["nf4", "fp4", "none"], help="base weights (default: the adapter's config; "
                    "nf4 for a base model; none for a merged dir)")
    ap.add_argument("--compute_dtype", choices=["auto", "bfloat16", "float16", "float32"])
    ap.add_argument("--dequantize", default="auto", choices=["auto", "true", "false"],
                    help="run 4-bit linears as plain ones holding their dequantised weights: the same logits "
                    "(identical in fp32), 1.1-1.7x faster generation on a CPU; auto = true on CPU")


def dequantize_choice(value: str, device=None) -> bool:
    """--dequantize auto|true|false -> bool (auto: on CPU, where the plain linears are faster)."""
    if value != "auto":
        return value == "true"
    return (torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")).type == "cpu"


def check_writable(path: str, flag_name: str) -> None:
    """Fail before any work when `path` cannot be written: an existing folder where a file goes, or a
    parent folder that is a file or read-only."""
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"{flag_name} {path} is a folder: give a file name")
    parent = next((p for p in target.parents if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag_name} {path}: cannot write in {parent} ({'a file' if not parent.is_dir() else 'read-only'}): "
                          f"choose another {flag_name}")


def publish_report(report: dict, summary: str, out: str) -> None:
    """Print a report's one-line summary and, with `out`, write the report there as JSON."""
    print(summary, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
        print(f"report: {out}")


def read_report(path: str | Path) -> dict:
    """A report publish_report wrote, as written (`.json`) or gzip-compressed (`.json.gz`, how large ones are kept)."""
    path = Path(path)
    return json.loads(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_text())
