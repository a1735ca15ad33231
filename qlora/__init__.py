"""qlora: QLoRA fine-tuning building blocks; the loop itself lives in train.py.

Importing qlora hides four messages that dependencies print on every CPU run and that ask nothing of
the user. Each filter matches one exact message from one library; everything else still prints:

- bitsandbytes, on CPUs with AVX512-BF16: "Failed to load CPU gemm_4bit_forward from kernels-community:
  No module named 'kernels'". That optional kernel comes from the Hugging Face hub through the `kernels`
  package; without it bitsandbytes uses its built-in CPU kernel, which is what every run here uses.
- bitsandbytes: "Paged optimizers are not supported on CPU" (the unpaged fallback is documented in the
  README's config table).
- transformers: the FutureWarnings that `is_gradient_checkpointing` (read by peft) and
  `gradient_checkpointing_enable` (called when the model is set up) are deprecated aliases; each does
  exactly what its new `activation_checkpointing` name does.
"""

import logging
import warnings

_KERNELS_MISSING = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'"


class _DropExactMessage(logging.Filter):
    """Drops log records whose formatted message starts with `prefix`; passes every other record."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def _quiet_dependencies() -> None:
    # A filter on the logger object itself (created here before bitsandbytes asks for it by the same
    # name) sees the record wherever the handlers are; bitsandbytes logs this once, when it is imported.
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropExactMessage) for f in logger.filters):
        logger.addFilter(_DropExactMessage(_KERNELS_MISSING))
    warnings.filterwarnings("ignore", message=r"Paged optimizers are not supported on CPU", category=UserWarning,
                            module=r"bitsandbytes\.")
    warnings.filterwarnings("ignore", message=r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is "
                            r"deprecated", category=FutureWarning, module=r"transformers\.")


_quiet_dependencies()
