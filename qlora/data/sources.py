"""Where rows come from: source specs, local files read record by record, and column mapping.

A source is `path[:formatter][?field=column&...]`, a hub id, `builtin:sql`, or a mapping of `Source`
fields. Local .jsonl/.json/.csv/.parquet files are read here rather than through `datasets`, so that an
error names the line of the file, and every row keeps its place in the file for later messages
(`Rows.where`). `columns` maps a formatter's field to a column of the file: `my.csv:prompt_response?
prompt=question&response=answer` reads the file's `question` as the formatter's `prompt`.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from .errors import lone_surrogate
from .formatters import FIELDS, FORMATTERS, DataError, MappedRow, kind_of

BUILTIN = {"builtin:sql": Path(__file__).resolve().parent.parent.parent / "data" / "sql"}
LOCAL_EXT = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Source:
    path: str
    formatter: str = ""  # "" = detect from the columns
    split: str = "train"
    eval_split: str = ""  # "" = hold out cfg.eval_fraction of the train split
    weight: float = 1.0  # rows per epoch = weight * len(source)
    columns: dict = field(default_factory=dict)  # formatter field -> the file's column


class Rows(list):
    """The rows of one source; `where(i)` names row i as it is in the file ("x.jsonl line 4"), also after
    `pick` (a shuffle or a slice) has reordered them."""

    def __init__(self, rows=(), name: str = "", lines: list[int] | None = None, index: list[int] | None = None):
        super().__init__(rows)
        self.name, self.lines, self.index = name, lines, index

    def where(self, i: int) -> str:
        k = self.index[i] if self.index is not None else i
        return f"{self.name} line {self.lines[k]}" if self.lines is not None else f"{self.name} row {k} (0-based)"

    def pick(self, order) -> "Rows":
        return Rows([list.__getitem__(self, i) for i in order], self.name, self.lines,
                    [self.index[i] if self.index is not None else i for i in order])

    def __getitem__(self, k):
        return self.pick(range(len(self))[k]) if isinstance(k, slice) else list.__getitem__(self, k)


def is_local(path: str) -> bool:
    p = Path(path).expanduser()
    return p.suffix.lower() in LOCAL_EXT or p.exists() or path.startswith((".", "/", "~"))


def _unknown_formatter(spec, name: str) -> DataError:
    close = difflib.get_close_matches(name, list(FORMATTERS), n=1, cutoff=0.5) or \
        [f for f in FORMATTERS if f.startswith(name[:3])][:1]
    hint = f" (did you mean {close[0]}?)" if close else ""
    return DataError(f"dataset {spec}: unknown formatter '{name}'{hint}; choose one of {', '.join(FORMATTERS)}")


def _columns_from_query(spec: str, query: str) -> dict:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        pairs = [("", "")]
    if any(not f or not c for f, c in pairs) or len({f for f, _ in pairs}) != len(pairs):
        raise DataError(f"dataset {spec}: after '?' give field=column pairs joined by '&', each field once, "
                        "e.g. my.csv:prompt_response?prompt=question&response=answer")
    return dict(pairs)


def parse_source(spec) -> Source:
    """`"path[:formatter][?field=column&...]"`, `"builtin:sql"`, a hub id, or a dict of `Source` fields."""
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(Source.__dataclass_fields__))
        if unknown or not isinstance(spec.get("path"), str) or not spec["path"]:
            raise DataError(f"dataset entry {spec}: needs 'path' and only the keys "
                            f"{', '.join(Source.__dataclass_fields__)}{f' (unknown: {unknown})' if unknown else ''}")
        src = Source(**spec)
        for key in ("formatter", "split", "eval_split"):
            if not isinstance(getattr(src, key), str):
                raise DataError(f"dataset {src.path}: '{key}' must be a string (got {getattr(src, key)!r})")
        if not isinstance(src.columns, dict) or not all(isinstance(v, str) and v for v in src.columns.values()):
            raise DataError(f"dataset {src.path}: 'columns' maps the formatter's fields to your file's columns, "
                            f"e.g. {{prompt: question, response: answer}} (got {src.columns!r})")
    elif isinstance(spec, str):
        path, _, query = spec.partition("?")
        formatter, columns = "", _columns_from_query(spec, query) if query else {}
        head, sep, tail = path.rpartition(":")
        if sep and tail in FORMATTERS:
            path, formatter = head, tail
        elif sep and re.fullmatch(r"[A-Za-z_]\w*", tail) and is_local(head):
            raise _unknown_formatter(spec, tail)
        src = Source(path=path, formatter=formatter, columns=columns)
    else:
        raise DataError(f"dataset entry {spec!r} must be a string or a mapping")
    if src.formatter and src.formatter not in FORMATTERS:
        raise _unknown_formatter(src.path, src.formatter)
    if src.path.startswith("builtin:") and src.path not in BUILTIN:
        raise DataError(f"unknown built-in dataset '{src.path}'; built in: {', '.join(BUILTIN)}")
    if isinstance(src.weight, bool) or not isinstance(src.weight, (int, float)) or not (
            math.isfinite(src.weight) and src.weight > 0):
        raise DataError(f"dataset {src.path}: weight must be a number > 0 (got {src.weight!r})")
    if src.eval_split and is_local(src.path):
        raise DataError(f"dataset {src.path}: eval_split names a split of a hub dataset, and a local file has "
                        "none: put the held-out rows in their own file and list it in eval_datasets")
    if src.columns:
        _check_columns(src)
    return src


def _check_columns(src: Source) -> None:
    if src.formatter and src.formatter not in FIELDS:  # a formatter without a field table takes any
        return
    fields = (sum(FIELDS[src.formatter], ()) if src.formatter
              else tuple(sorted({f for spec in FIELDS.values() for f in sum(spec, ())})))
    bad = [f for f in src.columns if f not in fields]
    if bad:
        raise DataError(f"dataset {src.path}: columns maps '{bad[0]}', which is not a field of "
                        f"{src.formatter or 'any formatter'} ({', '.join(fields)}); write field=column (the "
                        "formatter's field = your file's column), e.g. prompt=question")


# --------------------------------------------------------------------------- reading local files

def _decode(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"data file {name} line {line} is not valid UTF-8 (byte 0x{data[e.start]:02x}): "
                        "save the file as UTF-8") from None


# a `\\uD800`-`\\uDFFF` escape: JSON can spell a lone UTF-16 surrogate, which is not text (no tokenizer takes it)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


def _lone_surrogate(value, path: str = "") -> tuple[str, str] | None:
    """(where: "field 'messages[1].content'" or a field name, the escape) of the first string in `value`
    that holds a lone surrogate; None when there is none."""
    if isinstance(value, str):
        bad = lone_surrogate(value)
        return (f"field '{path}'", bad) if bad else None
    if isinstance(value, dict):
        for k in value:
            if isinstance(k, str) and (bad := lone_surrogate(k)):
                return (f"a field name in '{path}'" if path else "a field name", bad)
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{k}]", v) for k, v in enumerate(value))
    else:
        return None
    return next((found for sub, v in items if (found := _lone_surrogate(v, sub))), None)


def _check_text(obj: dict, where: str) -> None:
    """A record whose JSON spelled a lone surrogate (`"\\ud800"`, half of an emoji's pair) is an error naming
    the field: such a string is not text (it cannot be written as UTF-8 or tokenised). A surrogate pair is
    decoded to one character and is fine."""
    found = _lone_surrogate(obj)
    if found:
        field, esc = found
        raise DataError(f"{where}: {field} holds the escape {esc}, half of a UTF-16 surrogate pair without "
                        "its other half, which is not text: fix or remove that escape in the file")


def _read_jsonl(text: str, name: str) -> Rows:
    rows, lines = [], []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data file {name} line {n} is not valid JSON ({e.msg}, column {e.colno}): each line "
                            "must be one JSON object") from None
        if not isinstance(obj, dict):
            raise DataError(f"data file {name} line {n} is {kind_of(obj)}, not a JSON object: each line must be "
                            'one record such as {"prompt": "...", "response": "..."}')
        if _SURROGATE_ESCAPE.search(line):  # only such a line can hold one
            _check_text(obj, f"data file {name} line {n}")
        rows.append(obj)
        lines.append(n)
    return Rows(rows, name, lines)


def _read_json(text: str, name: str) -> Rows:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file
            return _read_jsonl(text, name)
        raise DataError(f"data file {name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        if len([line for line in text.split("\n") if line.strip()]) == 1:
            return _read_jsonl(text, name)  # one record on one line: JSONL in a .json file
        keys = ", ".join(map(str, list(data)[:8])) + (", ..." if len(data) > 8 else "")
        lists = [k for k, v in data.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        hint = (f"; if the records are the list under '{lists[0]}', save that list alone as the file"
                if len(lists) == 1 else "")
        raise DataError(f"data file {name}: the top level is one JSON object (keys: {keys or 'none'}), not a list of "
                        f"records: write a list [{{...}}, ...] at the top level, or one record per line "
                        f"(.jsonl){hint}")
    if not isinstance(data, list):
        raise DataError(f"data file {name} holds {kind_of(data)}: use a list of records [{{...}}, ...] or .jsonl")
    for i, obj in enumerate(data):
        if not isinstance(obj, dict):
            raise DataError(f"data file {name} item {i} (0-based) is {kind_of(obj)}, not an object {{...}}")
    if _SURROGATE_ESCAPE.search(text):
        for i, obj in enumerate(data):
            _check_text(obj, f"data file {name} item {i} (0-based)")
    return Rows(data, name)


def _read_csv(text: str, name: str) -> Rows:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows, lines = [], []
    try:
        reader.fieldnames  # reads the header, so that line_num counts it
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            if None in row:
                raise DataError(f"data file {name} line {start} has more cells than the header "
                                f"({', '.join(reader.fieldnames)}): quote cells that contain commas")
            rows.append(row)
            lines.append(start)
    except csv.Error as e:
        raise DataError(f"data file {name} line {reader.line_num} is not valid CSV: {e}") from None
    return Rows(rows, name, lines)


def _read_parquet(path: Path, name: str) -> Rows:
    import pyarrow.parquet as pq

    try:
        return Rows(pq.read_table(path).to_pylist(), name)
    except Exception as e:  # pyarrow raises several types for a damaged file
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"data file {name} could not be read as parquet ({why})") from None


def read_local(path: Path, name: str) -> Rows:
    """Every record of a local data file, in file order, each knowing its line or row."""
    kind = path.suffix.lower()
    if kind == ".parquet":
        return _read_parquet(path, name)
    try:
        text = _decode(path.read_bytes(), name)
    except OSError as e:
        raise DataError(f"data file {name} cannot be read: {e.strerror}") from None
    return {".csv": _read_csv, ".jsonl": _read_jsonl}.get(kind, _read_json)(text, name)


# --------------------------------------------------------------------------- loading a source

def load_rows(src: Source, split: str) -> Rows:
    """Rows of one split of a source as dicts (columns mapped to the formatter's fields); hub ids go
    through `datasets`, with offline-safe errors. An empty source is an error."""
    if src.path in BUILTIN:
        f = BUILTIN[src.path] / f"{'test' if split in ('test', 'eval', 'validation') else 'train'}.jsonl"
        rows = read_local(f, f"{src.path} ({f.name})")
    elif is_local(src.path):
        p = Path(src.path).expanduser()
        if not p.is_file():
            raise DataError(f"data file {src.path} {'is a directory' if p.is_dir() else 'not found'}: check the "
                            f"path (relative paths are from the current directory {Path.cwd()})")
        if p.suffix.lower() not in LOCAL_EXT:
            raise DataError(f"data file {src.path}: unsupported extension; use .json, .jsonl, .parquet or .csv")
        rows = read_local(p, src.path)
    else:
        rows = _load_hub(src, split)
    if not rows:
        raise DataError(f"dataset {rows.name} has no rows: check the file, or drop it from the datasets")
    return map_columns(rows, src.columns) if src.columns else rows


def _load_hub(src: Source, split: str) -> Rows:
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(src.path, split=split)
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"dataset '{src.path}' (split {split}) could not be loaded: {why} -- "
                        "offline runs need a local file or a dataset already in the HF cache") from None
    return Rows(ds.to_list(), f"dataset '{src.path}' (split {split})")


def map_columns(rows: Rows, columns: dict) -> Rows:
    """Each row with the mapped columns renamed to the formatter's fields; a mapped column that no
    row has is an error naming it and the file's columns."""
    present = set().union(*(r.keys() for r in rows))
    for fld, col in columns.items():
        if col not in present:
            close = difflib.get_close_matches(col, sorted(present), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise DataError(f"dataset {rows.name}: column '{col}' (mapped to field '{fld}') is not in the file"
                            f"{hint}; its columns are: {', '.join(sorted(present))}")
    return Rows([MappedRow(r, columns) for r in rows], rows.name, rows.lines, rows.index)
