"""Datasets -> prompt/response conversations -> token ids with response-only labels.

A *source* (qlora/data/sources.py) is a hub id or a local json/jsonl/parquet/csv file, optionally with a
formatter and a column mapping (`my.csv:prompt_response?prompt=question&response=answer`), or a dict
with `path`, `formatter`, `split`, `eval_split`, `weight`, `columns`.
`builtin:sql` is the text-to-SQL set that ships in `data/sql/`.
Each row becomes a list of chat messages; `encode` renders them with the tokenizer's chat template
(or the Llama-2 `[INST]` format when it has none) and supervises every assistant turn and the EOS or
end-of-turn token that closes it.
"""

from __future__ import annotations

import functools
import os
import random
import sys
from dataclasses import dataclass, field

from .errors import DataError, SkipRow, lone_surrogate
from .formatters import FORMATTERS, detect_formatter
from .sources import BUILTIN, LOCAL_EXT, Rows, Source, load_rows, parse_source  # noqa: F401 (re-exported)

IGNORE = -100


@dataclass
class Example:
    input_ids: list
    labels: list  # IGNORE on prompt tokens, the token itself on supervised ones
    source: str = ""

    @property
    def n_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass
class DataStats:
    rows: int = 0
    kept: int = 0
    dropped_no_supervised: int = 0
    dropped_overlong: int = 0
    truncated: int = 0
    skipped: dict = field(default_factory=dict)  # reason -> rows the formatter could not use (SkipRow)
    per_source: dict = field(default_factory=dict)
    system_from: set = field(default_factory=set)  # where kept examples' system text came from: "config", "rows"

    def summary(self) -> str:
        skipped = "".join(f"; skipped {n} ({why})" for why, n in sorted(self.skipped.items()))
        return (f"{self.rows} rows -> {self.kept} examples; dropped {self.dropped_overlong} over-long, "
                f"{self.dropped_no_supervised} with no supervised token; truncated {self.truncated}{skipped}")


# --------------------------------------------------------------------------- rendering and labels

def _render(tok, messages, add_generation_prompt=False) -> str:
    if tok.chat_template:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return render_llama2(messages, tok, add_generation_prompt)


def render_llama2(messages, tok, add_generation_prompt=False) -> str:
    """Llama-2 chat format for tokenizers without a template: `[INST] <<SYS>>..<</SYS>> q [/INST] a </s>`.
    The BOS is added by `encode` (exactly once, at the start)."""
    out, system = [], ""
    for m in messages:
        if m["role"] == "system":
            system = f"<<SYS>>\n{m['content']}\n<</SYS>>\n\n"
        elif m["role"] == "user":
            out.append(f"[INST] {system}{m['content'].strip()} [/INST]")
            system = ""
        else:
            out.append(f" {m['content'].strip()} {tok.eos_token}")
    return "".join(out)  # a generation prompt already ends with [/INST]


_SYSTEM_PROBE = "qlora-system-probe-3f9c1d"
_DROPS_SYSTEM: dict[str, bool] = {}  # chat template -> whether it renders conversations without their system turn


def drops_system_turns(tok) -> bool:
    """Whether rendering a conversation for training loses its system turn: the tokenizer's chat template
    renders only user and assistant turns (Mistral's does). Found by rendering a probe conversation with a
    marker in the system turn and looking for the marker; once per template. The Llama-2 format used when
    there is no template keeps it."""
    template = getattr(tok, "chat_template", None)
    if not template:
        return False
    key = template if isinstance(template, str) else repr(template)
    if key not in _DROPS_SYSTEM:
        probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "Hello"}]
        try:
            _DROPS_SYSTEM[key] = _SYSTEM_PROBE not in _render(tok, probe)
        except Exception:  # noqa: BLE001 -- a template that rejects system turns outright: encoding the rows
            _DROPS_SYSTEM[key] = False  # says so itself, with the template's own message
    return _DROPS_SYSTEM[key]


def system_dropped_message(tok, system_from, text: str = "the training text") -> str | None:
    """The warning for system text that the chat template leaves out of `text`, None when there is none to
    give. `system_from` holds "config" (the `system_prompt` key was added to rows) and/or "rows" (rows had
    system turns of their own)."""
    if not system_from or not drops_system_turns(tok):
        return None
    what = [w for key, w in (("config", "--system_prompt"), ("rows", "the rows' system text")) if key in system_from]
    return (f"the tokenizer's chat template drops system turns: {' and '.join(what)} "
            f"{'are' if len(what) > 1 else 'is'} not in {text}")


def warn_once(msg: str) -> None:
    """`msg` as a `warning:` line on stderr, once per process (the first rank's only)."""
    if msg not in _WARNED:
        _WARNED.add(msg)
        _warn(msg)


_WARNED: set = set()


def _warn(msg: str) -> None:
    """A `warning:` line on stderr, from the first process only (every rank loads the same data)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def supervised_spans(tok, messages) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation and return (text, [(start, end) char spans to supervise]).

    Each assistant turn's span runs from its content through the token that closes it (EOS, or the
    template's end-of-turn token: Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`, Phi-3's `<|end|>`),
    whitespace between the two included; nothing of the prompt glue before the content. Templates must be
    prefix-stable (rendering the first k turns is a prefix of rendering all of them, an EOS that only closes
    the whole conversation apart); we check that rather than trust it.
    """
    eos = tok.eos_token
    markers = _turn_closers(tok)
    text = _render(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tok, messages[:i], add_generation_prompt=True) if i else ""
        upto = _render(tok, messages[: i + 1])
        if not text.startswith(upto) and eos and upto.endswith(eos):  # Phi-3 ends a whole conversation with EOS
            upto = upto[: -len(eos)]
        if not text.startswith(upto) or not upto.startswith(before):
            raise DataError("the tokenizer's chat template is not prefix-stable; response-only labels cannot "
                            "be located (use a tokenizer without a template or a simpler one)")
        content = m["content"].strip() if m["content"].strip() in upto[len(before):] else m["content"]
        start = upto.find(content, len(before)) if content else len(before)
        if start < 0:
            raise DataError("assistant content was changed by the chat template; cannot locate it")
        end = start + len(content)
        close, marker = _first_marker(upto, end, markers)
        if close < 0 or upto[end:close].strip():
            raise DataError(f"the chat template does not close assistant turns with EOS {eos!r} or another special "
                            "token right after the response")
        # the content, the whitespace the template puts before its closer, and the closer: all of it is what the
        # model must write to end its turn (a space before EOS is its own token in SentencePiece vocabularies;
        # left out, the model never learns to emit it and, at inference, never reaches EOS)
        spans.append((start, close + len(marker)))
    return text, spans


def _turn_closers(tok) -> list[str]:
    """Tokens that may close an assistant turn: EOS and the tokenizer's other special tokens, BOS and pad
    apart (pad only where it is not EOS too; the template's end-of-turn token is one of them)."""
    added = [t.content for t in getattr(tok, "added_tokens_decoder", {}).values() if getattr(t, "special", False)]
    skip = {tok.bos_token, None} | ({tok.pad_token} if tok.pad_token != tok.eos_token else set())
    return list(dict.fromkeys(m for m in [tok.eos_token, *tok.all_special_tokens, *added] if m not in skip))


def stop_ids(tok) -> frozenset[int]:
    """Token ids that end a generated answer: EOS, and the token the rendering closes an assistant turn with
    when that is another one (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`): training supervises the closer,
    so that is what a fine-tuned model writes when its answer is done."""
    ids = {tok.eos_token_id}
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    try:
        text, spans = supervised_spans(tok, probe)
        closer = text[spans[-1][0]:spans[-1][1]].removeprefix("Hello").strip()
        cid = tok.convert_tokens_to_ids(closer) if closer else None
        if cid != tok.unk_token_id or closer == tok.unk_token:  # not one token: not a closer
            ids.add(cid)
    except (DataError, ValueError, TypeError, KeyError, IndexError, AttributeError):  # EOS only (a template that
        pass  # needs other turns, or a tokenizer with no rendering of its own)
    return frozenset(i for i in ids if isinstance(i, int))


def _first_marker(text: str, start: int, markers: list[str]) -> tuple[int, str]:
    """(position, marker) of the first of `markers` in `text` at or after `start`; (-1, "") if none."""
    found = [(i, m) for m in markers if (i := text.find(m, start)) >= 0]
    return min(found, key=lambda f: (f[0], -len(f[1]))) if found else (-1, "")


def encode(messages, tok, max_len: int, overlong: str = "drop") -> tuple[Example | None, str]:
    """Token ids and labels of one conversation. Returns (example or None, reason it was dropped)."""
    text, spans = supervised_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for j, (a, b) in enumerate(offsets):
        if any(a < e and b > s for s, e in spans):
            labels[j] = ids[j]
    if tok.bos_token_id is not None and _adds_bos(tok) and (not ids or ids[0] != tok.bos_token_id):
        ids, labels = [tok.bos_token_id] + ids, [IGNORE] + labels  # exactly one BOS
    status = ""
    if len(ids) > max_len:
        if overlong == "drop":
            return None, "overlong"
        ids, labels, status = ids[:max_len], labels[:max_len], "truncated"
    if all(x == IGNORE for x in labels[1:]):  # position 0 is never predicted
        return None, "overlong" if status else "no_supervised"
    return Example(ids, labels), status


def _adds_bos(tok) -> bool:
    """Whether the tokenizer's own encoding starts with BOS (Llama-2 does, SmolLM2's template has none)."""
    probe = tok("a", add_special_tokens=True)["input_ids"]
    return bool(probe) and probe[0] == tok.bos_token_id


# --------------------------------------------------------------------------- building datasets

def build_examples(rows: list[dict], src: Source, tok, max_len: int, overlong: str, stats: DataStats,
                   system_prompt: str = "") -> list[Example]:
    """Format, render and tokenise the rows of one source, counting what is dropped and why."""
    name = src.formatter or detect_formatter(rows, src.path)
    fmt = FORMATTERS[name]
    if getattr(fmt, "needs_source", False):  # reads files beside the data (spider: its databases)
        fmt = functools.partial(fmt, source=src.path)
    out = []
    for i, row in enumerate(rows):
        where = rows.where(i) if isinstance(rows, Rows) else f"{src.path} row {i}"
        try:
            messages = fmt(row, where=where)
        except SkipRow as e:
            stats.rows += 1
            stats.skipped[str(e)] = stats.skipped.get(str(e), 0) + 1
            continue
        own_system = any(m["role"] == "system" and m["content"].strip() for m in messages)
        added = bool(system_prompt) and messages[0]["role"] != "system"
        if added:
            messages = [{"role": "system", "content": system_prompt}] + messages
        try:
            ex, why = encode(messages, tok, max_len, overlong)
        except TypeError:  # the tokenizer's answer to a string that is not text (a lone UTF-16 surrogate)
            bad = next((j for j, m in enumerate(messages) if lone_surrogate(m["content"])), None)
            if bad is None:
                raise
            what = "config key 'system_prompt'" if added and bad == 0 else f"{where}: its {messages[bad]['role']} turn"
            raise DataError(f"{what} holds a lone UTF-16 surrogate (half of a pair, such as \\ud800), which is not "
                            "text and cannot be tokenised: fix or remove it") from None
        stats.rows += 1
        if ex is None:
            if why == "overlong":
                stats.dropped_overlong += 1
            else:
                stats.dropped_no_supervised += 1
            continue
        stats.truncated += why == "truncated"
        if added and system_prompt.strip():
            stats.system_from.add("config")
        if own_system:
            stats.system_from.add("rows")
        ex.source = src.path
        out.append(ex)
    stats.kept += len(out)
    stats.per_source[src.path] = {"rows": len(rows), "examples": len(out), "formatter": name}
    return out


def load_datasets(specs, tok, max_len: int, overlong: str, eval_fraction: float, seed: int,
                  eval_specs=(), system_prompt: str = "", warn=None) -> tuple[list[Example], list[Example], DataStats]:
    """Train and eval examples from all sources, mixed by weight, each split deterministic for `seed`.

    System text that the tokenizer's chat template leaves out of the rendered examples (the `system_prompt`
    key, rows' own system turns) is reported once, with `warn(message)` (default: a `warning:` line on
    stderr)."""
    stats, train, evals = DataStats(), [], []
    for spec in specs:
        src = parse_source(spec)
        rows = load_rows(src, src.split)
        if src.eval_split or src.path in BUILTIN:
            held = [] if eval_specs else load_rows(src, src.eval_split or "test")
        else:
            order = list(range(len(rows)))
            random.Random(seed).shuffle(order)
            n_eval = 0 if eval_specs else int(round(eval_fraction * len(rows)))
            held, rows = rows.pick(order[:n_eval]), rows.pick(order[n_eval:])  # rows keep their place in the file
        examples = build_examples(rows, src, tok, max_len, overlong, stats, system_prompt)
        evals += build_examples(held, src, tok, max_len, overlong, DataStats(), system_prompt) if held else []
        train += mix(examples, src.weight, seed)
    for spec in eval_specs:
        src = parse_source(spec)
        evals += build_examples(load_rows(src, src.split), src, tok, max_len, overlong, DataStats(), system_prompt)
    if not train:
        raise DataError(f"no training examples left after filtering ({stats.summary()}): "
                        f"{_why_none_left(stats, overlong, max_len)}")
    dropped = system_dropped_message(tok, stats.system_from)
    if dropped:
        (warn or _warn)(dropped)
    return train, evals, stats


def _why_none_left(stats: DataStats, overlong: str, max_len: int) -> str:
    """What emptied the training set, and what to do about it, as the counts in `stats` tell it."""
    skipped = sum(stats.skipped.values())
    if stats.rows and skipped == stats.rows:
        where = ("; a Spider file needs its databases beside it, as database/<db_id>/<db_id>.sqlite"
                 if any("Spider" in why for why in stats.skipped) else "")
        return f"every row was skipped ({', '.join(sorted(stats.skipped))}){where}"
    if stats.dropped_overlong and stats.dropped_overlong == stats.rows - skipped:
        if overlong == "truncate":  # truncation keeps the prompt: these prompts alone fill max_seq_len
            return (f"with --overlong truncate, every prompt alone takes max_seq_len ({max_len} tokens) or more, "
                    "so truncation cut off every response: raise --max_seq_len (or shorten the prompts or the "
                    "system prompt)")
        return "every example is longer than max_seq_len: raise --max_seq_len or use --overlong truncate"
    return "no example has a supervised (response) token"


def mix(examples: list[Example], weight: float, seed: int) -> list[Example]:
    """Repeat or subsample a source to `weight * len` examples (deterministic)."""
    if weight <= 0:
        raise DataError(f"dataset weight must be > 0 (got {weight})")
    whole, frac = int(weight), weight - int(weight)
    out = examples * whole
    if frac:
        idx = sorted(random.Random(seed + 1).sample(range(len(examples)), int(round(frac * len(examples)))))
        out += [examples[i] for i in idx]
    return out


