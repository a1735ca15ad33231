"""SIGTERM / Ctrl-C handling: the first signal asks the loop to checkpoint at the next step
boundary and exit; a second Ctrl-C exits at once (checkpoints are atomic, so none is corrupted).
With several processes the request is combined across ranks (`agreed`), so a signal that reaches
one rank only still stops every rank at the same step."""

from __future__ import annotations

import os
import signal


class StopRequest:
    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            os._exit(130)  # second Ctrl-C: leave now; the tmp checkpoint folder is never renamed
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def agreed(self, accelerator) -> bool:
        """Whether any rank was asked to stop (a collective when there are several processes: every rank
        calls it at the same step boundary). A signal that reaches one rank thus stops all of them at
        the same step, so the collective checkpoint that follows cannot hang."""
        if accelerator.num_processes == 1:
            return self.requested
        import torch

        flag = torch.tensor(float(self.requested), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item() > 0)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
