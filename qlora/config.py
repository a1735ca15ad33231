"""One flat training config: a dataclass with defaults, YAML presets and `--key value` overrides.

Resolution order: dataclass defaults < `--config FILE.yaml` < command-line `--key value`.
Unknown keys and values of the wrong type are errors (`ConfigError`) that name the key and the source.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the key, where it came from and what to do."""


@dataclass
class Config:
    # --- model ---
    model: str = "smollm2"  # hub id, local dir, .gguf file, "smollm2" (embedded default) or "random:<shape>[:vocab]"
    tokenizer: str = ""  # tokenizer source if not the model's own
    quant: str = "nf4"  # base weights: "nf4" or "fp4" (bitsandbytes 4-bit) or "none" (full precision)
    double_quant: bool = True  # quantize the 4-bit scales too (~0.4 bit/param saved)
    quant_storage: str = "uint8"  # dtype the packed 4-bit weights are stored in: "uint8", or the compute dtype
    # ("bfloat16") for FSDP, which can only shard floating-point parameters (configs/accelerate/fsdp.yaml)
    compute_dtype: str = "auto"  # "auto" (bf16 where fast: CUDA with bf16, and CPU), "bfloat16", "float16", "float32"
    trust_remote_code: bool = False  # never run model code from a hub unless you ask for it
    gradient_checkpointing: bool = True  # recompute activations in backward (non-reentrant)
    checkpoint_layers: int = -1  # how many decoder layers (from the first) recompute; -1 = all. Fewer = faster,
    # more memory: on a big GPU checkpoint only what does not fit (benchmarks/NOTES.md)
    fused_lora: bool = True  # NF4 linear + LoRA as one autograd node (qlora/lora_fused.py); off = peft's forward
    absmax_cache: bool = True  # fused path: keep double-quant scales dequantised (+0.5 bit/param: 0.4 GiB at 7B)
    kernels: str = "auto"  # fused RMSNorm/RoPE/SwiGLU: "auto" (liger-kernel on CUDA if installed), "liger", "none"
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
    attn_backend: str = "auto"  # packed attention: "auto", "sdpa" (any device), "varlen", "flex" (CUDA)
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
    optimizer: str = "paged_adamw_8bit"  # "paged_adamw_8bit", "adamw_8bit" (bitsandbytes) or "adamw" (torch)
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    seed: int = 42  # seeds data order, LoRA init and dropout
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
    if typ is int:
        if isinstance(value, bool):
            raise bad("expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise bad("expected an integer")
    if typ is float:
        if isinstance(value, bool):
            raise bad("expected a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise bad("expected a number")
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad("expected a string")
    if typ is list:
        if isinstance(value, list):
            return value
        if isinstance(value, str):
            # command line: comma-separated, or a JSON/YAML list
            if value.strip().startswith("["):
                parsed = yaml.safe_load(value)
                if isinstance(parsed, list):
                    return parsed
            return [v.strip() for v in value.split(",") if v.strip()]
        raise bad("expected a list")
    raise bad(f"unsupported type {typ}")


def _apply(values: dict, overrides: dict, source: str) -> None:
    types_ = _field_types()
    for key, value in overrides.items():
        norm = key.replace("-", "_")
        if norm not in types_:
            close = [k for k in types_ if k.startswith(norm[:4])]
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"unknown config key '{key}' in {source}{hint} (see qlora/config.py for all keys)")
        values[norm] = _coerce(norm, value, types_[norm], source)


def parse_cli(argv: list[str]) -> tuple[str | None, dict]:
    """Split argv into the `--config` path and a dict of `--key value` overrides."""
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


def load_config(argv: list[str] | None = None, **overrides) -> Config:
    """Resolve defaults < YAML preset < CLI flags < keyword overrides into a validated `Config`."""
    preset, cli = parse_cli(list(sys.argv[1:] if argv is None else argv))
    values = {f.name: getattr(Config(), f.name) for f in dataclasses.fields(Config)}
    if preset:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"config file {preset} not found (presets live in configs/, e.g. configs/default.yaml)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {preset} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {preset} must be a mapping of key: value")
        _apply(values, data, f"config file {preset}")
    _apply(values, cli, "the command line")
    _apply(values, overrides, "keyword arguments")
    cfg = Config(**values)
    validate(cfg)
    return cfg


_CHOICES = {
    "quant": ("nf4", "fp4", "none"),
    "compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "quant_storage": ("uint8", "bfloat16", "float16", "float32"),
    "attn_backend": ("auto", "sdpa", "varlen", "flex", "eager"),
    "kernels": ("auto", "liger", "none"),
    "overlong": ("drop", "truncate"),
    "optimizer": ("paged_adamw_8bit", "adamw_8bit", "adamw"),
    "tracker": ("auto", "tensorboard", "none"),
}


def validate(cfg: Config) -> None:
    """Range and choice checks that types alone cannot express."""
    for key, choices in _CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"config key '{key}' = {getattr(cfg, key)!r} must be one of {', '.join(choices)}")
    for key in ("max_steps", "micro_batch_size", "grad_accum", "max_seq_len", "lora_r", "log_every", "keep_last"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key '{key}' must be >= 1 (got {getattr(cfg, key)})")
    if cfg.checkpoint_layers < -1:
        raise ConfigError(f"config key 'checkpoint_layers' must be -1 (all) or >= 0 (got {cfg.checkpoint_layers})")
    if not 0.0 <= cfg.lora_dropout < 1.0:
        raise ConfigError(f"config key 'lora_dropout' must be in [0, 1) (got {cfg.lora_dropout})")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ConfigError(f"config key 'eval_fraction' must be in [0, 1) (got {cfg.eval_fraction})")
    if cfg.lr <= 0:
        raise ConfigError(f"config key 'lr' must be > 0 (got {cfg.lr})")
    if not cfg.datasets:
        raise ConfigError("config key 'datasets' is empty: name at least one source, e.g. --datasets builtin:sql")
    if len(cfg.adam_betas) != 2:
        raise ConfigError(f"config key 'adam_betas' needs two numbers (got {cfg.adam_betas})")


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with --config)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def config_hash_fields(cfg: Config) -> dict:
    """The fields a checkpoint must agree on to be resumed (model, LoRA shape, data)."""
    keys = ("model", "quant", "lora_r", "lora_targets", "datasets", "max_seq_len", "packing", "seed")
    return {k: getattr(cfg, k) for k in keys}


def dumps(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=1)
