"""Config resolution: defaults < YAML preset < CLI, with errors that name the key and the source."""

import pytest
import yaml

from qlora.config import Config, ConfigError, load_config, save_config

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
    (["--lr", "-1"], "config key 'lr' must be > 0"),
    (["--quant", "int3"], "config key 'quant' = 'int3' must be one of"),
    (["--max_steps"], "has no value"),
    (["stray"], "unexpected argument 'stray'"),
    (["--config", "nope.yaml"], "config file nope.yaml not found"),
    (["--checkpoint_layers", "-2"], "config key 'checkpoint_layers' must be -1 (all) or >= 0"),
    (["--kernels", "triton"], "config key 'kernels' = 'triton' must be one of"),
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


@pytest.mark.parametrize("name", ["default", "llama2-7b-guanaco"])
def test_presets_load(name):
    cfg = load_config(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    assert all(getattr(cfg, k) == (v if not isinstance(getattr(cfg, k), float) else float(v)) for k, v in raw.items())
    assert isinstance(cfg, Config)
