"""One flat training config: a dataclass with defaults, YAML presets and `--key value` overrides.

Resolution order: dataclass defaults < `--config FILE.yaml` < command-line `--key value`.
Unknown keys and values of the wrong type are errors (`ConfigError`) that name the key and the source.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data.errors import DataError
from .data.sources import parse_source


class ConfigError(ValueError):
    """A bad config key or value; the message names the key, where it came from and what to do."""


@dataclass
class Config:
    # --- model ---
    model: str = "smollm2"  # hub id, local dir, .gguf file, "smollm2" (embedded default), "gemma3-270m" or "random:<shape>[:vocab]"
    tokenizer: str = ""  # tokenizer source if not the model's own
    quant: str = "nf4"  # base weights: "nf4" or "fp4" (bitsandbytes 4-bit) or "none" (full precision)
    double_quant: bool = True  # quantize the 4-bit scales too (~0.4 bit/param saved)
    quant_storage: str = "uint8"  # dtype the packed 4-bit weights are stored in: "uint8", or the compute dtype
    # ("bfloat16") for FSDP, which can only shard floating-point parameters (configs/accelerate/fsdp.yaml)
    compute_dtype: str = "auto"  # "auto" (bf16 where fast: CUDA with bf16, and CPU), "bfloat16", "float16", "float32"
    trust_remote_code: bool = False  # never run model code from a hub unless you ask for it
    fsdp_low_memory_load: bool = True  # FSDP2: read (or build) the base one decoder layer at a time and park each
    # in host memory until FSDP moves its shard to the GPU, so no GPU holds the whole model (host RAM: one 4-bit
    # model per rank). false: from_pretrained, the whole 4-bit model on every GPU before sharding
    recompute: bool = True  # recompute activations in backward (non-reentrant activation checkpointing)
    recompute_layers: int = -1  # how many decoder layers (from the first) recompute; -1 = all. Fewer = faster,
    # more memory: on a big GPU recompute only what does not fit (benchmarks/NOTES.md)
    fused_lora: bool = True  # NF4 linear + LoRA as one autograd node (qlora/speed/lora_fused.py); off = peft's forward
    absmax_cache: bool = True  # fused path: keep double-quant scales dequantised (+0.5 bit/param: 0.4 GiB at 7B)
    nf4_kernel: bool = True  # fused path: 4-bit weights dequantised by a tiled Triton kernel on CUDA
    # (qlora/speed/nf4_kernel.py), the same values as bitsandbytes' kernel, which runs elsewhere (named at start-up)
    kernels: str = "auto"  # fused RMSNorm/RoPE/SwiGLU: "auto" (liger-kernel on CUDA if installed), "liger", "none"
    ce_kernel: bool = True  # the loss head's softmax, loss and logits gradient in one Triton kernel per chunk of
    # positions on CUDA (qlora/speed/ce_rows.py; same fp32 arithmetic, ~9x less memory traffic); false or no Triton: torch ops
    seeded_dropout: bool = False  # LoRA dropout mask recomputed from a seed (qlora/speed/seeded_dropout.py): no stored
    # mask (-36 KB/token/layer at 7B), no RNG state; needed by cuda_graphs when lora_dropout > 0
    cuda_graphs: bool = False  # capture each micro-batch's forward+backward as one CUDA graph (qlora/speed/cuda_graphs.py):
    # no per-kernel host cost; one GPU, packed rows padded to max_seq_len
    offload_recompute: bool = False  # recomputed layers keep their inputs in pinned host memory (long rows)
    recompute_attention: bool = True  # recomputed layers run their attention kernel again in backward; false keeps
    # its output (hidden x 2 + heads x 4 bytes per token and layer) and recomputes the rest (qlora/speed/keep_attention.py)
    rebuild_inputs: bool = False  # layers that do not recompute rebuild the norm outputs and the gated MLP activation
    # their 4-bit projections read, in backward, instead of keeping them (qlora/speed/rebuild.py): bitwise the same
    # training, 1/3 less memory per such layer, so fewer layers need to recompute; needs fused_lora
    group_projections: bool = False  # q/k/v and gate/up, which read one input, as one autograd node each
    # (qlora/speed/grouped.py): their input gradients summed inside the GEMMs, one LoRA-A GEMM; needs fused_lora
    mlp_tile_tokens: int = 0  # a micro-batch of more tokens runs each MLP in tiles of this many (qlora/speed/tiled_mlp.py):
    # one tile's intermediates at a time, for one more MLP forward per layer; very long rows. 0 = off
    base_fp8: bool = False  # the frozen 4-bit weight's two GEMMs per linear in float8 e4m3, per-row scales
    # (qlora/speed/fp8.py): faster on Ada/Hopper, less precise (RESULTS.md gives the loss deviation); needs fused_lora
    fp8_exclude: list = field(default_factory=lambda: ["down_proj"])  # projections that stay bf16 under base_fp8:
    # down_proj (reads the SwiGLU output) alone raised the loss most consistently (benchmarks/fp8_precision.py)
    # --- LoRA ---
    lora_r: int = 8  # adapter rank
    lora_alpha: float = 64.0  # scale = alpha / r
    lora_dropout: float = 0.05  # dropout on the adapter input
    lora_targets: list = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )  # module names that get adapters
    # --- data ---
    datasets: list = field(default_factory=lambda: ["builtin:sql"])  # sources: "path[:formatter]", hub ids, or dicts
    eval_datasets: list = field(default_factory=list)  # held-out sources; empty = each source's eval split or a slice
    eval_fraction: float = 0.05  # share of train rows held out when a source has no eval split
    max_seq_len: int = 1024  # tokens per row
    packing: bool = True  # pack several examples per row (attention kept per example)
    attn_backend: str = "auto"  # packed attention: "auto" (cudnn on Hopper under cuda_graphs with nvidia-cudnn-frontend,
    # heads of 128 or 256; else varlen on CUDA, sdpa elsewhere), "sdpa" (any device), or on CUDA "varlen" (flash), "flex",
    # "cudnn" (cuDNN's fused kernel; packed rows and CUDA graphs need `pip install --no-deps nvidia-cudnn-frontend`,
    # without it rows of one example use torch's cuDNN kernel and packed rows flash)
    overlong: str = "drop"  # examples longer than max_seq_len: "drop" or "truncate" (cut the response's end)
    system_prompt: str = ""  # system message added to every example ("" = the template's default)
    # --- optimisation ---
    max_steps: int = 100  # optimizer steps
    micro_batch_size: int = 4  # rows per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10  # linear warmup steps
    weight_decay: float = 0.0  # AdamW decoupled weight decay on LoRA weights
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 = off)
    optimizer: str = "paged_adamw_8bit"  # "paged_adamw_8bit", "adamw_8bit" (bitsandbytes), "adamw_8bit_flat" or "adamw" (torch)
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    seed: int = 42  # seeds data order, LoRA init and dropout
    deterministic: bool = False  # bitwise-reproducible GPU runs: fixed-order kernels, slower (qlora/training/determinism.py)
    # --- eval, logging, saving ---
    output_dir: str = "runs/default"  # checkpoints, logs, final adapter
    eval_every: int = 25  # optimizer steps between eval-loss passes (0 = only at the end)
    eval_batches: int = 0  # cap on eval micro-batches per pass (0 = whole eval split)
    log_every: int = 1  # optimizer steps between log lines
    save_every: int = 50  # optimizer steps between checkpoints (0 = only the final adapter)
    keep_last: int = 2  # checkpoints kept on disk
    resume: str = ""  # "" (fresh run), "auto" (newest complete checkpoint in output_dir) or a checkpoint path
    resume_force: bool = False  # resume even if model/LoRA/data differ from the checkpoint's
    skip_nonfinite: bool = False  # skip (and count) steps with a non-finite loss or gradient instead of stopping
    tracker: str = "auto"  # "auto" (tensorboard if installed), "tensorboard", "none"
    sample_prompts: int = 2  # held-out prompts answered at the end (0 = none)
    max_new_tokens: int = 128  # length cap for those samples


def _field_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def _number(key: str, value, typ, bad):
    """An int or a finite float from a YAML number or a command-line string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad("expected an integer" if typ is int else "expected a number")
    if typ is int:
        if isinstance(value, float):
            raise bad("expected an integer")
        try:
            return int(value)
        except ValueError:
            raise bad("expected an integer") from None
    try:
        out = float(value)
    except ValueError:
        raise bad("expected a number") from None
    if not math.isfinite(out):
        raise bad("expected a finite number")
    return out


def _coerce(key: str, value, typ, source: str):
    """Check or convert one value to the field's type; strings from the command line are parsed."""
    def bad(why: str):
        return ConfigError(f"config key '{key}' from {source}: {why} (got {value!r})")

    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad("expected true or false")
    if typ in (int, float):
        return _number(key, value, typ, bad)
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad("expected a string")
    if typ is not list:
        raise bad(f"unsupported type {typ}")
    if isinstance(value, str):  # command line: comma-separated, or a JSON/YAML list
        parsed = _yaml_or_none(value) if value.strip().startswith("[") else None
        value = parsed if isinstance(parsed, list) else [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list):
        raise bad("expected a list")
    if key == "adam_betas":
        return [_number(key, v, float, bad) for v in value]
    if key in ("lora_targets", "fp8_exclude") and not all(isinstance(v, str) and v for v in value):
        raise bad("expected a list of module names")
    if key in ("datasets", "eval_datasets") and not all(isinstance(v, (str, dict)) for v in value):
        raise bad("expected a list of sources: 'path[:formatter]' strings or {path: ..., formatter: ...} mappings")
    return value


def _yaml_or_none(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


# names other trainers use (HF TrainingArguments, peft, bitsandbytes) that string similarity cannot find
ALIASES = {
    "learning_rate": "lr", "per_device_train_batch_size": "micro_batch_size", "train_batch_size":
    "micro_batch_size", "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "max_steps",
    "epochs": "max_steps", "target_modules": "lora_targets", "lora_target_modules": "lora_targets",
    "r": "lora_r", "rank": "lora_r", "max_length": "max_seq_len", "max_seq_length": "max_seq_len",
    "cutoff_len": "max_seq_len", "logging_steps": "log_every", "eval_steps": "eval_every",
    "save_steps": "save_every", "save_total_limit": "keep_last", "resume_from_checkpoint": "resume",
    "model_name_or_path": "model", "model_name": "model", "base_model": "model", "dataset": "datasets",
    "dataset_name": "datasets", "data": "datasets", "train_file": "datasets", "warmup_ratio": "warmup_steps",
    "load_in_4bit": "quant", "bnb_4bit_quant_type": "quant", "bnb_4bit_use_double_quant": "double_quant",
    "bnb_4bit_compute_dtype": "compute_dtype", "torch_dtype": "compute_dtype", "bf16": "compute_dtype",
    "fp16": "compute_dtype", "report_to": "tracker", "optim": "optimizer",
}


# keys that were renamed: an old YAML (a saved config.yaml too) gets one line naming the new key
RENAMED = {"gradient_checkpointing": "recompute", "checkpoint_layers": "recompute_layers",
           "offload_checkpoints": "offload_recompute"}


def suggest(key: str, known) -> str:
    """'; did you mean X?' from the alias table or string similarity, else ''."""
    match = ALIASES.get(key) or next(iter(difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)), None)
    return f"; did you mean '{match}'?" if match else ""


def _apply(values: dict, overrides: dict, source: str, sources: dict, accept_renamed: bool = False) -> None:
    types_ = _field_types()
    for key, value in overrides.items():
        norm = str(key).replace("-", "_")
        if norm in RENAMED and accept_renamed:
            norm = RENAMED[norm]
        elif norm in RENAMED:
            raise ConfigError(f"config key '{norm}' in {source} was renamed to '{RENAMED[norm]}': use "
                              f"{RENAMED[norm]} (same meaning)")
        if norm not in types_:
            raise ConfigError(f"unknown config key '{key}' in {source}{suggest(norm, types_)} "
                              "(see qlora/config.py for all keys)")
        values[norm] = _coerce(norm, value, types_[norm], source)
        sources[norm] = source


def parse_cli(argv: list[str]) -> tuple[str | None, dict]:
    """Split argv into the `--config` path and a dict of `--key value` overrides (the last of a repeated
    flag wins, so a command can be extended with overrides)."""
    preset, overrides = None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key value (e.g. --max_steps 50)")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"config key '{key}' on the command line has no value: use --{key} VALUE")
            val = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            preset = val
        else:
            overrides[key] = val
    return preset, overrides


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key set twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` overrides on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(f"key '{key}' is set twice (again on line {key_node.start_mark.line + 1})")
                seen.add(key)
            except TypeError:  # unhashable key: SafeLoader reports it
                pass
        return super().construct_mapping(node, deep)


# integers as YAML 1.2 reads them: `010` is ten (YAML 1.1, PyYAML's default, reads it as octal 8) and `1:30` is
# text, not 90; hex and octal need their 0x / 0o prefix
_INT = re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))


def _yaml12_int(loader, node) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    base = 16 if text.startswith("0x") else 8 if text.startswith("0o") else 10
    return int(text[2:] if base != 10 else text, base)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def read_yaml(path: Path, what: str = "config file"):
    """Parse a YAML file whose keys are unique; every failure is one ConfigError line naming the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} on line {line}): "
                          "save it as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKey as e:
        raise ConfigError(f"{what} {path}: {e}; keep one") from None
    except yaml.YAMLError as e:
        mark, ctx = getattr(e, "problem_mark", None), getattr(e, "context", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        why = " ".join(str(getattr(e, "problem", None) or e).split())
        if ctx and getattr(e, "context_mark", None):
            why += f" ({ctx} that starts on line {e.context_mark.line + 1})"
        raise ConfigError(f"{what} {path} is not valid YAML{where}: {why}") from None


def load_config(argv: list[str] | None = None, accept_renamed: bool = False, **overrides) -> Config:
    """Resolve defaults < YAML preset < CLI flags < keyword overrides into a validated `Config`.
    `accept_renamed`: read renamed keys of the preset under their new names (the saved config of an
    adapter written before the rename), instead of stopping with a line that names the new key."""
    preset, cli = parse_cli(list(sys.argv[1:] if argv is None else argv))
    values = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
    sources: dict[str, str] = {}
    if preset:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file {preset} not found (presets live in configs/, e.g. configs/default.yaml)")
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {preset} must be a mapping of key: value")
        _apply(values, data, f"config file {preset}", sources, accept_renamed)
    _apply(values, cli, "the command line", sources)
    _apply(values, overrides, "keyword arguments", sources)
    cfg = Config(**values)
    validate(cfg, sources)
    return cfg


_CHOICES = {
    "quant": ("nf4", "fp4", "none"),
    "compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "quant_storage": ("uint8", "bfloat16", "float16", "float32"),
    "attn_backend": ("auto", "sdpa", "varlen", "cudnn", "flex"),
    "kernels": ("auto", "liger", "none"),
    "overlong": ("drop", "truncate"),
    "optimizer": ("paged_adamw_8bit", "adamw_8bit", "adamw_8bit_flat", "adamw"),
    "tracker": ("auto", "tensorboard", "none"),
}
# the allowed range of every numeric field, and what its edge values mean
_RANGES = {
    "recompute_layers": ">= -1", "mlp_tile_tokens": ">= 0", "lora_r": ">= 1", "lora_alpha": "> 0", "lora_dropout": "[0, 1)",
    "eval_fraction": "[0, 1)", "max_seq_len": ">= 1", "max_steps": ">= 1", "micro_batch_size": ">= 1",
    "grad_accum": ">= 1", "lr": "> 0", "min_lr_ratio": "[0, 1]", "warmup_steps": ">= 0", "weight_decay": ">= 0",
    "max_grad_norm": ">= 0", "seed": "[0, 4294967295]", "eval_every": ">= 0", "eval_batches": ">= 0",
    "log_every": ">= 1", "save_every": ">= 0", "keep_last": ">= 1", "sample_prompts": ">= 0",
    "max_new_tokens": ">= 1",
}
_NOTES = {
    "recompute_layers": "-1 = all layers", "lora_alpha": "scale = lora_alpha / lora_r",
    "min_lr_ratio": "the final lr is lr * min_lr_ratio", "max_grad_norm": "0 turns clipping off",
    "eval_every": "0 = only at the end", "eval_batches": "0 = the whole eval split",
    "save_every": "0 = only the final adapter", "sample_prompts": "0 = none",
}


def _in_range(v, spec: str) -> bool:
    if spec.startswith(">="):
        return v >= float(spec[2:])
    if spec.startswith(">"):
        return v > float(spec[1:])
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (v >= lo if spec[0] == "[" else v > lo) and (v <= hi if spec[-1] == "]" else v < hi)


def validate(cfg: Config, sources: dict | None = None) -> None:
    """Range and choice checks that types alone cannot express; errors name the key and its source."""
    def fail(key: str, why: str):
        src = (sources or {}).get(key)
        raise ConfigError(f"config key '{key}'{f' from {src}' if src else ''} {why}")

    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            fail(key, f"= {getattr(cfg, key)!r} must be one of {', '.join(choices)}")
    for key, spec in _RANGES.items():
        v = getattr(cfg, key)
        if not (math.isfinite(v) and _in_range(v, spec)):
            note = f" ({_NOTES[key]})" if key in _NOTES else ""
            fail(key, f"must be {spec if spec[0] in '<>' else 'in ' + spec}{note} (got {v})")
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        fail("adam_betas", f"needs two numbers in [0, 1), e.g. [0.9, 0.999] (got {cfg.adam_betas})")
    for key in ("model", "output_dir"):
        if not getattr(cfg, key).strip():
            fail(key, "is empty")
    if not cfg.lora_targets:
        fail("lora_targets", "is empty: name at least one module, e.g. --lora_targets q_proj,v_proj")
    # a typo on the command line would silently put that projection in FP8; a saved config (every key
    # written, the default exclusion included) must load back whatever its lora_targets
    stray = [m for m in cfg.fp8_exclude if m not in cfg.lora_targets]
    if stray and cfg.base_fp8 and (sources or {}).get("fp8_exclude") == "the command line":
        fail("fp8_exclude", f"names {', '.join(stray)}, not among lora_targets ({', '.join(cfg.lora_targets)})")
    if not cfg.datasets:
        fail("datasets", "is empty: name at least one source, e.g. --datasets builtin:sql")
    # the source syntax is checked before anything runs
    for key in ("datasets", "eval_datasets"):
        for spec in getattr(cfg, key):
            try:
                parse_source(spec)
            except DataError as e:
                fail(key, f"has a bad entry: {e}")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with --config)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash_fields(cfg: Config) -> dict:
    """The fields a checkpoint must agree on to be resumed (model, LoRA shape, data)."""
    keys = ("model", "quant", "lora_r", "lora_targets", "datasets", "max_seq_len", "packing", "seed")
    return {k: getattr(cfg, k) for k in keys}
