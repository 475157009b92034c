"""The data module: the order of training prompts (epochs, resume, shards), sizes and the eval subset."""

import pytest

from grpo_lightning.train.data import PromptDataModule, PromptStream, collate


def _ids(batch):
    return [int(q) for q in batch["question"]]


RECORDS = [{"question": str(i), "answer": f"#### {i}", "expected": str(i), "prompt": str(i)} for i in range(5)]


def test_prompt_stream_epochs_resume_and_shards():
    stream = iter(PromptStream(RECORDS, batch_size=2, seed=3))
    batches = [_ids(next(stream)) for _ in range(5)]  # 10 indices = two full permutations of 5
    assert sorted(sum(batches, [])[:5]) == [0, 1, 2, 3, 4]  # epoch 0 visits each record once
    assert sorted(sum(batches, [])[5:]) == [0, 1, 2, 3, 4]  # and so does epoch 1
    resumed = iter(PromptStream(RECORDS, batch_size=2, seed=3, start=3))
    assert _ids(next(resumed)) == batches[3]  # a resumed stream continues where the run stopped
    rank1 = iter(PromptStream(RECORDS, batch_size=2, seed=3, rank=1, world=2))
    assert [_ids(next(rank1)), _ids(next(rank1))] == [batches[1], batches[3]]  # process 1 of 2: odd batches


def test_datamodule_sizes_and_eval_subset(gsm8k_dir):
    with pytest.raises(ValueError, match="data.batch_size must be at least 1"):
        PromptDataModule(source=str(gsm8k_dir), batch_size=0)
    dm = PromptDataModule(source=str(gsm8k_dir), batch_size=3, eval_size=5)
    dm.setup("fit")
    assert len(dm.train_records) == 64 and len(dm.eval_records) == 5
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 3 and batch["prompt"][0].startswith("Respond in the following format")


def test_collate_gives_lists_with_none_where_a_row_lacks_a_field():
    assert collate([{"prompt": "a", "level": "1"}, {"prompt": "b"}]) == {"prompt": ["a", "b"], "level": ["1", None]}
