"""Greedy accuracy of the policy on evaluation prompts: the ``validate`` hooks of :class:`GRPOModule`.

The accuracy callback calls :meth:`EvaluationMixin.evaluate_batch` before and after training; the
``validate`` subcommand runs the hooks below. With several processes each one evaluates its own examples
(the loader's sampler splits them without repeats) and process 0 writes them all, in order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from grpo_lightning.builtin.answer_format import extract_model_answer
from grpo_lightning.builtin.gsm8k import is_correct
from grpo_lightning.train.distributed import gather_objects, interleave


class EvaluationMixin:
    """Evaluation for a LightningModule with ``policy``, ``tokenizer``, a rollout ``engine`` and the ``evaluation``,
    ``sampling`` and ``fast`` options."""

    def evaluate_batch(self, batch: dict[str, list[str]]) -> list[dict]:
        """Greedy completions of a batch of prompts, their extracted answers and the seed's three-way match."""
        e = self.evaluation
        rollout = self.engine.generate(
            self.passes, self.tokenizer, batch["prompt"], 1, e.max_new_tokens or self.sampling.max_new_tokens,
            generation_kwargs={"do_sample": False, **(e.generation_kwargs or {})},
            use_model_generation_config=self.sampling.use_model_generation_config, fast=self.fast,
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
        self.val_accuracy.update(*correct_counts(rows, self.device))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=len(rows))

    def on_validation_epoch_end(self) -> None:
        log_dir = self.trainer.log_dir
        if log_dir is not None:
            write_examples(self.trainer.strategy, self.val_rows, Path(log_dir) / "validate_examples.jsonl",
                           self.trainer.is_global_zero)


def correct_counts(rows: list[dict], device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) of a batch's rows for a binary accuracy: each row's match against "correct"."""
    correct = torch.tensor([r["correct"] for r in rows], device=device)
    return correct, torch.ones_like(correct)


def write_examples(strategy: Any, rows: list[dict], path: Path, is_global_zero: bool) -> None:
    """Every process's rows in one JSON-lines file, in order, written by process 0; never over an earlier one.

    Each process evaluated its own examples (the loader's sampler splits them without repeats). Every process
    must call this (the rows are gathered).
    """
    rows = interleave(gather_objects(strategy, rows))
    if rows and is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("x", encoding="utf-8") as f:  # "x": never overwrite an earlier result
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
