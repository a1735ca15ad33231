"""Config resolution: defaults < YAML preset < CLI, with errors that name the key and the source."""

import dataclasses
import math
import typing

import pytest
import torch
import yaml

from qlora.config import _RANGES, Config, ConfigError, load_config, save_config

from conftest import ROOT


def test_defaults_are_the_seed_recipe():
    cfg = load_config([])
    assert (cfg.quant, cfg.double_quant, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == ("nf4", True, 8, 64.0, 0.05)
    assert cfg.lora_targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert cfg.optimizer == "paged_adamw_8bit" and cfg.lr == 1e-4


def test_preset_then_cli_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("max_steps: 7\nlr: 3.0e-4\ndatasets: [a.jsonl, b.jsonl:gretel_sql]\n")
    cfg = load_config(["--config", str(preset), "--max_steps", "9", "--packing", "false",
                       "--lora_targets", "q_proj,v_proj", "--lr=5e-5"])
    assert cfg.max_steps == 9 and cfg.lr == 5e-5 and cfg.packing is False
    assert cfg.datasets == ["a.jsonl", "b.jsonl:gretel_sql"]
    assert cfg.lora_targets == ["q_proj", "v_proj"]


@pytest.mark.parametrize("argv, needle", [
    (["--max_stepz", "3"], "unknown config key 'max_stepz' in the command line"),
    (["--max_steps", "three"], "config key 'max_steps' from the command line: expected an integer"),
    (["--packing", "maybe"], "config key 'packing' from the command line: expected true or false"),
    (["--lr", "-1"], "config key 'lr' from the command line must be > 0 (got -1.0)"),
    (["--quant", "int3"], "config key 'quant' from the command line = 'int3' must be one of"),
    (["--max_steps"], "has no value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--config", "nope.yaml"], "config file nope.yaml not found"),
    (["--recompute_layers", "-2"], "config key 'recompute_layers' from the command line must be >= -1 (-1 = all"),
    (["--kernels", "triton"], "config key 'kernels' from the command line = 'triton' must be one of"),
    (["--attn_backend", "eager"], "config key 'attn_backend' from the command line = 'eager' must be one of"),
])
def test_bad_cli_is_a_clear_error(argv, needle):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    assert needle in str(e.value)


def test_bad_yaml_names_the_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("micro_batch_size: 2\nbatch_size: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'batch_size' in config file .*bad.yaml"):
        load_config(["--config", str(p)])
    p.write_text("max_seq_len: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"'max_seq_len' from config file .*bad.yaml: expected an integer"):
        load_config(["--config", str(p)])


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["--max_steps", "11", "--datasets", "x.jsonl:guanaco"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(["--config", str(tmp_path / "c.yaml")]) == cfg


@pytest.mark.parametrize("name", ["default", "llama2-7b-guanaco", "spider", "spider-linked", "fast-1gpu"])
def test_presets_load(name):
    cfg = load_config(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert all(getattr(cfg, k) == (v if not isinstance(getattr(cfg, k), float) else float(v)) for k, v in raw.items())
    assert isinstance(cfg, Config)


# every numeric field, a value just outside its range (or not finite), and a value on its edge that is fine
OUT_OF_RANGE = [
    ("lr", "nan", "expected a finite number"), ("lr", "inf", "expected a finite number"), ("lr", "0", "> 0"),
    ("max_grad_norm", "-1", ">= 0 (0 turns clipping off)"), ("weight_decay", "-0.01", ">= 0"),
    ("min_lr_ratio", "1.5", "in [0, 1]"), ("min_lr_ratio", "-0.1", "in [0, 1]"), ("warmup_steps", "-1", ">= 0"),
    ("eval_every", "-1", ">= 0"), ("save_every", "-5", ">= 0"), ("eval_batches", "-1", ">= 0"),
    ("lora_alpha", "0", "> 0"), ("lora_alpha", "-16", "> 0"), ("lora_dropout", "1", "in [0, 1)"),
    ("lora_r", "0", ">= 1"), ("eval_fraction", "1.0", "in [0, 1)"), ("max_seq_len", "0", ">= 1"),
    ("max_steps", "0", ">= 1"), ("micro_batch_size", "0", ">= 1"), ("grad_accum", "0", ">= 1"),
    ("seed", "-1", "in [0, 4294967295]"), ("seed", str(2 ** 32), "in [0, 4294967295]"),
    ("log_every", "0", ">= 1"), ("keep_last", "0", ">= 1"), ("sample_prompts", "-1", ">= 0"),
    ("max_new_tokens", "0", ">= 1"), ("recompute_layers", "-2", ">= -1"),
    ("adam_betas", "0.9,1.0", "two numbers in [0, 1)"), ("adam_betas", "0.9,nan", "expected a finite number"),
    ("adam_betas", "0.9", "two numbers in [0, 1)"), ("adam_betas", "-0.1,0.9", "two numbers in [0, 1)"),
]
ON_THE_EDGE = [("min_lr_ratio", "0"), ("min_lr_ratio", "1"), ("max_grad_norm", "0"), ("warmup_steps", "0"),
               ("seed", "0"), ("seed", str(2 ** 32 - 1)), ("adam_betas", "0,0.999"), ("lora_dropout", "0"),
               ("eval_every", "0"), ("recompute_layers", "-1"), ("lora_alpha", "0.5")]


@pytest.mark.parametrize("key, value, needle", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v, _ in OUT_OF_RANGE])
def test_out_of_range_and_nonfinite_values_name_the_key(key, value, needle):
    with pytest.raises(ConfigError) as e:
        load_config([f"--{key}", value])
    assert f"config key '{key}' from the command line" in str(e.value) and needle in str(e.value)


@pytest.mark.parametrize("key, value", ON_THE_EDGE)
def test_values_on_the_edge_of_a_range_are_accepted(key, value):
    cfg = load_config([f"--{key}", value])
    got = getattr(cfg, key)
    assert got == ([float(v) for v in value.split(",")] if key == "adam_betas" else type(got)(float(value)))


def test_every_numeric_field_has_a_range():
    hints = typing.get_type_hints(Config)
    numeric = {f.name for f in dataclasses.fields(Config) if hints[f.name] in (int, float)}
    assert numeric == set(_RANGES)
    defaults = Config()
    for key in numeric:  # and the defaults are inside it
        load_config([f"--{key}", str(getattr(defaults, key))])


def test_nan_from_yaml_is_rejected(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lr: .nan\n")
    with pytest.raises(ConfigError, match=r"config key 'lr' from config file .*c.yaml: expected a finite number"):
        load_config(["--config", str(p)])



def test_yaml_integers_are_read_as_written_not_as_yaml_1_1_octal_or_base_60(tmp_path):
    """PyYAML's YAML 1.1 reads `seed: 010` as 8 and `save_every: 1:30` as 90; a researcher means 10, and a
    time-like value is a mistake to report. Integers follow YAML 1.2 (what `seed: 10` means on the command line)."""
    p = tmp_path / "c.yaml"
    p.write_text("seed: 010\nmax_steps: 1_000\nlog_every: 0x10\nsave_every: 0o17\nlr: 1.0e-4\n")
    cfg = load_config(["--config", str(p)])
    assert (cfg.seed, cfg.max_steps, cfg.log_every, cfg.save_every, cfg.lr) == (10, 1000, 16, 15, 1e-4)
    assert cfg.seed == load_config(["--seed", "010"]).seed
    p.write_text("save_every: 1:30\n")
    with pytest.raises(ConfigError, match=r"config key 'save_every' from config file .*: expected an integer "
                                          r"\(got '1:30'\)"):
        load_config(["--config", str(p)])
    assert yaml.safe_load("seed: 010")["seed"] == 8  # what the plain loader would have given


def test_duplicate_yaml_keys_name_the_key_and_the_file(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("lr: 1.0e-4\nmax_steps: 5\nlr: 3.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(p)])
    assert str(e.value) == f"config file {p}: key 'lr' is set twice (again on line 3); keep one"
    p.write_text("datasets:\n  - {path: a.jsonl, weight: 1, weight: 2}\n")  # inside a dataset entry too
    with pytest.raises(ConfigError, match="key 'weight' is set twice"):
        load_config(["--config", str(p)])
    # a merge key is YAML's own way to override, not a repeat
    p.write_text("datasets:\n  - {<<: {path: a.jsonl, weight: 1}, weight: 2}\n")
    assert load_config(["--config", str(p)]).datasets == [{"path": "a.jsonl", "weight": 2}]


def test_a_yaml_parse_error_is_one_line_with_the_place(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("max_steps: 5\nlr: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(p)])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"config file {p} is not valid YAML at line 3, column 5: ")
    p.write_text('model: "unterminated\n')
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(p)])
    assert "\n" not in str(e.value) and "(while scanning a quoted scalar that starts on line 1)" in str(e.value)
    p.write_bytes(b"lr: 1.0e-4\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_config(["--config", str(p)])


@pytest.mark.parametrize("typo, meant", [("learning_rate", "lr"), ("max_step", "max_steps"),
                                         ("batch_size", "micro_batch_size"), ("gradient_accumulation_steps",
                                                                              "grad_accum"),
                                         ("weight_decy", "weight_decay"), ("target_modules", "lora_targets")])
def test_unknown_keys_get_a_hint(tmp_path, typo, meant):
    with pytest.raises(ConfigError) as e:
        load_config([f"--{typo}", "1"])
    assert f"unknown config key '{typo}' in the command line; did you mean '{meant}'?" in str(e.value)
    p = tmp_path / "c.yaml"
    p.write_text(f"{typo}: 1\n")
    with pytest.raises(ConfigError, match=f"unknown config key '{typo}' in config file .*; did you mean '{meant}'"):
        load_config(["--config", str(p)])


def test_no_hint_for_a_key_like_nothing():
    with pytest.raises(ConfigError) as e:
        load_config(["--zzzz", "1"])
    assert "did you mean" not in str(e.value)


def test_dataset_specs_are_checked_with_the_config():
    with pytest.raises(ConfigError) as e:
        load_config(["--datasets", "data.jsonl:gretel"])
    assert "config key 'datasets' from the command line has a bad entry" in str(e.value)
    assert "unknown formatter 'gretel' (did you mean gretel_sql?)" in str(e.value)
    with pytest.raises(ConfigError, match="'lora_targets' from the command line: expected a list of module names"):
        load_config(["--lora_targets", "[1, 2]"])
    assert math.isclose(load_config(["--adam_betas", "0.8,0.95"]).adam_betas[1], 0.95)


def test_dash_spelling_of_keys_is_accepted_and_corrected():
    cfg = load_config(["--max-steps", "5", "--micro-batch-size=3", "--lora-targets", "q_proj"])
    assert (cfg.max_steps, cfg.micro_batch_size, cfg.lora_targets) == (5, 3, ["q_proj"])
    with pytest.raises(ConfigError) as e:
        load_config(["--max-step", "5"])
    assert "unknown config key 'max-step' in the command line; did you mean 'max_steps'?" in str(e.value)


def test_readme_switch_table_is_the_switch_table():
    """The README's table of speed/memory switches is `qlora.speed.switches`' (regenerate it with
    `python -m qlora.speed.switches`), and every switch is a Config key."""
    from qlora.speed.switches import SWITCHES, markdown_table

    assert markdown_table() in (ROOT / "README.md").read_text()
    assert {s.key for s in SWITCHES} <= set(vars(Config()))


@pytest.mark.parametrize("old,new", [("gradient_checkpointing", "recompute"), ("checkpoint_layers", "recompute_layers"),
                                     ("offload_checkpoints", "offload_recompute")])
def test_a_renamed_key_names_its_new_name(tmp_path, old, new):
    (tmp_path / "old.yaml").write_text(f"{old}: true\n" if old != "checkpoint_layers" else f"{old}: 4\n")
    with pytest.raises(ConfigError, match=f"'{old}' in config file .* was renamed to '{new}'"):
        load_config(["--config", str(tmp_path / "old.yaml")])
    with pytest.raises(ConfigError, match=f"'{old}' in the command line was renamed to '{new}'"):
        load_config([f"--{old}", "1"])
    # an adapter's saved config from before the rename still loads for inference
    assert getattr(load_config(["--config", str(tmp_path / "old.yaml")], accept_renamed=True), new) in (True, 4)


def test_fast_preset_is_a_legal_switch_set_on_one_gpu():
    """configs/fast-1gpu.yaml: every switch's needs are met on one CUDA process (checked without a GPU: the
    needs that read the device only ask its type); two processes are refused with one line naming cuda_graphs."""
    from qlora.speed.switches import Where, check_switches

    cfg = load_config(["--config", str(ROOT / "configs" / "fast-1gpu.yaml")])
    check_switches(cfg, Where(torch.device("cuda")))
    with pytest.raises(ConfigError, match="config key 'cuda_graphs' = True needs .*one process"):
        check_switches(cfg, Where(torch.device("cuda"), processes=2))
