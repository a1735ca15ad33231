"""Layer-by-layer building and loading (qlora/model/layerwise.py): the same 4-bit model as the usual paths,
with a peak memory of the 4-bit model plus about one full-precision layer.

Peak memory is measured in fresh processes (`python tests/test_layerwise.py measure MODE [dir]`) as
the growth of ru_maxrss over the building or loading. They run with MALLOC_MMAP_THRESHOLD_=65536:
by default glibc raises its mmap threshold each time a large block is freed, after which blocks of
that size come from the heap, where the small 4-bit tensors made in between pin the freed ones, so
RSS then records the allocator's history more than the live tensors (measured on this shape with
glibc's default: layerwise build 386 MiB, load 484; whole build 592, from_pretrained 711). GPU memory
(PyTorch's caching allocator) has no such effect.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT

HERE = Path(__file__).resolve()
# 12 Llama layers of hidden 1024 / MLP 2816 with an 8000-token vocab, bf16: 24.5 MiB per layer in bf16
MEDIUM = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=8000, tie_word_embeddings=False, max_position_embeddings=4096)
SMALL = dict(hidden_size=128, intermediate_size=352, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def cfg_for(model: str = "random:tiny", dtype: str = "float32", **kw):
    from qlora.config import load_config

    return load_config([], model=model, quant="nf4", compute_dtype=dtype, **kw)


def llama_config(fields: dict, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(**{**fields, **kw})


def save_random_checkpoint(folder: Path, fields: dict, dtype=torch.float32, shard_size: str = "5GB") -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = LlamaForCausalLM(llama_config(fields))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=shard_size)
    return folder


# =========================================================================== same model

@pytest.mark.parametrize("tied", [False, True])
def test_safetensors_layerwise_gives_the_from_pretrained_model(tmp_path, tied):
    from qlora.model.layerwise import load_safetensors_layerwise
    from qlora.model.base import load_base_model

    # a sharded checkpoint (model.safetensors.index.json + 4 files) of a 3-layer random Llama
    folder = save_random_checkpoint(tmp_path / "ckpt", {**SMALL, "tie_word_embeddings": tied}, shard_size="300KB")
    assert (folder / "model.safetensors.index.json").is_file()
    cfg = cfg_for(str(folder))
    usual = load_base_model(cfg, torch.device("cpu"))
    mine = load_safetensors_layerwise(folder, cfg, torch.device("cpu"), torch.float32)
    a, b = dict(usual.named_parameters()), dict(mine.named_parameters())
    assert a.keys() == b.keys()
    for k in a:  # the packed 4-bit bytes, the bf16/fp32 tensors and the block scales: all identical
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        qa, qb = getattr(a[k], "quant_state", None), getattr(b[k], "quant_state", None)
        assert (qa is None) == (qb is None), k
        if qa is not None:
            assert torch.equal(qa.absmax, qb.absmax) and torch.equal(qa.state2.absmax, qb.state2.absmax), k
    assert (mine.lm_head.weight is mine.model.embed_tokens.weight) == tied
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(usual(input_ids=ids).logits, mine(input_ids=ids).logits)


def test_random_layerwise_model_is_deterministic_per_layer_and_complete():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from qlora.model.layerwise import build_random_layerwise

    cfg = cfg_for()
    two = build_random_layerwise(llama_config(SMALL, num_hidden_layers=2), cfg, torch.device("cpu"), torch.float32)
    three = build_random_layerwise(llama_config(SMALL), cfg, torch.device("cpu"), torch.float32)
    # layer i's values depend on (seed, i) only: any rank, any depth builds the same layer
    for k, v in two.model.layers.state_dict().items():
        assert torch.equal(v, three.model.layers.state_dict()[k]), k
    linears = [type(m).__name__ for n, m in three.named_modules() if n.endswith("_proj")]
    assert linears and set(linears) == {"Linear4bit"} and type(three.lm_head).__name__ == "Linear"
    fresh = LlamaRotaryEmbedding(three.config)  # non-persistent buffers are computed, not drawn
    assert torch.equal(three.model.rotary_emb.inv_freq, fresh.inv_freq)
    norms = [p for n, p in three.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(bool((p == 1).all()) for p in norms)
    std = three.model.embed_tokens.weight.std().item()
    assert abs(std - three.config.initializer_range) < 0.002  # N(0, 0.02) as transformers initialises
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(three(input_ids=ids).logits).all()


def test_layerwise_load_names_a_missing_or_misshapen_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    from qlora.model.layerwise import ModelFilesError, load_safetensors_layerwise

    folder = save_random_checkpoint(tmp_path / "ckpt", {**SMALL, "tie_word_embeddings": False})
    cfg, cpu = cfg_for(str(folder)), torch.device("cpu")
    tensors = load_file(str(folder / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, str(folder / "model.safetensors"))
    with pytest.raises(ModelFilesError, match=f"no tensor '{name}'"):
        load_safetensors_layerwise(folder, cfg, cpu, torch.float32)
    from qlora.model.base import ModelLoadError, load_base_model

    with pytest.raises(ModelLoadError, match=f"no tensor '{name}'.*--fsdp_low_memory_load false"):
        load_base_model(cfg, cpu, layerwise=True)  # what FSDP2 runs: the way out is named
    save_file({**tensors, name: tensors[name][:-1]}, str(folder / "model.safetensors"))
    with pytest.raises(ModelFilesError, match=r"'model.layers.1.mlp.up_proj.weight' has shape \(351, 128\)"):
        load_safetensors_layerwise(folder, cfg, cpu, torch.float32)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFilesError, match="has no model.safetensors"):
        load_safetensors_layerwise(folder, cfg, cpu, torch.float32)


HUB_PROBE = """
import sys
from qlora.model.base import ModelLoadError, load_base_model, local_folder
from qlora.config import load_config
import torch
try:
    local_folder("acme/not-downloaded")
except ModelLoadError as e:
    print("error:", e)
print("folder:", local_folder(sys.argv[1]))
cfg = load_config([], model=sys.argv[1], quant="nf4", compute_dtype="float32")
m = load_base_model(cfg, torch.device("cpu"), layerwise=True)
print("layers:", len(m.model.layers), "4bit:", type(m.model.layers[0].mlp.up_proj).__name__, m.name_or_path,
      m.config.name_or_path)
"""


@pytest.mark.parametrize("shard_size", ["5GB", "400KB"])  # one file; several, with the index
def test_a_hub_id_is_read_layer_by_layer_from_its_cached_snapshot_offline(tmp_path, shard_size):
    """FSDP2's low-memory load takes hub ids too: the folder is the hub cache's snapshot (offline here)."""
    cache, commit = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--acme--tiny-llama"
    snap = save_random_checkpoint(repo / "snapshots" / commit, {**SMALL, "tie_word_embeddings": False},
                                  shard_size=shard_size)
    assert (snap / "model.safetensors.index.json").is_file() == (shard_size == "400KB")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", HUB_PROBE, "acme/tiny-llama"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)
    assert out["folder"] == str(repo / "snapshots" / commit)
    assert "acme/not-downloaded" in out["error"] and "download it first" in out["error"]
    # both names: peft records `model.name_or_path` as the adapter's base, which must be the hub id
    assert out["layers"].split() == ["3", "4bit:", "Linear4bit", "acme/tiny-llama", "acme/tiny-llama"]


# =========================================================================== peak memory

def measure(mode: str, folder: Path | None = None) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(HERE), "measure", mode, *([str(folder)] if folder else [])], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_layerwise_peak_memory_is_the_4bit_model_plus_about_one_layer(tmp_path):
    folder = tmp_path / "medium"
    r = subprocess.run([sys.executable, str(HERE), "save", str(folder)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {m: measure(m, folder if m.startswith("load") else None) for m in
           ("build_whole", "build_layerwise", "load_from_pretrained", "load_layerwise")}
    whole, layer = got["build_whole"]["bf16_model_mib"], got["build_whole"]["bf16_layer_mib"]
    for mode, r in got.items():
        assert r["model_mib"] == got["build_whole"]["model_mib"], (mode, r)  # the same 4-bit model in the end
    # The layer being built, plus the scratch of bitsandbytes' CPU quantiser for its biggest linear (an
    # fp32 copy, |x|, the scaled copy, int32 codes: ~20 bytes per weight, 55 MiB for the 1024 x 2816
    # MLP matrices), plus slack. Measured (4-bit model 114 MiB, bf16 model 325, one bf16 layer 24.5):
    # layerwise build and load both 208 MiB; building the whole model 479, from_pretrained 439.
    # Bound: the 4-bit model + 2 bf16 layers + that scratch + 16 MiB (234 MiB here)
    scratch = 20 * MEDIUM["hidden_size"] * MEDIUM["intermediate_size"] / 2**20
    for mode in ("build_layerwise", "load_layerwise"):
        assert got[mode]["peak_mib"] <= got[mode]["model_mib"] + 2 * layer + scratch + 16, (mode, got)
    # the usual paths hold the whole full-precision model at some point
    for mode in ("build_whole", "load_from_pretrained"):
        assert got[mode]["peak_mib"] >= 0.9 * whole, (mode, got)


def _measure_main(mode: str, folder: str | None = None) -> None:
    """Build or load the MEDIUM model one way in this fresh process; print its peak RSS growth (MiB)."""
    import resource

    import bitsandbytes  # noqa: F401 - every import before the baseline
    import transformers  # noqa: F401

    from qlora.model import layerwise, quant

    def status_mib(key: str) -> float:
        import re
        return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024

    def rss_mib() -> float:  # the peak resident set since the reset below (or since the process started)
        return status_mib("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg, dev, dtype = cfg_for(folder or "random:tiny", "bfloat16"), torch.device("cpu"), torch.bfloat16
    try:  # reset the peak to the current size: the imports' own transient peak must not hide the build's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        reset = True
    except OSError:
        reset = False
    base = status_mib("VmRSS") if reset else rss_mib()
    if mode == "build_whole":  # the whole full-precision model first, then quantise its linears
        from transformers import LlamaForCausalLM

        torch.set_default_dtype(dtype)
        model = LlamaForCausalLM(llama_config(MEDIUM))
        torch.set_default_dtype(torch.float32)
        quant.quantize_linears_(model, cfg, dtype, dev)
    elif mode == "build_layerwise":
        model = layerwise.build_random_layerwise(llama_config(MEDIUM), cfg, dev, dtype)
    elif mode == "load_from_pretrained":
        from qlora.model.base import load_base_model

        model = load_base_model(cfg, dev)
    else:
        model = layerwise.load_safetensors_layerwise(folder, cfg, dev, dtype)
    peak = rss_mib() - base
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    size += sum(m.weight.quant_state.absmax.numel() * 4 + m.weight.quant_state.state2.absmax.numel() * 4
                for m in model.modules() if getattr(getattr(m, "weight", None), "quant_state", None) is not None)
    layer = sum(v for k, v in _layer_numels(MEDIUM).items()) * 2
    whole = (layer * MEDIUM["num_hidden_layers"] + 2 * MEDIUM["vocab_size"] * MEDIUM["hidden_size"] * 2)
    print(json.dumps({"mode": mode, "peak_mib": round(peak, 1), "model_mib": round(size / 2**20, 1),
                      "bf16_layer_mib": round(layer / 2**20, 1), "bf16_model_mib": round(whole / 2**20, 1)}))


def _layer_numels(f: dict) -> dict:
    h, i, kv = f["hidden_size"], f["intermediate_size"], f["hidden_size"] // f["num_attention_heads"] * f["num_key_value_heads"]
    return {"q": h * h, "k": h * kv, "v": h * kv, "o": h * h, "gate": h * i, "up": h * i, "down": i * h}


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save_random_checkpoint(Path(sys.argv[2]), MEDIUM, torch.bfloat16, shard_size="100MB")
    else:
        _measure_main(*sys.argv[2:])
