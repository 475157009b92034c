"""Accuracy of the policy on the evaluation set: one :class:`EvaluationRun` step scores every batch.

Two loops run that step. :func:`evaluate` is the accuracy callback's, before and after training (in
``on_train_start`` / ``on_train_end``, where Lightning runs no validation loop), so it iterates the data
module's whole evaluation set itself. Lightning's validation loop, in ``validate`` and every
``trainer.val_check_interval`` training batches during ``fit``, calls the hooks of :class:`EvaluationMixin`,
which take the same step, so that its progress bar, checkpoints and early stopping see ``val/accuracy``.
With several processes each one scores its own examples (the loader's sampler splits them without repeats),
every process gathers all rows (so all compute the same accuracy), and process 0 writes them, in order.
Evaluation is greedy (``do_sample: False``) by default; ``model.evaluation.num_samples`` k > 1 samples k
completions a problem at ``model.evaluation.temperature`` and adds pass@k and maj@k.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from grpo_lightning.builtin.answer_format import extract_model_answer
from grpo_lightning.builtin.gsm8k import is_correct
from grpo_lightning.hf.sharding import is_sharded
from grpo_lightning.train.distributed import gather_objects, interleave


class EvaluationRun:
    """One evaluation on this process: the rows it scored; :meth:`finish` gathers every process's."""

    def __init__(self, device: Any):
        self.device = device
        self.rows: list[dict] = []

    def step(self, module: Any, batch: dict[str, list[str]]) -> list[dict]:
        """Score one batch of prompts with ``module.evaluate_batch`` and keep its rows."""
        rows = module.evaluate_batch(batch)
        self.rows += rows
        return rows

    def finish(self, strategy: Any, step: int) -> Scored:
        """Every process's rows, in the evaluation set's order, on every process (a collective: all must call it)."""
        return Scored(step, interleave(gather_objects(strategy, self.rows)))


@dataclass
class Scored:
    """The rows of one whole evaluation (every process's, in order) and the optimizer step it scored."""

    step: int  # ``global_step`` when it ran: the optimizer steps the scored weights had taken
    rows: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return accuracy_of(self.rows)

    def first(self, n: int | None) -> Scored:
        """The evaluation of the first ``n`` problems (``None``: all): the fixed subset evaluated during fit."""
        return Scored(self.step, self.rows[:n])


def accuracy_of(rows: list[dict]) -> float:
    """The mean of the rows' ``correct`` (a bool, or a sampled row's fraction of right samples); NaN for no rows."""
    return sum(float(r["correct"]) for r in rows) / len(rows) if rows else math.nan


def sampled_rows(prompts: list[str], expected: list[str], completions: list[str], k: int,
                 match: Callable[[str, str | None], bool] = is_correct) -> list[dict]:
    """One row per problem from its k samples (adjacent in ``completions``), judged by the task's ``match``
    (GSM8K's by default): ``correct`` is the fraction of right samples, ``pass_at_k`` whether any is right,
    ``majority`` the most frequent extracted answer (the first seen among equals) and ``majority_correct``
    whether a sample giving it is right."""
    rows = []
    for i, (prompt, answer) in enumerate(zip(prompts, expected)):
        samples = completions[i * k:(i + 1) * k]
        extracted = [extract_model_answer(c) for c in samples]
        right = [match(c, answer) for c in samples]
        majority = Counter(extracted).most_common(1)[0][0]
        rows.append({
            "prompt": prompt, "expected": answer, "extracted": extracted, "completions": samples,
            "correct": sum(right) / k, "pass_at_k": any(right), "majority": majority,
            "majority_correct": right[extracted.index(majority)],
        })
    return rows


def sampled_metrics(rows: list[dict], k: int, prefix: str, suffix: str = "") -> dict[str, float]:
    """pass@k and maj@k of sampled rows as ``{prefix}pass@k{suffix}`` and ``{prefix}maj@k{suffix}``; nothing
    for greedy rows."""
    if not rows or "pass_at_k" not in rows[0]:
        return {}
    return {f"{prefix}pass@{k}{suffix}": sum(r["pass_at_k"] for r in rows) / len(rows),
            f"{prefix}maj@{k}{suffix}": sum(r["majority_correct"] for r in rows) / len(rows)}


def evaluate(trainer: Any, module: Any, path: Path, description: str) -> Scored:
    """``module`` on the data module's whole evaluation set, every example written to ``path`` (or the first free
    name beside it). Every process must call it (the rows are gathered)."""
    datamodule = trainer.datamodule
    datamodule.setup("validate")
    evaluation, loader = EvaluationRun(module.device), datamodule.eval_dataloader()
    most, done, batch = most_batches(module, len(loader)), 0, None
    for batch in tqdm(loader, desc=description, disable=not trainer.is_global_zero):
        # under the trainer's precision (autocast for bf16-mixed), as Lightning runs validate and the training samples
        with trainer.precision_plugin.val_step_context():
            evaluation.step(module, batch)
        done += 1
    run_missing_batches(module, most - done, batch)
    scored = evaluation.finish(trainer.strategy, getattr(trainer, "global_step", 0))
    if trainer.is_global_zero:
        write_rows(scored.rows, path)
    return scored


def log_to_loggers(trainer: Any, metrics: dict[str, float], step: int) -> None:
    """``metrics`` to every logger at ``step`` (``global_step``: the x-axis of every evaluation point)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
        logger.save()


class EvaluationMixin:
    """Evaluation for a LightningModule with ``policy``, ``tokenizer``, a rollout ``engine`` and the ``evaluation``,
    ``sampling`` and ``fast`` options: the greedy completions of a batch, and the validation hooks.

    The hooks serve ``validate`` and the evaluations during ``fit`` (``trainer.val_check_interval``). Each logs
    ``val/accuracy`` (for checkpoints, early stopping and the progress bar; to the loggers at ``global_step``)
    and writes its rows: ``validate_examples.jsonl``, or ``evaluations/step_<global_step>.jsonl`` during fit.
    ``last_evaluation`` keeps the last one, for the accuracy callback's "after" when both would score the same.
    """

    def evaluate_batch(self, batch: dict[str, list[str]]) -> list[dict]:
        """Greedy completions of a batch of prompts, their extracted answers and the task's match (:func:`task_match`);
        with ``num_samples`` k > 1, k sampled completions of each (:func:`sampled_rows`)."""
        e, k, match = self.evaluation, self.evaluation.num_samples, task_match(self)
        decoding = {"do_sample": False} if k == 1 else {"do_sample": True}
        rollout = self.engine.generate(
            self.passes, self.tokenizer, batch["prompt"], k, e.max_new_tokens or self.sampling.max_new_tokens,
            temperature=e.temperature, generation_kwargs={**decoding, **(e.generation_kwargs or {})},
            use_model_generation_config=self.sampling.use_model_generation_config, fast=self.fast,
        )
        if k > 1:
            return sampled_rows(batch["prompt"], batch["expected"], rollout.completions, k, match)
        return [
            {"prompt": p, "expected": e, "extracted": extract_model_answer(c), "completion": c, "correct": match(c, e)}
            for p, e, c in zip(batch["prompt"], batch["expected"], rollout.completions)
        ]

    def evaluation_state(self) -> dict[str, float] | None:
        """The last evaluation during fit, for the checkpoint: its step and accuracy (``None`` before any)."""
        last = getattr(self, "last_evaluation", None)
        return None if last is None else {"step": last.step, "accuracy": last.accuracy}

    def load_evaluation_state(self, state: dict[str, float] | None) -> None:
        # Lightning 2.4 evaluates again when it resumes from a checkpoint written at the end of an evaluation
        # (2.5 and later do not): that repeat scores the same weights, so it is skipped and the saved value stands
        self.resumed_evaluation = state

    def _repeated_accuracy(self) -> float | None:
        """The saved accuracy when this evaluation repeats the one the run resumed after; else ``None``."""
        state, self.resumed_evaluation = getattr(self, "resumed_evaluation", None), None  # the first one only
        repeats = state is not None and self.trainer.state.fn == "fit" and state["step"] == self.trainer.global_step
        return state["accuracy"] if repeats else None

    def on_validation_epoch_start(self) -> None:
        self.val_repeat = self._repeated_accuracy()
        self.val_evaluation = EvaluationRun(self.device)
        self.val_missing = 0  # batches still to run so that this process runs as many as any (in lock-step only)
        if in_lock_step(self):
            loaders = self.trainer.val_dataloaders
            self.val_missing = most_batches(self, len(loaders[0] if isinstance(loaders, list) else loaders))

    def validation_step(self, batch: dict[str, list[str]], batch_idx: int) -> None:
        if self.val_repeat is not None:
            return
        self.val_evaluation.step(self, batch)
        self.val_missing, self.val_last = self.val_missing - 1, batch

    def on_validation_epoch_end(self) -> None:
        trainer = self.trainer
        if self.val_repeat is not None:  # (load_evaluation_state) the checkpoint and early stopping get the saved value
            self.log("val/accuracy", torch.tensor(self.val_repeat), prog_bar=True, logger=False, sync_dist=True)
            return
        run_missing_batches(self, self.val_missing, getattr(self, "val_last", None))
        scored = self.val_evaluation.finish(trainer.strategy, trainer.global_step)
        # the same value on every process (the rows are everyone's): the mean over processes is that value
        self.log("val/accuracy", torch.tensor(scored.accuracy), prog_bar=True, logger=False, sync_dist=True)
        extra = sampled_metrics(scored.rows, self.evaluation.num_samples, "val/")
        log_to_loggers(trainer, {"val/accuracy": scored.accuracy, **extra}, scored.step)
        self.last_evaluation = scored
        log_dir = trainer.log_dir
        if log_dir is not None and trainer.is_global_zero:
            fitting = trainer.state.fn == "fit"
            name = f"evaluations/step_{scored.step:07d}.jsonl" if fitting else "validate_examples.jsonl"
            write_rows(scored.rows, Path(log_dir) / name)


def task_match(module: Any) -> Callable[[str, str | None], bool]:
    """The data module's ``answer_match`` (``data.answer_match``); GSM8K's for a module run without one."""
    datamodule = getattr(module._trainer, "datamodule", None) if module._trainer is not None else None
    return getattr(datamodule, "answer_match", is_correct)


def in_lock_step(module: Any) -> bool:
    """Whether every process must run as many evaluation batches: a sharded policy, or a collective engine."""
    several = torch.distributed.is_available() and torch.distributed.is_initialized()
    collective = several and getattr(getattr(module, "engine", None), "collective", False)
    return is_sharded(getattr(module, "passes", None)) or collective


def most_batches(module: Any, mine: int) -> int:
    """The most evaluation batches any process has: a collective when the policy is sharded or the engine's
    calls are collectives, else ``mine``.

    Under FSDP2 each pass gathers weights from every process, and a server engine's call ends in a collective, so
    all must run the same number of passes; the examples split unevenly (no repeats), and a process with fewer
    batches would leave the others waiting.
    """
    if not in_lock_step(module):
        return mine
    most = torch.tensor(mine, device=module.device)
    torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
    return int(most)


def run_missing_batches(module: Any, missing: int, last_batch: dict[str, list[str]] | None) -> None:
    """Run ``last_batch`` again ``missing`` times, results dropped: this process's share of the others' passes."""
    for _ in range(missing):
        module.evaluate_batch(last_batch or {"prompt": [""], "expected": [""]})


def free_path(path: Path) -> Path:
    """``path``, or the first of ``name-2.ext``, ``name-3.ext``, ... that does not exist: nothing is overwritten
    (a resumed run in the same log directory, a requeued job, a second ``validate``)."""
    n, free = 1, path
    while free.exists():
        n += 1
        free = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return free


def write_rows(rows: list[dict], path: Path) -> Path:
    """Rows as JSON lines at ``path`` or the first free name beside it (:func:`free_path`); where they went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path = free_path(path)
    with path.open("x", encoding="utf-8") as f:  # "x": a file that appeared meanwhile is still not overwritten
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
