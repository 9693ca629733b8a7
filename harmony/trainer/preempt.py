"""Preemption: SIGTERM (what SLURM and Kubernetes send before taking a node back) and SIGINT (Ctrl-C) end a
run at a step boundary with a checkpoint instead of losing the steps since the last periodic one.

The first signal only raises a flag. The trainer asks :meth:`Preemption.agreed` after every step (one tiny
all-reduce when there are several ranks, so every rank stops after the same step), writes a checkpoint at
that step the same way as a periodic one, prints where it is, and the process exits with 128 + the signal
number (143 for SIGTERM, 130 for SIGINT). Resuming from that checkpoint (``--train.resume=auto``) is exact,
as from a periodic one. A second signal restores the default action and re-sends itself: the process
ends at once, without a checkpoint.
"""
from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Dict, Optional

from harmony import distributed as hd

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal after writing ``checkpoint`` (None if none could be written)."""

    def __init__(self, signum: int, step: int, checkpoint: Optional[Path]):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Preemption:
    """Signal handlers for the duration of a training loop (``with Preemption(...) as p:``)."""

    def __init__(self, verbose: bool = True):
        self.verbose = verbose
        self.signum = 0
        self._old: Dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum:  # the second signal: give up at once
            print(f"{name} again: aborting now, without a checkpoint", file=sys.stderr, flush=True)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum
        if self.verbose:
            print(f"{name} received: finishing this step, then writing a checkpoint and stopping "
                  f"(send it again to abort at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def agreed(self, world_size: int, device=None) -> int:
        """The signal every rank stops for (0: none): the largest number any rank received; collective when
        world_size > 1, so every rank must call it at the same point."""
        if world_size <= 1:
            return self.signum
        return int(hd.reduce_scalars([float(self.signum)], "max", device=device)[0])
