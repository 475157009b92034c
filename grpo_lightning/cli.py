"""The ``grpo-lightning`` command: LightningCLI with ``fit`` and ``validate`` (and ``test``/``predict`` unused).

``grpo-lightning fit --config configs/cpu-tiny.yaml`` trains; ``--ckpt_path last`` resumes a stopped run;
``grpo-lightning validate --config … --model.model_name_or_path DIR`` measures accuracy of a model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from grpo_lightning.callbacks import AccuracyCallback, GRPOProgressBar, HFExport
from grpo_lightning.data import GSM8KDataModule
from grpo_lightning.module import GRPOModule


# Two Lightning warnings that describe this design, not a mistake: the frozen reference sits in eval mode on
# purpose, and checkpoints hold the state after the step's updates, which is what resuming needs.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
warnings.filterwarnings("ignore", message=r".*ModelCheckpoint with manual optimization and every_n_train_steps")


class ThreadsCLI(LightningCLI):
    """LightningCLI with a top-level ``torch_threads`` option, applied before models are built."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--torch_threads", type=Optional[int], default=None,
            help="PyTorch intra-op CPU threads (torch.set_num_threads); tiny models sample fastest on 1",
        )

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
        # Always-on callbacks, configured as top-level sections of the YAML.
        parser.add_lightning_class_args(AccuracyCallback, "eval")
        parser.add_lightning_class_args(HFExport, "export")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.save_top_k": 0})
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with a progress bar that counts rollout steps unless the config brings its own or none."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            kwargs.setdefault("callbacks", [*callbacks, GRPOProgressBar()])
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        """Refuse to start a new run on top of another run's checkpoints (resume it, or pick another dirpath)."""
        checkpoint = self.trainer.checkpoint_callback
        dirpath = getattr(checkpoint, "dirpath", None)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        if dirpath and ckpt_path is None and Path(dirpath).is_dir() and any(Path(dirpath).glob("*.ckpt")):
            raise FileExistsError(
                f"checkpoint directory {dirpath} already holds checkpoints: resume with --ckpt_path last, "
                "or set checkpoint.dirpath to a new directory"
            )


def run(args: list[str] | None = None) -> GRPOCLI:
    """Build the CLI and run its subcommand (``args`` instead of ``sys.argv``, for tests)."""
    return GRPOCLI(
        GRPOModule,
        GSM8KDataModule,
        trainer_defaults={"num_sanity_val_steps": 0, "log_every_n_steps": 1},
        args=args,
    )


def main() -> None:
    run()


if __name__ == "__main__":
    main()
