"""Greedy accuracy of the policy on evaluation prompts: the ``validate`` hooks of :class:`GRPOModule`.

The accuracy callback calls :meth:`EvaluationMixin.evaluate_batch` before and after training; the
``validate`` subcommand runs the hooks below. With several processes each one evaluates its own examples
(the loader's sampler splits them without repeats) and process 0 writes them all, in order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from grpo_lightning.distributed import gather_objects, interleave
from grpo_lightning.rewards import extract_model_answer, is_correct


class EvaluationMixin:
    """Evaluation for a LightningModule with ``policy``, ``tokenizer``, a rollout ``engine`` and the generation
    hyperparameters."""

    def evaluate_batch(self, batch: dict[str, list[str]]) -> list[dict]:
        """Greedy completions of a batch of prompts, their extracted answers and the seed's three-way match."""
        hp = self.hparams
        rollout = self.engine.generate(
            self.policy, self.tokenizer, batch["prompt"], 1, hp.eval_max_new_tokens or hp.max_new_tokens,
            generation_kwargs={"do_sample": False, **(hp.eval_generation_kwargs or {})},
            use_model_generation_config=hp.use_model_generation_config,
        )
        return [
            {"prompt": p, "expected": e, "extracted": extract_model_answer(c), "completion": c, "correct": is_correct(c, e)}
            for p, e, c in zip(batch["prompt"], batch["expected"], rollout.completions)
        ]

    def on_validation_epoch_start(self) -> None:
        from torchmetrics.classification import BinaryAccuracy

        self.val_accuracy = BinaryAccuracy().to(self.device)
        self.val_rows: list[dict] = []

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        rows = self.evaluate_batch(batch)
        self.val_rows += rows
        correct = torch.tensor([r["correct"] for r in rows], device=self.device)
        self.val_accuracy.update(correct, torch.ones_like(correct))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=len(rows))

    def on_validation_epoch_end(self) -> None:
        from grpo_lightning.callbacks import write_jsonl

        # each process evaluated its own examples (the loader's sampler splits them without repeats)
        rows = interleave(gather_objects(self.trainer.strategy, self.val_rows))
        log_dir = self.trainer.log_dir
        if log_dir is not None and rows and self.trainer.is_global_zero:
            write_jsonl(Path(log_dir) / "validate_examples.jsonl", rows)


def samples_text(prompt: str, completions: list[str], rewards: list[float]) -> str:
    """A prompt and its first samples with their rewards, as Markdown for TensorBoard's text tab."""
    return "\n\n".join(
        f"**prompt**\n\n```\n{prompt}\n```\n\n**sample {i}, reward {rewards[i]:.2f}**\n\n```\n{completion}\n```"
        for i, completion in enumerate(completions)
    )
