"""Training data: where records come from, one file per kind of source, and how they become prompt batches.

``records.py`` picks the kind that reads a ``source`` string and checks every row: ``builtin.py`` (``builtin:NAME``,
data packaged with the project), ``task.py`` (``task:NAME``, generated), ``local.py`` (a jsonl/parquet file or a
directory of them), ``hub.py`` (any other name: a hub dataset id). ``datamodule.py`` turns the records into
batches of prompts: :class:`PromptDataModule`, :class:`PromptStream`, :func:`collate`.
"""

from grpo_lightning.builtin.answer_format import SYSTEM_PROMPT, build_prompt  # noqa: F401 (re-exported)
from grpo_lightning.train.data.builtin import BUILTIN_DATA, builtin_data_dir
from grpo_lightning.train.data.datamodule import PromptDataModule, PromptStream, collate
from grpo_lightning.train.data.local import SUFFIXES as LOCAL_SUFFIXES
from grpo_lightning.train.data.records import DEFAULT_ANSWER_EXTRACTOR, KINDS, kind_of, load_records, read_split

__all__ = [
    "BUILTIN_DATA", "DEFAULT_ANSWER_EXTRACTOR", "PromptDataModule", "KINDS", "LOCAL_SUFFIXES", "PromptStream",
    "SYSTEM_PROMPT", "build_prompt", "builtin_data_dir", "collate", "kind_of", "load_records", "read_split",
]
