"""Callbacks: export in Hugging Face format, the random states in checkpoints, sample text, a progress bar;
accuracy before and after training lives in :mod:`grpo_lightning.train.accuracy` (re-exported here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from grpo_lightning.core.random_state import rng_state
from grpo_lightning.hf.sharding import full_state_dict, is_sharded
from grpo_lightning.hf.lora import is_lora, save_lora
from grpo_lightning.train.accuracy import AccuracyCallback
from grpo_lightning.train.atomic import atomic_dir
from grpo_lightning.train.checkpoints import read_checkpoint
from grpo_lightning.train.distributed import gather_objects, restore_rng_states

__all__ = ["AccuracyCallback", "GRPOProgressBar", "HFExport", "RandomStates", "SampleText"]


def _log_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


class HFExport(L.Callback):
    """Save the policy and tokenizer with ``save_pretrained`` when fit ends.

    A LoRA policy is saved merged (weights W + (alpha / r)·B·A, a plain model that ``AutoModelForCausalLM``
    loads), with its adapters alone in ``adapter/`` inside the export directory (``PeftModel.from_pretrained``).
    Any checkpoint can be exported after the run: ``python -m grpo_lightning.train.export CKPT DIR``.

    Args:
        export_dir: Where to save; ``None`` for ``hf_model`` in the run's log directory.
        overwrite: Allow replacing a non-empty ``export_dir``; otherwise fit refuses to start.
        weights: ``last``: the weights at the end of fit; ``best``: the best checkpoint's (``checkpoint.monitor``,
            e.g. ``val/accuracy``), loaded into the policy first (the last weights when no best was saved).
    """

    def __init__(self, export_dir: str | None = None, overwrite: bool = False, weights: str = "last"):
        if weights not in ("last", "best"):
            raise ValueError(f"export.weights must be 'last' or 'best', got {weights!r}")
        self.export_dir, self.overwrite, self.weights = export_dir, overwrite, weights
        self.path: Path | None = None

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.weights == "best" and getattr(trainer.checkpoint_callback, "monitor", None) is None:
            raise ValueError("export.weights: best needs checkpoint.monitor (val/accuracy, with checkpoint.mode: max)")
        self.path = Path(self.export_dir) if self.export_dir else _log_dir(trainer) / "hf_model"
        self.check(self.path)

    def check(self, path: Path) -> None:
        """Refuse a non-empty export directory unless ``overwrite``, and a path that is a file."""
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"export directory {path} is a file; choose another export.export_dir")
        if path.exists() and any(path.iterdir()) and not self.overwrite:
            raise FileExistsError(
                f"export directory {path} is not empty; choose another export.export_dir "
                "or set export.overwrite: true"
            )

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if self.weights == "best":
            load_best(trainer, module)
        # sharded weights are gathered first, on every process (one full copy, on process 0)
        full = full_state_dict(module.policy) if is_sharded(module.passes) else None
        if trainer.is_global_zero:
            self.save(module, full)

    def save(self, module: Any, state_dict: dict | None) -> None:
        assert self.path is not None
        # written beside the target and renamed into place: a crash leaves the previous export or none
        with atomic_dir(self.path) as tmp:
            if is_lora(module.policy):
                save_lora(module.policy, module.tokenizer, tmp)
            else:
                module.policy.save_pretrained(tmp, state_dict=state_dict)
                module.tokenizer.save_pretrained(tmp)
        if is_lora(module.policy):
            rank_zero_info(f"Saved the merged model and tokenizer to {self.path}, the LoRA adapters to {self.path / 'adapter'}")
        else:
            rank_zero_info(f"Saved the fine-tuned model and tokenizer to {self.path}")


def load_best(trainer: L.Trainer, module: Any) -> None:
    """Load the best checkpoint's weights into ``module`` (every process); warn and keep the last when there is none."""
    best = getattr(trainer.checkpoint_callback, "best_model_path", "")
    if not best:
        rank_zero_warn("export.weights is best, but no best checkpoint was saved (no evaluation ran): exporting the last weights")
        return
    if is_sharded(module.passes):
        raise ValueError(f"export.weights: best cannot load sharded checkpoint {best}; export it after the run instead")
    module.load_state_dict(read_checkpoint(best)["state_dict"])
    rank_zero_info(f"Exporting the best checkpoint's weights: {best}")


class RandomStates(L.Callback):
    """Every process's random states in the checkpoint (``rng_states``), restored on resume.

    Sampling draws from the global generators: with their state a resumed run samples what the uninterrupted
    run would have. Every process samples its own prompts with its own state, so the checkpoint holds one
    state per process (every process runs the save hook; the saving one writes the file). ``GRPOModule``
    installs one (``configure_callbacks``), replacing any given to the trainer.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng_states"] = gather_objects(trainer.strategy, rng_state())

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        message = restore_rng_states(checkpoint.get("rng_states"), trainer.global_rank, trainer.world_size)
        if message:
            rank_zero_warn(message)


def samples_text(prompt: str, completions: list[str], rewards: list[float]) -> str:
    """A prompt and its first samples with their rewards, as Markdown for TensorBoard's text tab."""
    return "\n\n".join(
        f"**prompt**\n\n```\n{prompt}\n```\n\n**sample {i}, reward {rewards[i]:.2f}**\n\n```\n{completion}\n```"
        for i, completion in enumerate(completions)
    )


class SampleText(L.Callback):
    """A few completions of the step's first prompt, with their rewards, as text in TensorBoard.

    Args:
        every_n_steps: Log them every N rollout steps (training batches: ``GRPOModule.rollout_steps``, which a
            skipped optimizer step does not shift); 0 never.
    """

    def __init__(self, every_n_steps: int = 10):
        if every_n_steps < 0:
            raise ValueError(f"samples.every_n_steps must not be negative, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        samples = getattr(pl_module, "last_samples", None)
        experiment = getattr(trainer.logger, "experiment", None)
        if samples is None or not self.every_n_steps or not hasattr(experiment, "add_text"):
            return
        step, global_step, prompt, completions, rewards = samples  # (global_step: when the samples were drawn)
        if not step % self.every_n_steps:
            experiment.add_text("samples", samples_text(prompt, completions, rewards), global_step=global_step)


class GRPOProgressBar(TQDMProgressBar):
    """Counts rollout steps, not optimizer steps: ``max_steps`` holds μ optimizer steps per rollout step."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_steps > 0:
            module = trainer.lightning_module
            # one-step-off's first step updates nothing (none on a resume that holds a rollout in flight)
            first = int(bool(module.engine.max_staleness) and module.in_flight is None)
            return (trainer.max_steps - trainer.global_step) // module.optimization.mu + first
        return super().total_train_batches

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description("GRPO steps")
