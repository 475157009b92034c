"""Prompt batches for training and the evaluation set: the data module, its endless stream, the collation."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, IterableDataset

from grpo_lightning.builtin.answer_format import build_prompt
from grpo_lightning.core.imports import import_object
from grpo_lightning.train.data.records import DEFAULT_ANSWER_EXTRACTOR, read_split

DEFAULT_ANSWER_MATCH = "grpo_lightning.builtin.gsm8k.is_correct"


def collate(records: list[dict]) -> dict[str, list[str]]:
    """A list of records → a dict of lists (``prompt``, ``expected``, ...); a field a row lacks is ``None``."""
    return {key: [r.get(key) for r in records] for key in records[0]}


class PromptStream(IterableDataset):
    """An endless stream of prompt batches: epoch e visits the records in a permutation seeded by seed + e.

    Batch k of the stream is a pure function of (seed, k), so a resumed run can start at the batch where
    the stopped one ended (``start``); with several processes, process r takes batches r, r + W, ...
    """

    def __init__(self, records: list[dict], batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1):
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.start, self.rank, self.world = start, rank, world

    def _indices(self) -> Iterator[int]:
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(len(self.records), generator=generator).tolist()

    def __iter__(self) -> Iterator[dict[str, list[str]]]:
        indices = self._indices()
        position = 0  # how many indices of the endless stream were consumed so far
        for chunk in itertools.count(self.start * self.world + self.rank, self.world):
            begin = chunk * self.batch_size
            batch_ids = list(itertools.islice(indices, begin - position, begin - position + self.batch_size))
            position = begin + self.batch_size
            yield collate([self.records[i] for i in batch_ids])


class PromptDataModule(L.LightningDataModule):
    """Training prompts in batches of ``batch_size`` and an evaluation set, from GSM8K or a look-alike.

    Args:
        source: Hub dataset id (``openai/gsm8k``), a local jsonl/parquet file or directory, ``task:NAME``, or
            ``builtin:gsm8k-sample`` (64 train / 32 test GSM8K problems packaged with the project).
        config_name: Hub configuration (GSM8K's ``main``).
        train_split: Split that serves the training prompts.
        eval_split: Split of the evaluation set (held-out problems by default).
        eval_source: Where the evaluation set comes from, when not from ``source``.
        batch_size: Prompts per training step (each is sampled ``num_generations`` times).
        eval_size: Evaluate on the first N problems of the evaluation split; ``None`` for all.
        eval_batch_size: Prompts per generation call during evaluation.
        fit_eval_size: The evaluations during fit (``trainer.val_check_interval``) score only the first N
            problems of the evaluation set, the same ones each time, so the points compare; ``None`` for the
            whole set. Before and after training, and ``validate``, always score the whole set.
        seed: Seeds the order of the training prompts.
        chat_template: Wrap prompts in the tokenizer's chat template instead of the seed's plain text.
        tokenizer_name_or_path: Tokenizer whose chat template is used (linked to the model by the CLI).
        tokenizer_revision: The revision it is read at (linked to ``model.revision`` by the CLI).
        skip_invalid: Skip and count invalid rows instead of stopping at the first one.
        question_field: The field that holds the question.
        answer_field: The field that holds the answer (worked solution and final answer, for GSM8K).
        answer_extractor: Import path of a function from the answer text to the final answer, or ``None``
            when it has none; the default takes the text after ``####``.
        answer_match: Import path of the evaluation's match, ``f(completion, expected) -> bool``; the
            default is GSM8K's (the seed's: exact, else single number, else last number), which the
            arithmetic task's answers share.
    """

    def __init__(
        self,
        source: str = "openai/gsm8k",
        config_name: str = "main",
        train_split: str = "train",
        eval_split: str = "test",
        eval_source: str | None = None,
        batch_size: int = 4,
        eval_size: int | None = None,
        eval_batch_size: int = 16,
        fit_eval_size: int | None = None,
        seed: int = 42,
        chat_template: bool = False,
        tokenizer_name_or_path: str | None = None,
        tokenizer_revision: str | None = None,
        skip_invalid: bool = False,
        question_field: str = "question",
        answer_field: str = "answer",
        answer_extractor: str = DEFAULT_ANSWER_EXTRACTOR,
        answer_match: str = DEFAULT_ANSWER_MATCH,
    ):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise ValueError(f"data.{name} must be at least 1, got {value}")
        if eval_size is not None and eval_size < 1:
            raise ValueError(f"data.eval_size must be at least 1 or null (all), got {eval_size}")
        if fit_eval_size is not None and fit_eval_size < 1:
            raise ValueError(f"data.fit_eval_size must be at least 1 or null (the whole evaluation set), got {fit_eval_size}")
        if chat_template and not tokenizer_name_or_path:
            raise ValueError("data.chat_template needs data.tokenizer_name_or_path")
        self.save_hyperparameters()
        self.answer_match = import_object(answer_match)  # imported now: a wrong path fails before any model loads
        self.train_records: list[dict] | None = None
        self.eval_records: list[dict] | None = None

    def _with_prompts(self, records: list[dict]) -> list[dict]:
        tokenizer = None
        if self.hparams.chat_template:
            from transformers import AutoTokenizer

            from grpo_lightning.builtin.tiny import resolve_model_path

            tokenizer = AutoTokenizer.from_pretrained(  # (builtin:NAME → the packaged model's directory)
                resolve_model_path(self.hparams.tokenizer_name_or_path), revision=self.hparams.tokenizer_revision
            )
        return [{**r, "prompt": build_prompt(r["question"], tokenizer)} for r in records]

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        if stage in (None, "fit") and self.train_records is None:
            self.train_records = self._with_prompts(read_split(hp, hp.train_split))
        if self.eval_records is None:
            records = read_split(hp, hp.eval_split, hp.eval_source)
            self.eval_records = self._with_prompts(records[: hp.eval_size])

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        # On resume the loops are restored before this is called: continue after the last step whose
        # training_step finished ("processed"; "completed" lags by one when saved in on_train_batch_end).
        start = trainer.fit_loop.epoch_loop.batch_progress.total.processed if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        stream = PromptStream(self.train_records, self.hparams.batch_size, self.hparams.seed, start, rank, world)
        # A private generator: creating the loader's iterator would otherwise draw from the global one,
        # shifting the sampling randomness of a resumed run by one draw.
        return DataLoader(stream, batch_size=None, generator=torch.Generator().manual_seed(self.hparams.seed))

    def val_dataloader(self) -> DataLoader:
        """Lightning's validation loop: during fit the first ``fit_eval_size`` problems, else the whole set."""
        fitting = self.trainer is not None and self.trainer.state.fn == "fit"
        return self.eval_dataloader(self.hparams.fit_eval_size if fitting else None)

    def eval_dataloader(self, size: int | None = None) -> DataLoader:
        """The first ``size`` problems of the evaluation set (``None``: all), this process's share of them."""
        records, sampler = self.eval_records[:size], None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Process r evaluates examples r, r + W, ...: each exactly once. (Lightning's default for evaluation,
            # a DistributedSampler, pads the last round with repeats, which an accuracy would count twice.)
            sampler = UnrepeatedDistributedSampler(
                records, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        # a private generator: creating the loader's iterator would otherwise draw from the global one, so an
        # evaluation during fit would shift the sampling randomness of every step after it
        return DataLoader(records, batch_size=self.hparams.eval_batch_size, collate_fn=collate, sampler=sampler,
                          generator=torch.Generator().manual_seed(self.hparams.seed))
