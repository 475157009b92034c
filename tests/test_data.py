"""Data loading, prompts, errors that name the file and line, and the order of training prompts."""

import json

import pytest

from grpo_lightning.builtin.answer_format import SYSTEM_PROMPT, build_prompt

from grpo_lightning.train.data import GSM8KDataModule, PromptStream, load_records


def test_prompt_is_the_seeds():
    expected = (
        "Respond in the following format:\n\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
        "How many legs do 2 cats have?"
    )
    assert build_prompt("  How many legs do 2 cats have? \n") == expected
    assert SYSTEM_PROMPT.startswith("\nRespond") and SYSTEM_PROMPT.endswith("</answer>\n")


def test_packaged_gsm8k_sample_counts_and_answers():
    from conftest import GSM8K_DIR

    train = load_records("builtin:gsm8k-sample", "train")
    test = load_records(str(GSM8K_DIR / "test.jsonl"), "ignored")
    assert (len(train), len(test)) == (64, 32)
    assert train[0]["expected"] == "72"  # Natalia's clips: 48 + 24 = 72
    assert test[0]["expected"] == "18"  # Janet's ducks: (16 - 3 - 4) eggs × $2 = $18
    assert (GSM8K_DIR / "LICENSE").read_text().startswith("MIT License")
    with pytest.raises(ValueError, match="unknown built-in data set 'gsm8k-full'"):
        load_records("builtin:gsm8k-full", "train")


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"})


def test_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(FileNotFoundError, match="no 'train' file"):
        load_records(str(tmp_path), "train")
    bad_json = _write(tmp_path / "a.jsonl", [GOOD, "{not json"])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not a JSON object"):
        load_records(str(bad_json), "train")
    no_field = _write(tmp_path / "b.jsonl", [GOOD, GOOD, json.dumps({"question": "q"})])
    with pytest.raises(ValueError, match=r"b\.jsonl:3: missing text field 'answer'"):
        load_records(str(no_field), "train")
    no_hashes = _write(tmp_path / "c.jsonl", [json.dumps({"question": "q", "answer": "just 4"})])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: 'answer' has no final answer \(extract_dataset_answer found none\)"):
        load_records(str(no_hashes), "train")


def test_skip_invalid_counts(tmp_path):
    path = _write(tmp_path / "d.jsonl", [GOOD, json.dumps({"question": "q", "answer": "4"}), GOOD])
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert len(load_records(str(path), "train", skip_invalid=True)) == 2


def test_parquet_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([json.loads(GOOD)] * 3).to_parquet(str(tmp_path / "test.parquet"))
    records = load_records(str(tmp_path), "test")
    assert [r["expected"] for r in records] == ["2", "2", "2"]


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
        GSM8KDataModule(source=str(gsm8k_dir), batch_size=0)
    dm = GSM8KDataModule(source=str(gsm8k_dir), batch_size=3, eval_size=5)
    dm.setup("fit")
    assert len(dm.train_records) == 64 and len(dm.eval_records) == 5
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["prompt"]) == 3 and batch["prompt"][0].startswith("Respond in the following format")


def boxed(text):
    """A MATH-style extractor for the test below: the content of the last \\boxed{...}."""
    start = text.rfind("\\boxed{")
    return text[start + 7 : text.index("}", start)] if start >= 0 else None


def test_other_field_names_and_answer_extractor(tmp_path):
    rows = [
        {"problem": "What is 3 + 4?", "solution": "3 + 4 = \\boxed{7}", "level": "1"},
        {"problem": "What is 2 * 5?", "solution": "2 * 5 = \\boxed{10}", "level": "2"},
    ]
    path = _write(tmp_path / "math.jsonl", [json.dumps(r) for r in rows])
    fields = {"question_field": "problem", "answer_field": "solution", "answer_extractor": "test_data.boxed"}
    records = load_records(str(path), "train", **fields)
    assert [r["expected"] for r in records] == ["7", "10"]
    assert records[0]["question"] == "What is 3 + 4?" and records[1]["level"] == "2"  # other columns kept
    with pytest.raises(ValueError, match=r"math\.jsonl:1: missing text field 'question'"):
        load_records(str(path), "train")  # GSM8K's field names do not fit this file
    dm = GSM8KDataModule(source=str(path), batch_size=2, **fields)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["expected"]) == ["10", "7"] and sorted(batch["level"]) == ["1", "2"]
    assert all(p.startswith("Respond in the following format") and p.endswith("?") for p in batch["prompt"])
    bad = _write(tmp_path / "bad.jsonl", [json.dumps({"problem": "q", "solution": "no box"})])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'solution' has no final answer \(boxed found none\)"):
        load_records(str(bad), "train", **fields)
