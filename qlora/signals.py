"""SIGTERM / Ctrl-C handling: the first signal asks the loop to checkpoint at the next step
boundary and exit; a second Ctrl-C exits at once (checkpoints are atomic, so none is corrupted)."""

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

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False
