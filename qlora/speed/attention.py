"""Attention that keeps packed examples apart.

Training packs several tokenized examples into one row of ``max_seq_len`` tokens. ``position_ids``
restart at 0 at every example start (the unfilled tail is a pseudo-example of padding with positions
0, 1, 2, ... and labels -100), and no token may attend to a token of another example in its row.

We hook this into transformers' decoder models (Llama, Mistral, Qwen2/3, Gemma 3, Phi-3) through its
attention-function registry
(``transformers.AttentionInterface.register``) instead of copying the model: each backend is a
function ``f(module, query, key, value, attention_mask, dropout, scaling, **kwargs)`` registered under
its own name, and the (possibly peft-wrapped) model is switched to it with ``set_attn_implementation``.
We deliberately do NOT register a mask function in ``AttentionMaskInterface``: for a name that has
none, ``masking_utils.create_causal_mask`` returns early, so transformers builds no dense causal mask
and skips its own packed-sequence detection (which costs a host sync per forward). Everything the
attention needs is computed once per micro-batch by :func:`packing_kwargs` and travels as keyword
arguments ``LlamaForCausalLM.forward(**kwargs) -> LlamaModel -> LlamaDecoderLayer -> LlamaAttention ->
attention function`` (transformers 5.17; they survive peft's LoRA wrapper and non-reentrant gradient
checkpointing, which binds them with ``functools.partial``). Kwarg names are transformers' own:

* ``sdpa``/``flex``: ``attention_mask`` = a 4D bool mask [B,1,T,T] / a FlexAttention ``BlockMask``;
  ``create_causal_mask`` hands a 4D mask through untouched.
* ``varlen``: ``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``, ``max_length_k``
  (``FlashAttentionKwargs``) over the flattened B*T tokens.
* ``cudnn``: the same, plus ``whole_rows`` (every row one example, e.g. one long document). With cuDNN's
  frontend installed (``pip install --no-deps nvidia-cudnn-frontend``; its torch op ``cudnn.sdpa_torch``),
  every micro-batch runs cuDNN's fused attention: dense [B, H, T, D] for whole rows, the packed tokens with
  cumulative lengths (THD) otherwise, and inside a CUDA graph capture too. Without it: torch's own cuDNN
  kernel for whole rows (1.7x faster than flash on Hopper, but not capturable) and ``varlen`` for packed
  rows, since torch 2.11's ragged cuDNN path gives wrong gradients (benchmarks/NOTES.md, 10).

Usage::

    backend = use_packed_attention(model, "auto")
    out = model(input_ids=ids, position_ids=pos, **packing_kwargs(pos, backend, device=ids.device))

Why not transformers' own packed-sequence detection (stock "sdpa" derives a mask from position_ids):
it is skipped whenever a KV cache exists, and LlamaModel creates one by default (use_cache=True), so
it silently leaks unless use_cache=False; it also rebuilds a dense mask and syncs on every forward.

Note the loss: HF shifts labels inside a row, so the last token of one example would be trained to
predict the first token of the next; :func:`mask_cross_example_labels` sets those labels to -100.
"""

from __future__ import annotations

import inspect
import warnings
from functools import lru_cache

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from ..config import ConfigError

BACKENDS = ("auto", "sdpa", "varlen", "cudnn", "flex")
RAGGED = ("varlen", "cudnn")  # backends that take the flattened tokens and cumulative sequence lengths
# Registry names. Not "flash..." nor "...flex_attention": transformers keys special checks off those.
_IMPL = {"sdpa": "qlora_packed_sdpa", "varlen": "qlora_packed_varlen", "cudnn": "qlora_packed_cudnn",
         "flex": "qlora_packed_flex"}
_VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


# --------------------------------------------------------------------------- position_ids helpers
def _starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool [B,T]: True where an example (or the padding pseudo-example) starts. A row always starts one."""
    starts = position_ids == 0
    starts[:, 0] = True
    return starts


def mask_cross_example_labels(labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """Labels with every example's first token set to -100.

    HF's causal-LM loss shifts labels within a row, so label[t] is predicted from token t-1; at an
    example start t-1 belongs to the previous example. Unpacked, the first token is never a target,
    so masking it changes nothing but removes the cross-example target.
    """
    return labels.masked_fill(_starts(position_ids.to(labels.device)), -100)


# --------------------------------------------------------------------------- varlen signature adapter
def _adapt_varlen(fn):
    """Wrap ``varlen_attn`` so one call works across torch versions, by reading its signature.

    torch 2.11 (read on the GPU image): ``(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
    return_aux=None, scale=None, window_size=(-1, -1))`` - causal is ``window_size=(-1, 0)``; no GQA
    flag, so K/V heads are repeated here (2.11 happened to accept fewer K/V heads, but does not say so).
    torch 2.13: ``(..., max_k, *, return_aux=None, scale=None, window_size=(-1, -1), enable_gqa=False,
    seqused_k=None, block_table=None, num_splits=None)`` - adds ``enable_gqa``, used for GQA.
    torch 2.10 took ``is_causal`` and no ``scale``; handled too. ``window_size`` goes in as the tuple
    ``(-1, 0)``, the exact value torch compares against to set its ``is_causal`` flag.
    """
    params = inspect.signature(fn).parameters
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 7 or not ({"window_size", "is_causal"} & params.keys()):
        raise RuntimeError(
            f"unsupported torch.nn.attention.varlen.varlen_attn signature {inspect.signature(fn)}: "
            "expected (query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, ...) with `window_size` "
            "(torch>=2.11) or `is_causal` (torch 2.10); use backend='sdpa' or 'flex' instead"
        )
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    has_gqa, has_scale = "enable_gqa" in params, "scale" in params

    def call(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window=None):
        kw = dict(causal)
        if window:  # a sliding-window layer: the key `window - 1` back is the oldest seen, as in transformers
            if "window_size" not in params:
                raise ConfigError("this torch's varlen_attn has no window_size, so it cannot run the model's "
                                  "sliding-window layers: use attn_backend sdpa")
            kw["window_size"] = (window - 1, 0)
        if q.shape[1] != k.shape[1]:  # GQA: [N, H, D] layout, kv head j serves query heads j*rep..
            if has_gqa:
                kw["enable_gqa"] = True
            else:
                rep = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if scale is not None:
            if has_scale:
                kw["scale"] = scale
            elif abs(scale * q.shape[-1] ** 0.5 - 1.0) > 1e-6:  # kernel applies 1/sqrt(D) itself
                q = q * (scale * q.shape[-1] ** 0.5)
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    return call


@lru_cache(maxsize=None)
def _varlen_call():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as e:  # torch < 2.10
        raise ConfigError(f"config key 'attn_backend' = 'varlen' needs torch.nn.attention.varlen (torch>=2.10): {e}; "
                          "use sdpa or flex") from None
    return _adapt_varlen(varlen_attn)


# --------------------------------------------------------------------------- attention functions
def _missing(backend: str, what: str):
    return ValueError(
        f"packed attention '{backend}' was called without {what}: pass "
        f"model(..., **packing_kwargs(position_ids, '{backend}')), or switch back with "
        "use_default_attention(model) for unpacked use such as generation"
    )


def _check(query, key, dropout):
    # Dropout must be 0 (torch's varlen has none; this keeps all backends identical).
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported with packing; set attention_dropout=0")
    # A KV cache would prepend keys that belong to no packed example (packing_kwargs sets use_cache=False).
    if key.shape[2] != query.shape[2]:
        raise ValueError(f"packed attention needs as many keys as queries, got {key.shape[2]} vs {query.shape[2]}")


def _no_extras(backend: str, softcap) -> None:
    if softcap:
        raise ConfigError(f"attn_backend '{backend}' has no attention-logit soft-capping, which this model uses: "
                          "use attn_backend sdpa")


def _sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                  softcap=None, **kwargs):
    """Reference backend: SDPA with the block-diagonal causal bool mask [B,1,T,T] (True = attend); in a
    sliding-window layer (Gemma 3's local layers, Phi-3, Mistral v0.1) also only the keys less than
    `sliding_window` back; with `softcap` (attention-logit soft-capping) the same maths unfused."""
    if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4):
        raise _missing("sdpa", "a 4D `attention_mask`")
    _check(query, key, dropout)
    mask = attention_mask
    if sliding_window:
        i = torch.arange(query.shape[2], device=query.device)
        mask = mask & ((i[:, None] - i[None, :]) < sliding_window)
    rep = query.shape[1] // key.shape[1]
    if rep > 1:  # repeat rather than enable_gqa: with a mask, GQA would force SDPA's math kernel on CUDA
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    if softcap:
        scores = (query @ key.transpose(-1, -2)) * (scaling if scaling is not None else query.shape[-1] ** -0.5)
        scores = (torch.tanh(scores / softcap) * softcap).masked_fill(~mask, float("-inf"))
        out = scores.softmax(-1, dtype=torch.float32).to(query.dtype) @ value
    else:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


@lru_cache(maxsize=None)
def _flex_fn(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled on CUDA (the fused kernel); eager elsewhere (CPU: correct but forward-only, and
    # compiling it there takes ~40 s). dynamic=False: packed rows always have the same T.
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _flex_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """FlexAttention with a document-causal BlockMask built once per micro-batch."""
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, BlockMask):
        raise _missing("flex", "a BlockMask `attention_mask`")
    _check(query, key, dropout)
    _no_extras("flex", kwargs.get("softcap"))
    if kwargs.get("sliding_window"):
        raise ConfigError("attn_backend 'flex' does not apply sliding windows, which this model's layers use: "
                          "use attn_backend sdpa or varlen")
    with warnings.catch_warnings():  # eager (CPU) flex warns that it is unfused; that is intended
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        out = _flex_fn(query.device.type)(
            query, key, value, block_mask=attention_mask, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
        )
    return out.transpose(1, 2).contiguous(), None


def _half(q, k, v):
    """Flash and cuDNN kernels take half precision only; fp32 activations (e.g. after peft's
    prepare_model_for_kbit_training) are cast for the kernel only, as transformers' FA2 does."""
    if q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        half = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else torch.bfloat16
        return q.to(half), k.to(half), v.to(half)
    return q, k, v


def _varlen_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """torch varlen (flash) attention over the flattened B*T tokens, split by cu_seq_lens."""
    if any(kwargs.get(k) is None for k in _VARLEN_KEYS):
        raise _missing("varlen", "`" + "`, `".join(_VARLEN_KEYS) + "`")
    _check(query, key, dropout)
    _no_extras("varlen", kwargs.get("softcap"))
    B, Hq, T, D = query.shape
    q, k, v = _half(*(x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (query, key, value)))
    out = _varlen_call()(
        q, k, v, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"],
        kwargs["max_length_q"], kwargs["max_length_k"], scale=scaling, window=kwargs.get("sliding_window"),
    )
    return out.view(B, T, Hq, D).to(query.dtype), None


def _dense_cudnn(query, key, value, scale=None):
    """Causal attention on [B, H, T, D] (fewer K/V heads for GQA) through SDPA restricted to its cuDNN
    kernel (GQA checked on an H100: results/2026-11-28-cudnn-longrow/probe.log)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                              enable_gqa=query.shape[1] != key.shape[1])


@lru_cache(maxsize=None)
def cudnn_frontend():
    """cuDNN frontend's differentiable torch attention op (`cudnn.sdpa_torch`), or None when the package is
    not installed or finds no cuDNN library (e.g. a CPU-only torch)."""
    try:
        import cudnn

        fn = cudnn.sdpa_torch
        if tuple(int(x) for x in cudnn.__version__.split(".")[:2]) < (1, 32):  # the version measured
            return None
        cudnn.backend_version()  # loads the cuDNN library torch ships; raises without one
    except Exception:  # noqa: BLE001 -- any failure means: not usable here
        return None
    return fn


def _frontend_forward(fe, query, key, value, scaling, kwargs):
    """Causal attention through cuDNN's frontend: dense rows when each holds one example, else the
    flattened tokens split by the cumulative lengths (empty padding sequences allowed, as captured).
    A sliding-window layer sees the keys less than `sliding_window` back, as transformers' mask does."""
    B, Hq, T, D = query.shape
    window = kwargs.get("sliding_window")
    band = {"window_left": window} if window else {}  # cuDNN's left bound: keys less than this far back
    q, k, v = _half(query, key, value)
    if kwargs.get("whole_rows"):
        out, _ = fe(q, k, v, scale=scaling, is_causal=True, return_lse=True, **band)
        return out.transpose(1, 2).to(query.dtype)  # the output takes q's [B, T, H, D] memory order
    if any(kwargs.get(k) is None for k in _VARLEN_KEYS):
        raise _missing("cudnn", "`" + "`, `".join(_VARLEN_KEYS) + "`")
    q, k, v = (x.transpose(1, 2).reshape(B * T, x.shape[1], D) for x in (q, k, v))
    out, _ = fe(q, k, v, scale=scaling, is_causal=True, cu_seqlens_q=kwargs["cu_seq_lens_q"],
                cu_seqlens_kv=kwargs["cu_seq_lens_k"], max_seqlen_q=kwargs["max_length_q"],
                max_seqlen_kv=kwargs["max_length_k"], return_lse=True, **band)
    return out.view(B, T, Hq, D).to(query.dtype)


def _cudnn_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """cuDNN's frontend when installed (any rows); else torch's cuDNN kernel when every row holds one
    example (`whole_rows`; a padding tail after it is harmless: causal attention never lets a real token
    see it, and it has no targets), and varlen for packed rows."""
    fe = cudnn_frontend()
    if fe is not None:
        _check(query, key, dropout)
        _no_extras("cudnn", kwargs.get("softcap"))
        return _frontend_forward(fe, query, key, value, scaling, kwargs), None
    if not kwargs.get("whole_rows") or kwargs.get("sliding_window"):  # cuDNN's dense kernel: plain causal only
        return _varlen_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    _check(query, key, dropout)
    _no_extras("cudnn", kwargs.get("softcap"))
    out = _dense_cudnn(*_half(query, key, value), scaling)
    return out.transpose(1, 2).contiguous().to(query.dtype), None


_FUNCTIONS = {"sdpa": _sdpa_forward, "varlen": _varlen_forward, "cudnn": _cudnn_forward, "flex": _flex_forward}


# --------------------------------------------------------------------------- public API
def _unwrap(model):
    """The transformers PreTrainedModel inside DDP/accelerate (.module) and peft (get_base_model)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _resolve(backend: str, device: torch.device | None) -> str:
    if backend not in BACKENDS:
        raise ConfigError(f"config key 'attn_backend': unknown packed-attention backend {backend!r}; choose one of "
                          f"{', '.join(BACKENDS)}")
    on_cuda = device is not None and device.type == "cuda"
    if backend == "auto":
        if on_cuda and _frontend_by_default(device):
            return "cudnn"
        return "varlen" if on_cuda and _varlen_available() else "sdpa"
    if backend in RAGGED:
        if not on_cuda:
            raise ConfigError(f"config key 'attn_backend' = '{backend}' needs a CUDA device (the model is on "
                              f"{device}): use auto or sdpa")
        _varlen_call()  # raises a clear error if torch lacks it or its signature is unknown (cudnn falls back to it)
        if backend == "cudnn" and not torch.backends.cudnn.is_available():
            raise ConfigError("config key 'attn_backend' = 'cudnn' needs torch built with cuDNN: use auto or varlen")
    return backend


def _frontend_by_default(device: torch.device) -> bool:
    """`auto` takes cuDNN's frontend where it was measured faster than flash (Hopper: +5% per step at 2048-token
    rows, benchmarks/NOTES.md 17), when installed, and not in deterministic mode (flash's backward is)."""
    return (cudnn_frontend() is not None and not torch.are_deterministic_algorithms_enabled()
            and torch.cuda.get_device_capability(device)[0] == 9)


MEASURED_HEADS = (128, 256)  # head sizes whose step ran faster on the frontend (Llama/Mistral/Qwen; Gemma 3)


def resolve_for_model(backend: str, device: torch.device, config, graphs: bool = False) -> str:
    """`_resolve`, where `auto` keeps cuDNN's frontend to what was measured faster: heads of 128 (+5% per step)
    and 256 (Gemma 3, +5%), inside CUDA graphs (`graphs`: the step runs as one; eager, the frontend's Python
    wrapper costs ~0.6 ms a call). Heads of 64 pass the correctness probe but were not timed: varlen."""
    resolved = _resolve(backend, device)
    if backend == "auto" and resolved == "cudnn" and (_head_dim(config) not in MEASURED_HEADS or not graphs):
        resolved = "varlen" if _varlen_available() else "sdpa"
    return resolved


def _head_dim(config) -> int | None:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    dim = getattr(config, "head_dim", None)
    heads = getattr(config, "num_attention_heads", None)
    return dim or (config.hidden_size // heads if heads and getattr(config, "hidden_size", None) else None)


def _varlen_available() -> bool:
    try:
        _varlen_call()
        return True
    except (ValueError, RuntimeError):
        return False


def use_packed_attention(model, backend: str, graphs: bool = False) -> str:
    """Register the packed attention functions and switch ``model`` (peft-wrapped or not) to one.

    Returns the resolved backend name ("auto" -> "cudnn" on Hopper with cuDNN's frontend installed outside
    deterministic mode, for heads of 128 or 256 when the step runs as CUDA graphs (`graphs`), the setting measured;
    asked for by name, it runs everywhere; else "varlen" on CUDA if available, else "sdpa"); pass it to
    :func:`packing_kwargs`. Raises ValueError for unknown names or unusable backends.
    """
    base = _unwrap(model)
    device = next(base.parameters()).device
    resolved = resolve_for_model(backend, device, base.config, graphs)
    if getattr(base.config, "attention_dropout", 0.0):
        raise ConfigError("packed attention needs the model's config.attention_dropout == 0 (this model has "
                          f"{base.config.attention_dropout}): set it to 0 in its config.json")
    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(_IMPL[name], fn)
    base.set_attn_implementation(_IMPL[resolved])
    return resolved


def describe(backend: str) -> str:
    """The resolved backend and, for cudnn, which kernels serve which rows (for the start-up line)."""
    if backend != "cudnn":
        return backend
    if cudnn_frontend() is not None:
        import cudnn

        return f"cudnn (cuDNN frontend {cudnn.__version__}: whole and packed rows)"
    return ("cudnn (torch's cuDNN kernel for rows of one example, flash for packed rows; "
            "pip install --no-deps nvidia-cudnn-frontend for cuDNN on packed rows and in CUDA graphs)")


def use_default_attention(model, implementation: str = "sdpa") -> None:
    """Switch back to a stock transformers attention (e.g. for generation with a KV cache)."""
    _unwrap(model).set_attn_implementation(implementation)


def batch_kwargs(batch: dict, backend: str, device) -> dict:
    """`packing_kwargs` for a micro-batch from `qlora.training.packing.collate` (its position_ids and flags)."""
    return packing_kwargs(batch["position_ids"], backend, device=device, whole_rows=batch.get("whole_rows"))


def packing_kwargs(position_ids: torch.LongTensor, backend: str, *, device=None,
                   whole_rows: bool | None = None) -> dict:
    """Per-micro-batch kwargs for ``model(input_ids=..., position_ids=..., **kwargs)``.

    Computed once and shared by every layer, so layers do no host syncs. Includes ``use_cache=False``
    (else LlamaModel allocates a DynamicCache in every training forward, the config default).
    ``varlen`` needs one ``max()`` on the host for ``max_length_*`` (ints); pass the collator's CPU
    ``position_ids`` and ``device=`` the model's device to make that free (results go to ``device``).
    ``whole_rows`` (``cudnn`` only): every row holds at most one real example (the collator's flag); by
    default it is read off ``position_ids``, where a padding tail looks like a second example.
    """
    device = torch.device(device) if device is not None else position_ids.device
    backend = _resolve(backend, device) if backend == "auto" else backend
    if backend not in _IMPL:
        raise ValueError(f"unknown packed-attention backend {backend!r}; choose one of {BACKENDS}")
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T], got shape {tuple(position_ids.shape)}")
    starts = _starts(position_ids)
    B, T = starts.shape
    kwargs = {"use_cache": False}
    if backend in RAGGED:
        flat = starts.flatten().nonzero().flatten()
        cu = torch.cat([flat, flat.new_tensor([B * T])]).to(torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())  # the one host sync (none if position_ids are on CPU)
        if backend == "cudnn":  # one example per row: no packing mask needed
            kwargs["whole_rows"] = bool(whole_rows) if whole_rows is not None else cu.numel() == B + 1
            if cudnn_frontend() is not None:  # few shapes for its plan cache: sequences padded to a power of two
                n = cu.numel() - 1
                cu = torch.cat([cu, cu.new_full((max(16, 1 << (n - 1).bit_length()) - n,), B * T)])
                max_len = T
        cu = cu.to(device)
        return {**kwargs, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_len, "max_length_k": max_len}
    doc = (starts.cumsum(-1) - 1).to(device)  # example index of each token within its row
    if backend == "sdpa":
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        return {**kwargs, "attention_mask": ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]}
    from torch.nn.attention.flex_attention import create_block_mask

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[b, q_idx] == doc[b, kv_idx]) & (q_idx >= kv_idx)

    return {**kwargs, "attention_mask": create_block_mask(document_causal, B, None, T, T, device=device)}
