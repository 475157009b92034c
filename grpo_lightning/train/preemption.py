"""Surviving SIGTERM and SIGINT during fit: stop at a boundary between stages with a checkpoint to resume from.

Lightning's own SIGTERM handling (its ``_SignalConnector``) lets the whole step finish, stops the fit and exits
with status 0 and no checkpoint, which a job runner takes for a finished job. During training
:class:`Preemption` takes SIGTERM and SIGINT over (Lightning restores its handlers when fit ends; SLURM's
requeue signal, SIGUSR1, stays Lightning's) and only notes the signal. The step stops at the next boundary:

- after sampling or the reference pass (before any update): the weights are still those the step started
  with, the random state is put back to the step's start and the batch is not counted as processed, so the
  checkpoint redoes the whole step when resumed;
- during the updates: they finish (never stopping inside ``optimizer.step``), and the step's end is the boundary;
- before training (the accuracy measured before it, say): it stops before the first step, the accuracy kept.

After the last step the run evaluates and exports as usual.

Every process asks at every boundary whether any process was signalled (one all-reduce), so all stop at the
same one and the checkpoint hook gathers every process's random state. The fit then ends with
:class:`Preempted`, which the command line turns into a non-zero exit and the command that resumes.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L

from grpo_lightning.core.random_state import rng_state, set_rng_state
from grpo_lightning.train.guard import any_process

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The fit stopped on a signal after writing ``checkpoint``; resuming from it continues the run exactly."""

    def __init__(self, signum: int, checkpoint: Path, where: str, rank: int):
        self.signum, self.checkpoint, self.where, self.rank = signum, checkpoint, where, rank
        super().__init__(f"stopped by {signal.Signals(signum).name} {where}; checkpoint written to {checkpoint}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by that signal


def checkpoint_path(trainer: L.Trainer) -> Path:
    """Where a stopped run writes: the checkpoint callback's ``last.ckpt`` (what ``--ckpt_path last`` finds)."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    if callback is None or dirpath is None:
        return Path(trainer.default_root_dir) / "last.ckpt"
    return Path(dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"


def at_stage_end(trainer: L.Trainer | None, stage: str) -> None:
    """Called by the module after each stage of a step: where a signalled run stops (see the module docstring)."""
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, Preemption):
            callback.stage_end(trainer, stage)


class Preemption(L.Callback):
    """On SIGTERM or SIGINT during fit, write a checkpoint at the next stage boundary and stop the fit.

    A second SIGINT (Ctrl-C twice) interrupts at once, without a checkpoint.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._step_rng: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.signum is None
        self.signum = signum
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        if first and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # DDP's script launcher: the other processes are this one's children

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals reach the main thread only
        # a SIGTERM that reached Lightning's own handler before training started counts too
        self._trainer, self.signum = trainer, (signal.SIGTERM if trainer.received_sigterm else None)
        for signum in SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: L.Trainer, module: Any, exception: BaseException) -> None:
        self._restore_handlers()

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self._step_rng = rng_state()  # what the step draws from: a stop before its updates puts it back
        if any_process(trainer.strategy, self.signum is not None):  # signalled before (the evaluation, say)
            self._stop(trainer, f"before the step after optimizer step {trainer.global_step} (resuming runs it)")

    def stage_end(self, trainer: L.Trainer, stage: str) -> None:
        if stage == "update":
            return  # the step is complete only once training_step returns: on_train_batch_end stops it
        if any_process(trainer.strategy, self.signum is not None):
            assert self._step_rng is not None
            set_rng_state(self._step_rng)
            where = f"after {stage}, before the updates that would follow optimizer step {trainer.global_step}"
            self._stop(trainer, where + " (resuming redoes this step)")

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
        if any_process(trainer.strategy, self.signum is not None):
            self._stop(trainer, f"after optimizer step {trainer.global_step}")

    def _stop(self, trainer: L.Trainer, where: str) -> None:
        path = checkpoint_path(trainer)
        trainer.save_checkpoint(path)  # every process: the hooks gather every process's random state
        raise Preempted(self.signum or signal.SIGTERM, path, where, trainer.global_rank)
