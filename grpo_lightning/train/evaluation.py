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
from grpo_lightning.hf.sharding import is_sharded
from grpo_lightning.train.distributed import gather_objects, interleave


class EvaluationMixin:
    """Evaluation for a LightningModule with ``policy``, ``tokenizer``, a rollout ``engine`` and the generation
    hyperparameters."""

    def evaluate_batch(self, batch: dict[str, list[str]]) -> list[dict]:
        """Greedy completions of a batch of prompts, their extracted answers and the seed's three-way match."""
        hp = self.hparams
        rollout = self.engine.generate(
            self.passes, self.tokenizer, batch["prompt"], 1, hp.eval_max_new_tokens or hp.max_new_tokens,
            generation_kwargs={"do_sample": False, **(hp.eval_generation_kwargs or {})},
            use_model_generation_config=hp.use_model_generation_config,
        )
        return [
            {"prompt": p, "expected": e, "extracted": extract_model_answer(c), "completion": c, "correct": is_correct(c, e)}
            for p, e, c in zip(batch["prompt"], batch["expected"], rollout.completions)
        ]

    def most_batches(self, mine: int) -> int:
        """The most evaluation batches any process has (a collective when sharded; ``mine`` otherwise).

        Under FSDP2 each pass gathers weights from every process, so all must run the same number of passes:
        the examples split unevenly (no repeats), and a process with fewer batches would leave the others
        waiting. It runs its last batch again, results dropped (:meth:`run_missing_batches`).
        """
        if not is_sharded(self.passes):
            return mine
        most = torch.tensor(mine, device=self.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        return int(most)

    def run_missing_batches(self, done: int, most: int, last_batch: dict[str, list[str]] | None) -> None:
        for _ in range(most - done):
            self.evaluate_batch(last_batch or {"prompt": [""], "expected": [""]})

    def on_validation_epoch_start(self) -> None:
        from torchmetrics.classification import BinaryAccuracy

        self.val_accuracy = BinaryAccuracy().to(self.device)
        self.val_rows: list[dict] = []
        loaders = self.trainer.val_dataloaders
        mine = len(loaders[0] if isinstance(loaders, list) else loaders)
        self.val_batches: tuple[int, int, Any] = (0, self.most_batches(mine), None)  # batches run, to run, the last

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        self.val_batches = (self.val_batches[0] + 1, self.val_batches[1], batch)
        rows = self.evaluate_batch(batch)
        self.val_rows += rows
        self.val_accuracy.update(*correct_counts(rows, self.device))
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=len(rows))

    def on_validation_epoch_end(self) -> None:
        self.run_missing_batches(*self.val_batches)
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
