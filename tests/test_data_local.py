"""Local files: a jsonl file, a directory of split files (jsonl or parquet), and errors naming file and line."""

import json

import pytest

from grpo_lightning.train.data import load_records
from test_data_records import GOOD, write_lines


def test_errors_name_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_records(str(tmp_path / "missing.jsonl"), "train")
    with pytest.raises(FileNotFoundError, match="no 'train' file"):
        load_records(str(tmp_path), "train")
    bad_json = write_lines(tmp_path / "a.jsonl", [GOOD, "{not json"])
    with pytest.raises(ValueError, match=r"a\.jsonl:2: not a JSON object"):
        load_records(str(bad_json), "train")


def test_a_directory_serves_each_split_from_its_file(tmp_path):
    write_lines(tmp_path / "train.jsonl", [GOOD, "", GOOD])  # a blank line is no row
    write_lines(tmp_path / "test.jsonl", [json.dumps({"question": "q", "answer": "#### 5"})])
    assert [r["expected"] for r in load_records(str(tmp_path), "train")] == ["2", "2"]
    assert [r["expected"] for r in load_records(str(tmp_path), "test")] == ["5"]


def test_parquet_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([json.loads(GOOD)] * 3).to_parquet(str(tmp_path / "test.parquet"))
    records = load_records(str(tmp_path), "test")
    assert [r["expected"] for r in records] == ["2", "2", "2"]
