"""Load a model for inference: a base + LoRA adapter, a merged model directory, or a bare base model.

    from qlora.evaluation.inference import load_for_inference
    model, tok, cfg = load_for_inference(adapter="runs/default/final")                # 4-bit base + adapter
    model, tok, cfg = load_for_inference(adapter="runs/default/final", dequantize=True)  # same numbers, fast on CPU
    model, tok, cfg = load_for_inference(model="runs/default/merged")                 # written by qlora.evaluation.merge
    model, tok, cfg = load_for_inference(model="smollm2")                             # the base alone, NF4

generate.py, qlora.evaluation.evaluate and qlora.evaluation.merge all load through `load_for_inference`. Everything is
checked before any weights are read, and each problem is one ModelLoadError that names the file: a
missing adapter folder, an adapter_config.json that is not JSON, an `r` or target modules that do not
fit the base model, a missing, pickled (.bin: only safetensors are loaded) or truncated weights file,
a model directory whose weights are damaged or do not fit its config.json.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from ..model.base import (ModelLoadError, check_model_dir, load_base_model, load_tokenizer, random_config,
                          read_json, resolve_source)
from ..config import Config, load_config
from ..filecheck import safetensors_shapes
from ..model.quant import linears_4bit, resolve_compute_dtype

__all__ = ["load_for_inference", "inference_config", "check_adapter", "check_model_dir", "dequantized_model"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
LORA_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")


def load_for_inference(adapter: str | None = None, model: str | None = None, *, quant: str | None = None,
                       compute_dtype: str | None = None, dequantize: bool = False, device=None):
    """(model in eval mode, tokenizer, Config), ready for `qlora.evaluation.generation.generate_ids`.

    `adapter`: a folder written by train.py; its config.yaml gives the base model, quantisation and
    chat format (`model` overrides the base). Without an adapter, `model` is a merged directory (its
    config.yaml gives the chat format; loaded unquantised unless `quant` says otherwise) or any base
    model source. `dequantize`: the 4-bit base is loaded exactly as in training, then every 4-bit
    linear becomes a plain linear holding its dequantised weight in the compute dtype: in fp32 the same
    logits as the 4-bit path, and several times faster generation on a CPU."""
    cfg, adapter_cfg = inference_config(adapter, model, quant, compute_dtype)
    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg)  # also checks that the model source exists and is a causal LM
    shapes = base_shapes(cfg, tied=True)
    source = None if cfg.model.startswith("random:") else resolve_source(cfg.model)
    if source and Path(source).is_dir():
        check_model_dir(source, {k: v for k, v in shapes.items() if k not in shapes.tied})
    if adapter:
        check_adapter(adapter, adapter_cfg, shapes, cfg.model)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(adapter)
            tokenizer.padding_side = "right"
    net = load_base_model(cfg, device)  # 4-bit linears guarded against bitsandbytes' CPU repack (qlora.model.quant)
    if dequantize and cfg.quant != "none":
        net = dequantized_model(net, resolve_compute_dtype(cfg.compute_dtype, device))
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    net.requires_grad_(False)
    return net.eval(), tokenizer, cfg


# --------------------------------------------------------------------------- checks before loading

def inference_config(adapter: str | None, model: str | None = None, quant: str | None = None,
                     compute_dtype: str | None = None) -> tuple[Config, dict | None]:
    """(Config, the adapter's adapter_config.json or None) for `load_for_inference`; reads no weights."""
    overrides = {k: v for k, v in (("quant", quant), ("compute_dtype", compute_dtype)) if v}
    preset, adapter_cfg = None, None
    if adapter:
        folder = Path(adapter)
        if not folder.is_dir():
            raise ModelLoadError(f"adapter folder {adapter} {'is a file' if folder.exists() else 'does not exist'}: "
                                 "pass the folder train.py wrote (e.g. runs/default/final or a checkpoint-N)")
        if not (folder / "adapter_config.json").is_file():
            raise ModelLoadError(f"{folder / 'adapter_config.json'} is missing: {adapter} is not an adapter folder "
                                 "(train.py writes them to <output_dir>/final and <output_dir>/checkpoint-N)")
        adapter_cfg = read_json(folder / "adapter_config.json", "re-save the adapter with peft's save_pretrained")
        for key in ("r", "target_modules"):
            if key not in adapter_cfg:
                raise ModelLoadError(f"{folder / 'adapter_config.json'} has no '{key}': not a LoRA adapter config")
        if not isinstance(adapter_cfg["r"], int) or adapter_cfg["r"] < 1:
            raise ModelLoadError(f"{folder / 'adapter_config.json'}: 'r' must be a positive integer, "
                                 f"got {adapter_cfg['r']!r}")
        preset = folder / "config.yaml"
        if not preset.is_file() and not model:
            model = adapter_cfg.get("base_model_name_or_path") or None
            if not model:
                raise ModelLoadError(f"{adapter} has no config.yaml naming its base model: pass --model")
    elif model and (Path(model) / "config.yaml").is_file() and (Path(model) / "config.json").is_file():
        preset = Path(model) / "config.yaml"  # a merged directory: the run's chat format, full precision
        overrides.setdefault("quant", "none")
    if model:
        overrides["model"] = model
    cfg = load_config(["--config", str(preset)] if preset is not None and preset.is_file() else [],
                      accept_renamed=True, **overrides)
    return cfg, adapter_cfg


class Shapes(dict):
    """State-dict name -> shape, whose `tied` names a tensor shared with an earlier name (a tied
    `lm_head.weight` is the input embedding: a module an adapter can target, no tensor of the weights file)."""
    tied: frozenset = frozenset()


def base_shapes(cfg: Config, tied: bool = False) -> dict[str, list[int]]:
    """State-dict name -> shape of `cfg.model`, from its config alone (built on the meta device): the
    tensors its weights files hold. `tied`: also the names of tied tensors (in `.tied` of the `Shapes`
    returned), so every module of the model is there, e.g. for an adapter's target_modules."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.model.startswith("random:"):
        config = random_config(cfg.model.split(":", 1)[1])
    else:
        try:
            config = AutoConfig.from_pretrained(resolve_source(cfg.model), trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read the config of model '{cfg.model}': {str(e).splitlines()[0]}") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    shapes, seen, shared = Shapes(), set(), set()
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # a tied tensor (lm_head to the embeddings) is saved once, first name
            seen.add(id(tensor))
            shapes[name] = list(tensor.shape)
        elif tied:
            shared.add(name)
            shapes[name] = list(tensor.shape)
    shapes.tied = frozenset(shared)
    return shapes


def check_adapter(adapter: str, adapter_cfg: dict, shapes: dict[str, list[int]], model_name: str) -> None:
    """The adapter's weights file is whole, and its target modules, rank and tensor shapes fit the base
    model whose state-dict shapes are `shapes`."""
    folder = Path(adapter)
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        raise ModelLoadError(
            f"{file} is missing: " + (f"{adapter} holds {pickles[0]}, a pickle, and only safetensors adapters are "
                                      "loaded (re-save with save_pretrained(..., safe_serialization=True))"
                                      if pickles else "the adapter has no weights; train or copy it again"))
    try:
        saved = safetensors_shapes(file)
    except ValueError as e:
        raise ModelLoadError(f"{file} {e}: train or copy the adapter again") from None
    modules = {k[: -len(".weight")] for k, s in shapes.items() if k.endswith(".weight") and len(s) == 2}
    targets = adapter_cfg["target_modules"]
    if isinstance(targets, list):  # (a string is a regex: the tensors below are checked instead)
        unknown = [t for t in targets if not any(m == t or m.endswith("." + t) for m in modules)]
        if unknown:
            names = sorted({m.rsplit(".", 1)[-1] for m in modules})
            raise ModelLoadError(f"{folder / 'adapter_config.json'}: target_modules {unknown} are not modules of "
                                 f"{model_name} (it has {names}): pass the adapter's own base model with --model")
    r, found = adapter_cfg["r"], 0
    for key, shape in saved.items():
        match = LORA_KEY.fullmatch(key)
        if not match:
            continue
        module, ab = match.groups()
        if module not in modules:
            raise ModelLoadError(f"{file} holds LoRA weights for {module}, which {model_name} does not have: "
                                 "pass the adapter's own base model with --model")
        out_f, in_f = shapes[module + ".weight"]
        rank = shape[0] if ab == "A" else shape[-1]
        if rank != r and not adapter_cfg.get("rank_pattern"):
            raise ModelLoadError(f"{folder / 'adapter_config.json'} says r={r} but {file.name} holds rank-{rank} "
                                 f"tensors ({key}): the two files do not belong together; save the adapter again")
        if shape != ([rank, in_f] if ab == "A" else [out_f, rank]):
            raise ModelLoadError(f"{file}: {key} has shape {shape}, but {module} of {model_name} is {out_f} x "
                                 f"{in_f}: pass the adapter's own base model with --model")
        found += 1
    if not found:
        raise ModelLoadError(f"{file} holds no LoRA tensors (lora_A/lora_B): not an adapter of this project")


# --------------------------------------------------------------------------- dequantisation

def dequantized_state_dict(model, dtype: torch.dtype) -> dict:
    """State dict of a (partly) 4-bit model with every `Linear4bit` weight dequantised to `dtype`.
    bitsandbytes keeps packed weights plus `quant_state` entries in the state dict; those are replaced
    by the plain `<module>.weight` the dequantised Linear would have."""
    from bitsandbytes.functional import dequantize_4bit

    out, q_prefixes = {}, []
    for name, module in linears_4bit(model):
        w = module.weight
        out[f"{name}.weight"] = dequantize_4bit(w.data, w.quant_state).to(dtype).reshape(
            module.out_features, module.in_features).contiguous()
        if module.bias is not None:
            out[f"{name}.bias"] = module.bias.data.to(dtype).clone()
        q_prefixes.append(name + ".")
    for key, value in model.state_dict().items():
        if not any(key.startswith(p) for p in q_prefixes):  # skip packed data and quant-state entries
            out[key] = value.to(dtype) if value.is_floating_point() else value
    return out


def dequantized_model(model, dtype: torch.dtype):
    """A fresh plain `*ForCausalLM` (same config minus any quantization_config) holding the dequantised
    weights of the 4-bit `model`, in `dtype`. Call it before the 4-bit model runs a forward (bitsandbytes
    may repack weights in place then). `model` itself is left as it was."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    config.use_cache = True
    device = next(model.parameters()).device
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # built for real (not on meta): non-persistent buffers such as rotary inv_freq must exist
        with torch.device(device):
            plain = type(model)(config)
    finally:
        torch.set_default_dtype(default)
    missing, unexpected = plain.load_state_dict(dequantized_state_dict(model, dtype), strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelLoadError(f"dequantised weights do not fit a plain {type(model).__name__}: "
                             f"missing {missing[:3]} unexpected {unexpected[:3]}")
    if tied:
        plain.tie_weights()
    plain.requires_grad_(False)
    return plain.eval()
