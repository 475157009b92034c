"""Greedy accuracy of the policy on the evaluation set: one :class:`EvaluationRun` step scores every batch.

Two loops run that step. :func:`evaluate` is the accuracy callback's, before and after training: it runs
inside ``fit``, where Lightning cannot start a validation loop of its own, so it iterates the data
module's evaluation loader itself. The ``validate`` subcommand runs Lightning's validation loop, whose
hooks (:class:`EvaluationMixin`) take the same step, so that its progress bar, callbacks and ``val/accuracy``
logging stay Lightning's. With several processes each one scores its own examples (the loader's sampler
splits them without repeats), the counts are summed over processes, and process 0 writes them all, in order.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torchmetrics.classification import BinaryAccuracy
from tqdm.auto import tqdm

from grpo_lightning.builtin.answer_format import extract_model_answer
from grpo_lightning.builtin.gsm8k import is_correct
from grpo_lightning.hf.sharding import is_sharded
from grpo_lightning.train.distributed import gather_objects, interleave


class EvaluationRun:
    """One evaluation on this process: the rows it scored and their accuracy.

    ``accuracy`` is a ``BinaryAccuracy``: computing it sums the counts of every process, the accuracy of
    every example.
    """

    def __init__(self, device: Any):
        self.accuracy = BinaryAccuracy().to(device)
        self.rows: list[dict] = []

    def step(self, module: Any, batch: dict[str, list[str]]) -> list[dict]:
        """Score one batch of prompts with ``module.evaluate_batch``; keep its rows and count them."""
        rows = module.evaluate_batch(batch)
        self.rows += rows
        self.accuracy.update(*correct_counts(rows, module.device))
        return rows

    def write(self, strategy: Any, path: Path, is_global_zero: bool) -> None:
        """Every process's rows to ``path`` (see :func:`write_examples`); every process must call it."""
        write_examples(strategy, self.rows, path, is_global_zero)


def evaluate(trainer: Any, module: Any, path: Path, description: str) -> float:
    """The accuracy of ``module`` on the data module's evaluation set, every example written to ``path``.

    Every process must call it (the counts are reduced and the rows gathered).
    """
    datamodule = trainer.datamodule
    datamodule.setup("validate")
    evaluation, loader = EvaluationRun(module.device), datamodule.val_dataloader()
    most, done, batch = most_batches(module, len(loader)), 0, None
    for batch in tqdm(loader, desc=description, disable=not trainer.is_global_zero):
        # under the trainer's precision (autocast for bf16-mixed), as Lightning runs validate and the training samples
        with trainer.precision_plugin.val_step_context():
            evaluation.step(module, batch)
        done += 1
    run_missing_batches(module, most - done, batch)
    accuracy = evaluation.accuracy.compute().item()
    evaluation.write(trainer.strategy, path, trainer.is_global_zero)
    return accuracy


class EvaluationMixin:
    """Evaluation for a LightningModule with ``policy``, ``tokenizer``, a rollout ``engine`` and the ``evaluation``,
    ``sampling`` and ``fast`` options: the greedy completions of a batch, and the ``validate`` hooks."""

    def evaluate_batch(self, batch: dict[str, list[str]]) -> list[dict]:
        """Greedy completions of a batch of prompts, their extracted answers and the task's match (:func:`task_match`)."""
        e, match = self.evaluation, task_match(self)
        rollout = self.engine.generate(
            self.passes, self.tokenizer, batch["prompt"], 1, e.max_new_tokens or self.sampling.max_new_tokens,
            generation_kwargs={"do_sample": False, **(e.generation_kwargs or {})},
            use_model_generation_config=self.sampling.use_model_generation_config, fast=self.fast,
        )
        return [
            {"prompt": p, "expected": e, "extracted": extract_model_answer(c), "completion": c, "correct": match(c, e)}
            for p, e, c in zip(batch["prompt"], batch["expected"], rollout.completions)
        ]

    def on_validation_epoch_start(self) -> None:
        self.val_evaluation = EvaluationRun(self.device)
        self.val_missing = 0  # batches still to run so that this process runs as many as any (sharded only)
        if is_sharded(getattr(self, "passes", None)):
            loaders = self.trainer.val_dataloaders
            self.val_missing = most_batches(self, len(loaders[0] if isinstance(loaders, list) else loaders))
        # a metric that Lightning logs must be an attribute of the module; it computes it at the epoch's end
        self.val_accuracy = self.val_evaluation.accuracy

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        rows = self.val_evaluation.step(self, batch)
        self.val_missing, self.val_last = self.val_missing - 1, batch
        self.log("val/accuracy", self.val_accuracy, prog_bar=True, batch_size=len(rows))

    def on_validation_epoch_end(self) -> None:
        run_missing_batches(self, self.val_missing, getattr(self, "val_last", None))
        log_dir = self.trainer.log_dir
        if log_dir is not None:
            self.val_evaluation.write(self.trainer.strategy, Path(log_dir) / "validate_examples.jsonl",
                                      self.trainer.is_global_zero)


def task_match(module: Any) -> Callable[[str, str | None], bool]:
    """The data module's ``answer_match`` (``data.answer_match``); GSM8K's for a module run without one."""
    datamodule = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
    return getattr(datamodule, "answer_match", is_correct)


def most_batches(module: Any, mine: int) -> int:
    """The most evaluation batches any process has: a collective when the policy is sharded, else ``mine``.

    Under FSDP2 each pass gathers weights from every process, so all must run the same number of passes; the
    examples split unevenly (no repeats), and a process with fewer batches would leave the others waiting.
    """
    if not is_sharded(getattr(module, "passes", None)):
        return mine
    most = torch.tensor(mine, device=module.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most)


def run_missing_batches(module: Any, missing: int, last_batch: dict[str, list[str]] | None) -> None:
    """Run ``last_batch`` again ``missing`` times, results dropped: this process's share of the others' passes."""
    for _ in range(missing):
        module.evaluate_batch(last_batch or {"prompt": [""], "expected": [""]})


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
