"""The registry of source kinds and the checks every row gets: fields, final answers, skipped rows."""

import json

import pytest

from grpo_lightning.train.data import PromptDataModule, kind_of, load_records, read_split

GOOD = json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"})


def write_lines(path, lines):
    """``lines`` as a text file, one per line; the path."""
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_source_string_goes_to_its_kind(tmp_path):
    kinds = {"builtin:gsm8k-sample": "builtin", "task:arithmetic": "task", "./data": "local", "~/gsm8k": "local",
             "train.parquet": "local", str(tmp_path): "local", "openai/gsm8k": "hub"}
    assert {source: kind_of(source) for source in kinds} == kinds


def test_errors_name_the_row_and_the_field(tmp_path):
    no_field = write_lines(tmp_path / "b.jsonl", [GOOD, GOOD, json.dumps({"question": "q"})])
    with pytest.raises(ValueError, match=r"b\.jsonl:3: missing text field 'answer'"):
        load_records(str(no_field), "train")
    no_hashes = write_lines(tmp_path / "c.jsonl", [json.dumps({"question": "q", "answer": "just 4"})])
    with pytest.raises(ValueError, match=r"c\.jsonl:1: 'answer' has no final answer \(extract_dataset_answer found none\)"):
        load_records(str(no_hashes), "train")
    not_object = write_lines(tmp_path / "e.jsonl", ["[1, 2]"])
    with pytest.raises(ValueError, match=r"e\.jsonl:1: expected a JSON object with 'question' and 'answer'"):
        load_records(str(not_object), "train")


def test_skip_invalid_counts(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [GOOD, json.dumps({"question": "q", "answer": "4"}), GOOD])
    with pytest.warns(UserWarning, match="skipped 1 invalid rows"):
        assert len(load_records(str(path), "train", skip_invalid=True)) == 2
    with pytest.raises(ValueError, match="holds no records"):
        load_records(str(write_lines(tmp_path / "empty.jsonl", [""])), "train")


def test_read_split_takes_a_modules_options(tmp_path):
    path = write_lines(tmp_path / "math.jsonl", [json.dumps({"problem": "2 + 2?", "solution": "#### 4"})])
    options = {"source": "unused", "question_field": "problem", "answer_field": "solution", "batch_size": 3}
    assert read_split(options, "train", str(path))[0]["question"] == "2 + 2?"  # source given: options' ignored
    with pytest.raises(ValueError, match="missing text field 'question'"):
        read_split({"source": str(path)}, "train")  # options a module lacks keep their defaults


def boxed(text):
    """A MATH-style extractor for the test below: the content of the last \\boxed{...}."""
    start = text.rfind("\\boxed{")
    return text[start + 7 : text.index("}", start)] if start >= 0 else None


def test_other_field_names_and_answer_extractor(tmp_path):
    rows = [
        {"problem": "What is 3 + 4?", "solution": "3 + 4 = \\boxed{7}", "level": "1"},
        {"problem": "What is 2 * 5?", "solution": "2 * 5 = \\boxed{10}", "level": "2"},
    ]
    path = write_lines(tmp_path / "math.jsonl", [json.dumps(r) for r in rows])
    fields = {"question_field": "problem", "answer_field": "solution", "answer_extractor": "test_data_records.boxed"}
    records = load_records(str(path), "train", **fields)
    assert [r["expected"] for r in records] == ["7", "10"]
    assert records[0]["question"] == "What is 3 + 4?" and records[1]["level"] == "2"  # other columns kept
    with pytest.raises(ValueError, match=r"math\.jsonl:1: missing text field 'question'"):
        load_records(str(path), "train")  # GSM8K's field names do not fit this file
    dm = PromptDataModule(source=str(path), batch_size=2, **fields)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["expected"]) == ["10", "7"] and sorted(batch["level"]) == ["1", "2"]
    assert all(p.startswith("Respond in the following format") and p.endswith("?") for p in batch["prompt"])
    bad = write_lines(tmp_path / "bad.jsonl", [json.dumps({"problem": "q", "solution": "no box"})])
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: 'solution' has no final answer \(boxed found none\)"):
        load_records(str(bad), "train", **fields)
