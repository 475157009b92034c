"""The ``grpo-lightning`` command: LightningCLI with ``fit`` and ``validate`` (and ``test``/``predict`` unused).

``grpo-lightning fit --config configs/quickstart.yaml`` trains; ``--ckpt_path last`` resumes a stopped run;
``grpo-lightning validate --config … --model.model_name_or_path DIR`` measures accuracy of a model.

A mistake in the input (an option, a data file, a reward function, a checkpoint, an export directory) ends
the command with one message naming it and exit status 2, before anything is written; ``GRPO_TRACEBACK=1``
shows the traceback too. A fit stopped by SIGTERM or SIGINT exits with 128 + the signal's number and prints
the command that resumes it.
"""

from __future__ import annotations

from grpo_lightning.fast.huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # before torch is imported (below): torch reads the switch once, at its first allocation

import os
import shlex
import signal
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import torch

from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from grpo_lightning.fast.allocator import check_mmap_threshold, set_mmap_threshold, threshold_restored
from grpo_lightning.train.callbacks import AccuracyCallback, GRPOProgressBar, HFExport, SampleText
from grpo_lightning.train.checkpoints import (
    GRPOCheckpoint, check_resume_checkpoint, read_checkpoint, use_atomic_checkpoints,
)
from grpo_lightning.train.data import PromptDataModule
from grpo_lightning.train.guard import NonFiniteStepsError
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import check_max_steps
from grpo_lightning.train.preemption import Preempted, Preemption

TRACEBACK_ENV = "GRPO_TRACEBACK"  # set to 1 to see the traceback of an input error
# What a mistake in the input raises (the checks name the option, file or row); anything else is a bug and
# keeps its traceback.
INPUT_ERRORS = (ValueError, OSError, ImportError, NonFiniteStepsError)


@contextmanager
def run_settings() -> Iterator[None]:
    """What a run sets for the whole process, put back when it ends (importing this module sets nothing).

    Warning filters; torch's intra-op threads (``torch_threads``); glibc's mmap threshold
    (``malloc_mmap_threshold``, :func:`~grpo_lightning.fast.allocator.threshold_restored` says how far back).
    """
    threads = torch.get_num_threads()
    with warnings.catch_warnings(), threshold_restored():
        # Two Lightning warnings that describe this design, not a mistake: the frozen reference sits in eval
        # mode on purpose, and checkpoints hold the state after the step's updates, which is what resuming needs.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
        warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization and every_n_train_steps")
        try:
            yield
        finally:
            torch.set_num_threads(threads)


class KeepingSaveConfig(SaveConfigCallback):
    """Lightning's writer of ``config.yaml`` that never overwrites one: the next run in the same log directory
    (a requeued SLURM job's, whose version is the job id) writes ``config-2.yaml``, then ``config-3.yaml``."""

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            log_dir, stem, n = Path(trainer.log_dir), Path(self.config_filename).stem, 1
            while (log_dir / self.config_filename).exists():
                n += 1
                self.config_filename = f"{stem}-{n}.yaml"
        super().setup(trainer, pl_module, stage)


class ThreadsCLI(LightningCLI):
    """LightningCLI with a top-level ``torch_threads`` option, applied before models are built."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_threads", type=Optional[int], default=None,
            help="PyTorch intra-op CPU threads (torch.set_num_threads); tiny models sample fastest on 1",
        )

    def _parse_ckpt_path(self) -> None:
        """The model options that ``--ckpt_path``'s checkpoint saved, over the config's: LightningCLI's (2.6) own
        step, with the allow-list and the project's message for a file that is not a readable checkpoint."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():  # ``last`` and the like: nothing to read here
            return
        hparams = read_checkpoint(path).get("hyper_parameters", {})  # a CheckpointError names the file
        hparams.pop("_instantiator", None)
        if hparams:
            self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("torch_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"torch_threads must be at least 1, got {threads}")
            torch.set_num_threads(threads)


class GRPOCLI(ThreadsCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--malloc_mmap_threshold", type=Optional[int], default=1 << 20,
            help="Training on the CPU, glibc returns freed buffers of this many bytes or more to the OS (lower "
                 "peak memory; the whole process, glibc only). None, or a GPU run, leaves malloc as it is.",
        )
        parser.add_lightning_class_args(SampleText, "samples")
        # Always-on callbacks, configured as top-level sections of the YAML.
        parser.add_lightning_class_args(AccuracyCallback, "eval")
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(GRPOCheckpoint, "checkpoint")
        # save_on_train_epoch_end false: a monitored checkpoint (val/accuracy) is judged after each evaluation
        # during fit; Lightning would wait for the end of the one endless epoch when val_check_interval is 1
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0, "checkpoint.save_on_train_epoch_end": False})
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        parser.link_arguments("model.revision", "data.tokenizer_revision")  # the template of the model's revision

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with atomic checkpoint writes, a stop on SIGTERM/SIGINT with a checkpoint, and a progress
        bar that counts rollout steps unless the config brings its own or none."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        extra: list[Any] = [Preemption()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            extra.append(GRPOProgressBar())
        kwargs.setdefault("callbacks", [*callbacks, *extra])
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer

    def before_fit(self) -> None:
        """The checks that need no log directory, run before fit writes anything.

        A new run refuses another run's checkpoints (resume it, or pick another dirpath); then the step count,
        the export directory, the data files and the checkpoint to resume from are checked.
        """
        checkpoint = self.trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        # a requeued SLURM job resumes from Lightning's own hpc checkpoint, with no --ckpt_path
        requeued = SLURMEnvironment.detect() and self.trainer._checkpoint_connector._hpc_resume_path is not None
        if dirpath and ckpt_path is None and not requeued and Path(dirpath).is_dir() and any(Path(dirpath).glob("*.ckpt")):
            raise FileExistsError(
                f"checkpoint directory {dirpath} already holds checkpoints: resume with --ckpt_path last, "
                "or set checkpoint.dirpath to a new directory"
            )
        check_max_steps(self.trainer.max_steps, self.model.optimization.mu)
        threshold = self.config_init[self.subcommand].get("malloc_mmap_threshold")
        if threshold is not None:
            check_mmap_threshold(threshold)
            if self.trainer.strategy.root_device.type == "cpu":  # a GPU step's memory is not host buffers
                set_mmap_threshold(threshold)
        for callback in self.trainer.callbacks:
            if isinstance(callback, HFExport) and callback.export_dir:  # the default lies in a new log directory
                callback.check(Path(callback.export_dir))
        self.datamodule.setup("fit")  # reads and checks every row; fit's own setup then finds them loaded
        if ckpt_path is not None:
            check_resume_checkpoint(str(ckpt_path), dirpath, self.model.state_dict())


def run(args: list[str] | None = None) -> GRPOCLI:
    """Build the CLI and run its subcommand (``args`` instead of ``sys.argv``, for tests), in :func:`run_settings`."""
    with run_settings():
        return GRPOCLI(
            GRPOModule,
            PromptDataModule,
            trainer_defaults={"num_sanity_val_steps": 0, "log_every_n_steps": 1},
            save_config_callback=KeepingSaveConfig,
            args=args,
        )


def resume_command(args: list[str], checkpoint: Path) -> str:
    """The command line that resumes a stopped fit: the same arguments, then ``--ckpt_path`` (the last one wins)."""
    return shlex.join(["grpo-lightning", *args, "--ckpt_path", str(checkpoint)])


def main(args: list[str] | None = None) -> None:
    """The console script: :func:`run`, with input errors and stops on a signal reported in one message."""
    argv = sys.argv[1:] if args is None else args
    try:
        run(args)
    except Preempted as e:
        if e.rank == 0:
            print(f"grpo-lightning: {e}\nResume with:\n  {resume_command(argv, e.checkpoint)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except SIGTERMException:  # Lightning's own stop, outside training (during validate, say): not a success
        print("grpo-lightning: stopped by SIGTERM", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except INPUT_ERRORS as e:
        if os.environ.get(TRACEBACK_ENV, "0") not in ("", "0"):
            raise
        print(f"grpo-lightning: error: {e}\n(set {TRACEBACK_ENV}=1 to see the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
