"""A callback for the preemption tests: the process signals itself while a chosen stage of a chosen step runs.

Importable by subprocesses (the tests put tests/ on PYTHONPATH): ``--trainer.callbacks+=signal_probe.SignalAt``.
The signal is sent at the start of the stage, so the stage is still running when the handler has run.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import lightning as L

STAGES = {"sampling": "_rollout", "update": "_update"}


class SignalAt(L.Callback):
    """Send ``signum`` to this process when rollout step ``step`` enters ``stage`` (on process ``rank`` only)."""

    def __init__(self, step: int, stage: str, signum: int = int(signal.SIGTERM), rank: int = 0):
        self.step, self.stage, self.signum, self.rank = step, stage, signum, rank

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        name = STAGES[self.stage]
        original = getattr(module, name)

        def signalled(*args: Any) -> Any:
            if trainer.global_step // module.hparams.mu == self.step and trainer.global_rank == self.rank:
                os.kill(os.getpid(), self.signum)
            return original(*args)

        setattr(module, name, signalled)
