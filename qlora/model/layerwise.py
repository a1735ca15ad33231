"""Build or load a 4-bit model one decoder layer at a time, so the full-precision model is never whole
on the device or in host memory: peak memory is the 4-bit model plus one full-precision layer (and the
embeddings, norm and lm_head, which stay in the compute dtype anyway).

The skeleton is made on the meta device (no memory). Then the parts outside the decoder layers are
materialised, then each layer in turn: its tensors are allocated on the device, filled (random values,
or the checkpoint's tensors read one at a time with safetensors' `safe_open`), and its linears are
quantised to NF4 before the next layer is touched. A Llama-2-70B shape (140 GB in bf16) thus needs
~37 GB on one GPU, and every rank of an FSDP job can build it itself before sharding.

With `park` (train.py passes the CPU under FSDP2 on GPUs, config key `fsdp_low_memory_load`) each finished
layer moves to host memory; FSDP2's `fully_shard` later moves one layer at a time back to the GPU and keeps
only this rank's shard there, so no GPU ever holds the whole 4-bit model, only its shard plus one layer.

- `build_random_layerwise`: `random:<shape>` models for benchmarks. Each layer draws its values from
  its own generator (seed, layer index), so every rank builds the same model whatever the world size;
  the values differ from `qlora.model.base.build_random_model`'s (another draw order), the shapes do not.
- `load_safetensors_layerwise`: a local Hugging Face checkpoint (`model.safetensors` or sharded with
  `model.safetensors.index.json`); the same 4-bit model as `from_pretrained` with bitsandbytes'
  config, bit for bit (tests/test_layerwise.py compares logits).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..config import Config
from .quant import quantize_linears_


class ModelFilesError(RuntimeError):
    """A checkpoint folder this loader cannot read; the message names the file or tensor."""


# --------------------------------------------------------------------------- the skeleton

def meta_model(config, compute_dtype: torch.dtype, trust_remote_code: bool = False):
    """The causal LM of `config` on the meta device, parameters typed `compute_dtype` (no memory)."""
    from transformers import AutoModelForCausalLM

    default = torch.get_default_dtype()
    torch.set_default_dtype(compute_dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    finally:
        torch.set_default_dtype(default)
    return model


def decoder_layers(model) -> list:
    """The decoder blocks (those transformers can checkpoint), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def layer_prefixes(model) -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, module) of every decoder layer, in order."""
    names = {id(m): n for n, m in model.named_modules()}
    return [(names[id(b)] + ".", b) for b in decoder_layers(model)]


def _fill(module: nn.Module, prefix: str, device, dtype, source) -> None:
    """Allocate `module`'s own parameters and persistent buffers on `device` and fill each with
    `source(full_name, meta_tensor)`. Non-persistent buffers (rotary frequencies: in no checkpoint)
    stay on meta for `fill_buffers_and_ties`."""
    for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if t.device.type != "meta" or name in module._non_persistent_buffers_set:
            continue
        value = source(prefix + name, t).to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        if name in module._parameters:
            module._parameters[name] = nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[name] = value


def materialise(module: nn.Module, prefix: str, device, dtype, source, skip=()) -> None:
    """`_fill` every submodule of `module` but those in `skip` (the decoder layers, done one by one)."""
    skip_ids = {id(m) for m in skip}
    stack = [(prefix, module)]
    while stack:
        pre, m = stack.pop()
        if id(m) in skip_ids:
            continue
        _fill(m, pre, device, dtype, source)
        stack.extend((f"{pre}{n}.", c) for n, c in m.named_children())


def fill_buffers_and_ties(model, config, device) -> None:
    """Recompute the non-persistent buffers, which no checkpoint holds: rotary inverse frequencies (one
    set per layer kind in Gemma 3) and a scaled embedding's scale; tie the output embeddings where the
    config says so."""
    for name, m in list(model.named_modules()):
        if not any(b.device.type == "meta" for b in m.buffers(recurse=False)):
            continue
        if any(n.endswith("inv_freq") for n, _ in m.named_buffers(recurse=False)):
            with torch.device(device):
                fresh = type(m)(config=m.config if hasattr(m, "config") else config)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)
        elif hasattr(m, "scalar_embed_scale"):  # Gemma's embeddings times sqrt(hidden_size)
            m.embed_scale = torch.tensor(m.scalar_embed_scale, device=device)
    if getattr(config, "tie_word_embeddings", False):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ModelFilesError(f"tensors left unmaterialised: {left[:3]}")


def norm_init(model) -> float:
    """The value an untrained RMSNorm weight holds: 0 where the norm scales by (1 + weight) (Gemma),
    else 1."""
    return 0.0 if getattr(model.config, "model_type", "").startswith("gemma") else 1.0


def quantize_layer(layer: nn.Module, cfg: Config, compute_dtype: torch.dtype, device) -> None:
    quantize_linears_(layer, cfg, compute_dtype, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the layer's full-precision blocks back before the next layer


# --------------------------------------------------------------------------- random shapes

def build_random_layerwise(config, cfg: Config, device: torch.device, compute_dtype: torch.dtype, park=None):
    """A random model of `config` (a transformers config), 4-bit unless `cfg.quant == "none"`, built
    one decoder layer at a time on `device` (each finished layer moved to `park` if given). Linear and
    embedding weights ~ N(0, initializer_range) (transformers' own init), norms the identity
    (`norm_init`); the values of layer i come from a generator on `device` seeded with (cfg.seed, i):
    the same on every rank, whatever the world size."""
    std = getattr(config, "initializer_range", 0.02)
    model = meta_model(config, compute_dtype)
    norm = norm_init(model)

    def random_source(index: int):
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 100_003 + index + 1)

        def source(name, meta):
            if name.endswith("norm.weight"):
                return torch.full(meta.shape, norm, device=device, dtype=compute_dtype)
            return torch.randn(meta.shape, generator=gen, device=device, dtype=compute_dtype).mul_(std)
        return source

    return _fill_layer_by_layer(model, config, cfg, device, compute_dtype, random_source, park)


def _fill_layer_by_layer(model, config, cfg: Config, device, compute_dtype, source_of, park=None):
    """Materialise `model` (a meta skeleton) from `source_of(layer index)` (-1: the parts outside the
    layers), quantising each decoder layer before the next is touched; a finished layer moves to `park`
    (e.g. the CPU) if given, the parts outside the layers stay on `device`."""
    layers = layer_prefixes(model)
    materialise(model, "", device, compute_dtype, source_of(-1), skip=_skipped(model, config, layers))
    for i, (prefix, layer) in enumerate(layers):
        materialise(layer, prefix, device, compute_dtype, source_of(i))
        if cfg.quant != "none":
            quantize_layer(layer, cfg, compute_dtype, device)
        if park is not None and torch.device(park) != device:
            layer.to(park)  # bitsandbytes moves each 4-bit weight's quant_state with it
            if device.type == "cuda":
                torch.cuda.empty_cache()
    fill_buffers_and_ties(model, config, device)
    if cfg.quant != "none":
        model.is_loaded_in_4bit = True
    model.qlora_layerwise = {"parked_on": str(park) if park is not None else None}  # what train.py reports
    return model


def _skipped(model, config, layers) -> list:
    """What the first pass must not materialise: the decoder layers, and a tied lm_head (it becomes
    the input embedding's weight)."""
    tied = getattr(config, "tie_word_embeddings", False)
    return [m for _, m in layers] + ([model.get_output_embeddings()] if tied else [])


# --------------------------------------------------------------------------- safetensors checkpoints

class SafetensorsReader:
    """Tensors of a Hugging Face checkpoint folder by name, read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ModelFilesError(f"{folder} has no model.safetensors or model.safetensors.index.json")
        self.handles, self.where = [], {}
        for f in files:
            try:  # pread(2) into fresh memory: a memory map would keep every page read in this process's RSS
                h = safe_open(str(folder / f), framework="pt", device="cpu", backend="pread")
            except TypeError:  # safetensors before 0.7 has only the memory map
                h = safe_open(str(folder / f), framework="pt", device="cpu")
            self.handles.append(h)
            self.where.update({k: h for k in h.keys()})
        self.folder = folder

    def __call__(self, name: str, meta: torch.Tensor) -> torch.Tensor:
        if name not in self.where:
            raise ModelFilesError(f"{self.folder}: no tensor '{name}' in its safetensors files")
        t = self.where[name].get_tensor(name)
        if tuple(t.shape) != tuple(meta.shape):
            raise ModelFilesError(f"{self.folder}: tensor '{name}' has shape {tuple(t.shape)}, the config "
                                  f"says {tuple(meta.shape)}")
        return t


def load_safetensors_layerwise(folder, cfg: Config, device: torch.device, compute_dtype: torch.dtype, park=None):
    """The checkpoint in `folder`, 4-bit unless `cfg.quant == "none"`, loaded one decoder layer at a
    time: each tensor is read from the safetensors file, cast to `compute_dtype` on `device`, and a
    layer's linears are quantised before the next layer is read (then moved to `park` if given)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    read = SafetensorsReader(Path(folder))
    return _fill_layer_by_layer(meta_model(config, compute_dtype, cfg.trust_remote_code), config, cfg, device,
                                compute_dtype, lambda i: read, park)
