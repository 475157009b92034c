"""Supervised format warm-up: teach a model the answer format before GRPO.

A model that never emits ``<answer>…</answer>`` earns no correctness reward, so every GRPO group has equal
rewards and zero advantage. The seed's notebook therefore first fine-tunes on worked answers; this module
does the same on any GSM8K-form data: the dataset's reasoning lines become ``<reasoning>``, the text after
``####`` becomes ``<answer>`` (:func:`grpo_lightning.builtin.arithmetic.completion_text`), and the loss is the
cross-entropy of the completion tokens and the EOS that ends them, never of the prompt.

    python -m grpo_lightning.train.warmup fit --config configs/warmup-tiny.yaml

The trained weights and tokenizer are written with ``save_pretrained`` to ``model.save_dir`` when
training ends, ready for ``model.model_name_or_path`` of a GRPO config.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from grpo_lightning.builtin.answer_format import build_prompt
from grpo_lightning.builtin.arithmetic import completion_text
from grpo_lightning.builtin.tiny import resolve_model_path
from grpo_lightning.hf.models import load_model_and_tokenizer, set_checkpointing
from grpo_lightning.train.cli import ThreadsCLI
from grpo_lightning.train.data import read_split

IGNORE = -100  # label value that cross-entropy skips


def tokenize_example(tokenizer, question: str, answer: str, strip_calculator: bool = True) -> dict[str, list[int]]:
    """Prompt ids then completion ids + EOS; labels copy the completion and mask the prompt with -100."""
    prompt = tokenizer(build_prompt(question), add_special_tokens=False)["input_ids"]
    completion = tokenizer(completion_text(answer, strip_calculator), add_special_tokens=False)["input_ids"]
    completion = completion + [tokenizer.eos_token_id]
    return {"input_ids": prompt + completion, "labels": [IGNORE] * len(prompt) + completion}


def pad_batch(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: input_ids, labels, attention_mask, each [B, T]."""
    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class SFTDataModule(L.LightningDataModule):
    """Worked answers as (prompt, completion) examples.

    Args:
        source: Hub dataset id, local jsonl/parquet file or directory, or ``task:NAME`` (as for GRPO).
        tokenizer_name_or_path: Tokenizer of the model being warmed up (linked to the model by the CLI).
        config_name: Hub configuration (GSM8K's ``main``).
        train_split: Split trained on.
        val_split: Split whose first ``val_size`` examples give the validation loss; ``None`` for none.
        val_size: Validation examples.
        batch_size: Examples per optimizer step.
        max_length: Examples longer than this many tokens are dropped (not cut: a cut answer teaches
            the model to stop mid-sentence).
        strip_calculator: Drop GSM8K's ``<<a*b=c>>`` calculator annotations from the reasoning.
    """

    def __init__(
        self,
        source: str = "openai/gsm8k",
        tokenizer_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct",
        config_name: str = "main",
        train_split: str = "train",
        val_split: str | None = "test",
        val_size: int = 200,
        batch_size: int = 8,
        max_length: int = 512,
        strip_calculator: bool = True,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.train_examples: list[dict] | None = None
        self.val_examples: list[dict] = []

    def _examples(self, tokenizer, split: str, limit: int | None = None) -> list[dict]:
        hp = self.hparams
        records = read_split(hp, split)[:limit]
        examples = [tokenize_example(tokenizer, r["question"], r["answer"], hp.strip_calculator) for r in records]
        return [e for e in examples if len(e["input_ids"]) <= hp.max_length]

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples is None:
            # once: a builtin:tiny-init name builds a fresh model directory on every resolution
            tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.hparams.tokenizer_name_or_path))
            self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            self.train_examples = self._examples(tokenizer, self.hparams.train_split)
            if self.hparams.val_split:
                self.val_examples = self._examples(tokenizer, self.hparams.val_split, self.hparams.val_size)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_examples,
            batch_size=self.hparams.batch_size,
            shuffle=True,
            collate_fn=lambda b: pad_batch(b, self.pad_id),
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_examples, batch_size=64, collate_fn=lambda b: pad_batch(b, self.pad_id))


class SFTWarmup(L.LightningModule):
    """Causal-LM fine-tuning on completions only, then ``save_pretrained`` to ``save_dir``.

    Args:
        model_name_or_path: Hub id, local directory, or ``builtin:<model>`` (see ``grpo_lightning.builtin.tiny``).
        save_dir: Where the warmed-up model and tokenizer are written when training ends.
        lr: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: Linear learning-rate warm-up, then cosine decay to 10% of ``lr`` at the last step.
        dtype: Weights' dtype (``float32``, ``bfloat16``).
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
        overwrite: Allow replacing a non-empty ``save_dir``; otherwise fit refuses to start.
    """

    def __init__(
        self,
        model_name_or_path: str = "Qwen/Qwen2.5-0.5B-Instruct",
        save_dir: str = "warmup-model",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 20,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        overwrite: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model, self.tokenizer = load_model_and_tokenizer(model_name_or_path, dtype)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps whatever mode it finds
        if gradient_checkpointing:
            set_checkpointing(self.model, True)

    def setup(self, stage: str) -> None:
        out = Path(self.hparams.save_dir)
        if stage == "fit" and out.is_dir() and any(out.iterdir()) and not self.hparams.overwrite:
            raise FileExistsError(f"save_dir {out} is not empty; choose another model.save_dir or set model.overwrite: true")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The model shifts labels by one position itself; -100 keeps prompt and padding out of the mean.
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.log("val/loss", self.model(**batch).loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, self.trainer.estimated_stepping_batches)

        def scale(step: int) -> float:
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total - hp.warmup_steps))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, scale)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            out = Path(self.hparams.save_dir)
            self.model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)


class WarmupCLI(ThreadsCLI):
    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")


def main(args: list[str] | None = None) -> None:
    WarmupCLI(SFTWarmup, SFTDataModule, args=args)


if __name__ == "__main__":
    main()
