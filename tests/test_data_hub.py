"""Hub datasets: the call ``datasets`` gets, the rows' places, and one message naming the source on failure."""

import datasets
import pytest

from grpo_lightning.train.data import load_records


def test_hub_rows_are_named_by_source_split_and_row(monkeypatch):
    calls = []

    def load_dataset(source, config_name, split):
        calls.append((source, config_name, split))
        return [{"question": "1 + 1?", "answer": "#### 2"}, {"question": "q"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    with pytest.raises(ValueError, match=r"^someone/math test row 2: missing text field 'answer'$"):
        load_records("someone/math", "test", config_name="default")
    assert calls == [("someone/math", "default", "test")]


def test_a_hub_failure_names_the_source(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"could not load dataset 'openai/gsm8k' \(main, train\) from the hub: no network"):
        load_records("openai/gsm8k", "train")
