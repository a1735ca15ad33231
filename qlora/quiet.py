"""Dependency chatter, silenced by where it comes from, never by its wording.

Every entry below names one source (a logger, or a warning category raised from one module) whose
messages ask nothing of the user, and why. A record from a listed logger below ERROR is dropped,
whatever it says, so a reworded message in a new release stays quiet; every other logger and every
other warning still prints. Importing `qlora` applies the table (`install`); `python -W error` or an
explicit `warnings` filter set later still wins.
"""

from __future__ import annotations

import logging
import sys
import warnings

# logger name (its children included): why its warnings are noise here
LOGGERS = {
    "bitsandbytes.backends.cpu.ops": "on CPUs with AVX512-BF16 bitsandbytes tries to fetch an optional CPU kernel "
    "from the Hugging Face hub through `kernels` at import, and falls back to its built-in kernel when that fails "
    "(offline, untrusted publisher, package missing): the built-in kernel is what every run here uses",
    "kernels": "the same optional fetch: the hub publisher check and offline-mode notices",
    "liger_kernel.backends": "liger-kernel's optional backends (CuteDSL, Ascend) that an NVIDIA GPU without them "
    "does not use; the Triton kernels this project uses are unaffected",
}

# (warning category, module that raises it, as a regex): why it is noise here
WARNINGS = [
    (UserWarning, r"bitsandbytes\.optim(\..*)?$", "paged optimizers run unpaged on the CPU; the README's config "
     "table says so"),
    (FutureWarning, r"transformers\.modeling_utils$", "deprecated aliases (`is_gradient_checkpointing`) that peft "
     "calls; they do exactly what their new names do"),
]


def install() -> None:
    """Apply the table; also turn transformers' and the hub's progress bars off when stderr is not a
    terminal (a log file would get one line per redraw)."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.ERROR:
            logger.setLevel(logging.ERROR)
    for category, module, _ in WARNINGS:
        warnings.filterwarnings("ignore", category=category, module=module)
    if not _stderr_is_terminal():
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        disable_progress_bars()
        hf_logging.disable_progress_bar()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False
