"""Data packaged with the project: the GSM8K sample's counts, answers and license; unknown names."""

import pytest

from grpo_lightning.train.data import load_records


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


def test_a_bad_row_of_packaged_data_is_named_by_its_file():
    with pytest.raises(ValueError, match=r"gsm8k-sample.train\.jsonl:1: missing text field 'problem'"):
        load_records("builtin:gsm8k-sample", "train", question_field="problem")
