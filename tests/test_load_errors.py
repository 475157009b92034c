"""Each way a model fails to load gets one message naming the path or id, what is wrong and what to do."""

from __future__ import annotations

import json
import re
import sys
import shutil

import pytest
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

from grpo_lightning.builtin.tiny import resolve_model_path
from grpo_lightning.hf.load_errors import ModelLoadError, explain
from grpo_lightning.hf.models import load_model_and_tokenizer


@pytest.fixture
def tiny_copy(tmp_path):
    return shutil.copytree(resolve_model_path("builtin:tiny-arithmetic"), tmp_path / "model")


def test_a_truncated_weights_file(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=f"model {tiny_copy}: its weights cannot be read .* incomplete or damaged"):
        load_model_and_tokenizer(str(tiny_copy))


def test_an_empty_directory(tmp_path):
    with pytest.raises(ModelLoadError, match=f"model directory {tmp_path} has no config.json"):
        load_model_and_tokenizer(str(tmp_path))


def test_an_unknown_architecture(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch"}))
    with pytest.raises(ModelLoadError, match="model_type 'nonesuch'.* upgrade transformers, or set model.trust_remote_code"):
        load_model_and_tokenizer(str(tiny_copy))


def raised_from(cause: BaseException) -> OSError:
    """An OSError as transformers raises it, with ``cause`` in its chain."""
    try:
        try:
            raise cause
        except Exception as e:
            raise OSError("transformers' own message") from e
    except OSError as wrapped:
        return wrapped


def hub_error(kind):
    error = kind.__new__(kind)  # (their constructors want an HTTP response)
    Exception.__init__(error, "hub says no")
    return error


@pytest.mark.parametrize(("cause", "expected"), [
    (LocalEntryNotFoundError("not cached"), "not in the local cache and the Hugging Face hub could not be reached"),
    (hub_error(RepositoryNotFoundError), "is not on the Hugging Face hub"),
    (hub_error(GatedRepoError), "is a gated repository: accept its terms .* HF_TOKEN"),
])
def test_hub_failures_say_which(cause, expected):
    error = explain("org/model", raised_from(cause))
    assert isinstance(error, ModelLoadError) and error.args[0].startswith("model org/model ")
    assert re.search(expected, error.args[0]), error.args[0]


def test_offline_hub_id_through_the_loader(monkeypatch):
    import transformers

    def offline(*args, **kwargs):
        raise raised_from(LocalEntryNotFoundError("not cached"))

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelLoadError, match="model org/model is not in the local cache .* could not be reached"):
        load_model_and_tokenizer("org/model")


def test_the_cli_prints_one_line_without_a_traceback(tmp_path, capsys, monkeypatch):
    from grpo_lightning.train.cli import main

    monkeypatch.delenv("GRPO_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as stop:
        monkeypatch.setattr(sys, "argv", ["grpo-lightning", "validate", "--model.model_name_or_path", str(tmp_path), "--trainer.accelerator=cpu",
             f"--trainer.default_root_dir={tmp_path}"])
        main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "has no config.json" in err and "Traceback" not in err
