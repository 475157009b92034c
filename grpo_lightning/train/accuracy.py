"""Accuracy before and after training, on the curve of the evaluations during it, and what changed between them.

The evaluations during fit (``trainer.val_check_interval``, :class:`~grpo_lightning.train.evaluation.EvaluationMixin`)
log ``val/accuracy`` at ``global_step``; this callback adds the points before (step 0) and after (the last step),
so one chart shows the whole run. Before and after score the whole evaluation set; when the evaluations during
fit score a subset (``data.fit_eval_size``), their ``val/accuracy`` points are the accuracy of the same first
problems, taken from the whole set's rows (greedy: the same completions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from grpo_lightning.train.evaluation import Scored, evaluate, log_to_loggers, sampled_metrics, write_rows


def _log_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


def fit_eval_size(trainer: L.Trainer) -> int | None:
    """How many first problems the evaluations during fit score (``data.fit_eval_size``); ``None``: all."""
    return getattr(trainer.datamodule, "hparams", {}).get("fit_eval_size")


def changes(before: list[dict], after: list[dict]) -> list[dict]:
    """The after-rows whose correctness differs from before's (same problems, same order), each with
    ``change`` (``wrong_to_right`` or ``right_to_wrong``) and the answer extracted before. (Sampled rows count
    as right when any of their samples is.)"""
    return [
        {"change": "wrong_to_right" if a["correct"] else "right_to_wrong", "before_extracted": b["extracted"], **a}
        for b, a in zip(before, after)
        if bool(b["correct"]) != bool(a["correct"])
    ]


class AccuracyCallback(L.Callback):
    """GSM8K accuracy of the policy on the whole evaluation set before training starts and after it ends.

    Logs ``eval/accuracy_before``, ``eval/accuracy_after`` and ``eval/improvement`` to every logger, and
    ``val/accuracy`` at steps 0 and the last (the curve of the evaluations during fit); prints them; writes each
    example (prompt, expected, extracted, completion, correct) to ``eval_before.jsonl`` / ``eval_after.jsonl``
    in the run's log directory. At the end it counts the problems that went from wrong to right and from right
    to wrong (``eval/wrong_to_right``, ``eval/right_to_wrong``, their rows in ``eval_changes.jsonl``).

    When the last evaluation during fit ran at the last step on the whole set, it is the "after" one: the
    same weights are not scored twice. A resumed run keeps the accuracy (and rows' correctness) measured before
    its first start instead of measuring the half-trained model again.

    Args:
        before: Measure accuracy before training.
        after: Measure accuracy after training.
    """

    def __init__(self, before: bool = True, after: bool = True):
        self.before, self.after = before, after
        self.accuracy_before: float | None = None
        self.accuracy_after: float | None = None
        self.before_rows: list[dict] | None = None  # each problem's correctness and extracted answer, before
        self.changed: list[dict] = []

    def state_dict(self) -> dict[str, Any]:
        return {"accuracy_before": self.accuracy_before, "before_rows": self.before_rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accuracy_before = state_dict.get("accuracy_before")
        self.before_rows = state_dict.get("before_rows")

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if not self.before or self.accuracy_before is not None:
            return
        scored = evaluate(trainer, module, _log_dir(trainer) / "eval_before.jsonl", "Accuracy before training")
        self.accuracy_before = scored.accuracy
        self.before_rows = [{"correct": r["correct"], "extracted": r["extracted"]} for r in scored.rows]
        curve = scored.first(fit_eval_size(trainer))
        k = module.evaluation.num_samples
        metrics = {"eval/accuracy_before": self.accuracy_before, "val/accuracy": curve.accuracy,
                   **sampled_metrics(scored.rows, k, "eval/", "_before"), **sampled_metrics(curve.rows, k, "val/")}
        log_to_loggers(trainer, metrics, scored.step)
        rank_zero_info(f"Accuracy on the evaluation set before training: {self.accuracy_before:.2%}")

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if not self.after:
            return
        path, last = _log_dir(trainer) / "eval_after.jsonl", getattr(module, "last_evaluation", None)
        whole = len(trainer.datamodule.eval_records)
        if last is not None and last.step == trainer.global_step and len(last.rows) == whole:
            scored = last  # the last evaluation during fit scored these weights on the whole set: not run again
            if trainer.is_global_zero:
                write_rows(scored.rows, path)
        else:
            scored = evaluate(trainer, module, path, "Accuracy after training")
        self.accuracy_after = scored.accuracy
        k = module.evaluation.num_samples
        metrics = {"eval/accuracy_after": self.accuracy_after, **sampled_metrics(scored.rows, k, "eval/", "_after")}
        if last is None or last.step != scored.step:  # else that point is on the curve already
            curve = scored.first(fit_eval_size(trainer))
            metrics.update({"val/accuracy": curve.accuracy, **sampled_metrics(curve.rows, k, "val/")})
        message = f"Accuracy on the evaluation set after training: {self.accuracy_after:.2%}"
        if self.accuracy_before is not None:
            metrics["eval/improvement"] = self.accuracy_after - self.accuracy_before
            message += f" (before {self.accuracy_before:.2%}, change {metrics['eval/improvement']:+.2%})"
        message += self._changes(trainer, scored, metrics)
        log_to_loggers(trainer, metrics, scored.step)
        rank_zero_info(message)

    def _changes(self, trainer: L.Trainer, after: Scored, metrics: dict[str, float]) -> str:
        """Count and write the problems whose answer turned right or wrong; the console's part of it."""
        if self.before_rows is None:
            return ""
        if len(self.before_rows) != len(after.rows):
            rank_zero_warn(
                f"the evaluation set had {len(self.before_rows)} problems before training and {len(after.rows)} "
                "after (data.eval_size changed on resume?): what changed is not reported"
            )
            return ""
        self.changed = changes(self.before_rows, after.rows)
        up = sum(r["change"] == "wrong_to_right" for r in self.changed)
        metrics["eval/wrong_to_right"], metrics["eval/right_to_wrong"] = float(up), float(len(self.changed) - up)
        path = _log_dir(trainer) / "eval_changes.jsonl"  # (on every process: the log directory is broadcast)
        if trainer.is_global_zero:
            write_rows(self.changed, path)
        return f"; {up} problems went from wrong to right, {len(self.changed) - up} from right to wrong"
