"""Checkpoints: one clear error for a bad file, nothing unpickled unsafely, atomic writes, a full disk survived."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from grpo_lightning.hf.lora import LoRA
from grpo_lightning.train.atomic import atomic_dir, atomic_file
from grpo_lightning.train.checkpoints import (
    AtomicCheckpointIO, CheckpointError, CheckpointWriteError, check_resume_checkpoint, check_same_model,
    read_checkpoint,
)
from grpo_lightning.train.cli import main
from test_train import make_config

QUIET = ["--eval.before", "false", "--eval.after", "false", "--torch_threads", "1"]


def fake_checkpoint(step: int = 1, **state: torch.Tensor) -> dict:
    """What the checks read of a Lightning checkpoint: its required entries, weights, hyperparameters."""
    return {"state_dict": state or {"w": torch.zeros(2, 3)}, "global_step": step, "loops": {},
            "pytorch-lightning_version": "2.6", "hyper_parameters": {"model_name_or_path": "m", "lora": LoRA(r=4)}}


class Touch:
    """Unpickling this object would create ``path``: what an unsafe load of a hostile file would do."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_a_checkpoint_reads_with_its_lora_options(tmp_path):
    torch.save(fake_checkpoint(), tmp_path / "ok.ckpt")
    loaded = read_checkpoint(tmp_path / "ok.ckpt")
    assert loaded["global_step"] == 1 and loaded["hyper_parameters"]["lora"] == LoRA(r=4)


@pytest.mark.parametrize("make, problem", [
    (lambda p: p.write_bytes(b""), "is empty"),
    (lambda p: p.write_text("step: 3\n"), r"is not a checkpoint \(not a file that torch.save writes\)"),
    (lambda p: torch.save({"w": torch.zeros(1)}, p), "is a torch file but not a training checkpoint"),
    (lambda p: None, "does not exist"),
])
def test_files_that_are_not_checkpoints_are_named(tmp_path, make, problem):
    path = tmp_path / "x.ckpt"
    make(path)
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} {problem}"):
        read_checkpoint(path)


def test_a_truncated_checkpoint_is_named(tmp_path):
    torch.save(fake_checkpoint(), tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.ckpt is truncated or corrupt") as error:
        read_checkpoint(tmp_path / "cut.ckpt")
    assert "weights_only" not in str(error.value)  # no advice to load it unsafely


def test_a_hostile_checkpoint_is_not_unpickled(tmp_path):
    marker = tmp_path / "ran"
    torch.save({**fake_checkpoint(), "extra": Touch(marker)}, tmp_path / "hostile.ckpt")
    with pytest.raises(CheckpointError, match=r"holds objects that grpo-lightning checkpoints never hold .*could run arbitrary code"):
        read_checkpoint(tmp_path / "hostile.ckpt")
    assert not marker.exists()


def test_a_checkpoint_of_another_model_is_refused():
    here = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    with pytest.raises(CheckpointError, match=r"c.ckpt belongs to another model \(saved from model m\): w has shape \[4, 3\] there, \[2, 3\] here"):
        check_same_model(fake_checkpoint(w=torch.zeros(4, 3), b=torch.zeros(3)), here, "c.ckpt")
    with pytest.raises(CheckpointError, match=r"1 of this model's weights are missing from it, 0 of its are not in this model \(e.g. b\)"):
        check_same_model(fake_checkpoint(w=torch.zeros(2, 3)), here, "c.ckpt")
    check_same_model(fake_checkpoint(**here), here, "c.ckpt")  # the same names and shapes: no error


def test_a_corrupt_last_checkpoint_names_the_readable_older_ones(tmp_path):
    torch.save(fake_checkpoint(step=4), tmp_path / "step=4.ckpt")
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 cut off")
    os.utime(tmp_path / "step=4.ckpt", (1, 1))  # older than last.ckpt
    state = {"w": torch.zeros(2, 3)}
    with pytest.raises(CheckpointError, match=rf"last.ckpt is truncated .*readable older checkpoints: {tmp_path}/step=4.ckpt \(step 4\)"):
        check_resume_checkpoint("last", str(tmp_path), state)
    (tmp_path / "step=4.ckpt").unlink()
    with pytest.raises(CheckpointError, match="no other readable checkpoint is there"):
        check_resume_checkpoint("last", str(tmp_path), state)


def umask_now() -> int:
    umask = os.umask(0o22)
    os.umask(umask)
    return umask


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "f"
    target.write_text("old")
    with pytest.raises(OSError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f"]  # no temporary file left behind
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["f"]
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask_now()  # the mode of any new file, not a private 0600


def test_atomic_dir_keeps_the_previous_export_until_the_new_one_is_whole(tmp_path):
    export = tmp_path / "hf_model"
    export.mkdir()
    (export / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(export) as tmp:
        (tmp / "config.json").write_text("half")
        raise RuntimeError("crash mid-export")
    assert (export / "config.json").read_text() == "old" and os.listdir(tmp_path) == ["hf_model"]
    with atomic_dir(export) as tmp:
        (tmp / "config.json").write_text("new")
    assert (export / "config.json").read_text() == "new" and os.listdir(tmp_path) == ["hf_model"]
    assert export.stat().st_mode & 0o777 == 0o777 & ~umask_now()


def test_a_full_disk_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch, capsys):
    saves, save = [], torch.save

    def full_disk(obj, f, *args, **kwargs):  # the second checkpoint write runs out of space half-way
        saves.append(f)
        if len(saves) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "full", optimization={"mu": 1})
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(config), "--trainer.max_steps", "3", *QUIET])
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    last = tmp_path / "full" / "ckpt" / "last.ckpt"
    assert f"could not write checkpoint {last} (No space left on device); the previous checkpoint" in message
    assert "Traceback" not in message
    monkeypatch.undo()
    assert read_checkpoint(last)["global_step"] == 1  # the first step's checkpoint, whole
    assert os.listdir(last.parent) == ["last.ckpt"]


def test_atomic_checkpoint_io_reads_what_it_writes(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(fake_checkpoint(step=7), tmp_path / "a" / "c.ckpt")
    assert io.load_checkpoint(tmp_path / "a" / "c.ckpt")["global_step"] == 7
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*file/c.ckpt"):
        io.save_checkpoint(fake_checkpoint(), tmp_path / "file" / "c.ckpt")  # its directory is a file


class HalfExport:
    """A policy whose export runs out of space half-way through writing its weights."""

    def save_pretrained(self, path: Path, state_dict: dict | None = None) -> None:
        (Path(path) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failed_export_leaves_the_previous_one(tmp_path):
    from types import SimpleNamespace

    from grpo_lightning.train.callbacks import HFExport

    export = HFExport(export_dir=str(tmp_path / "hf_model"), overwrite=True)
    export.path = tmp_path / "hf_model"
    export.path.mkdir()
    (export.path / "config.json").write_text("the previous export")
    with pytest.raises(OSError, match="No space left"):
        export.save(SimpleNamespace(policy=HalfExport(), tokenizer=None), None)
    assert os.listdir(tmp_path) == ["hf_model"] and os.listdir(export.path) == ["config.json"]
    assert (export.path / "config.json").read_text() == "the previous export"


def test_reading_a_checkpoint_leaves_the_options_allowed_for_lightnings_own_loads(tmp_path):
    """The option groups are allowed process-wide (load_from_checkpoint loads with weights_only too); a
    ``safe_globals`` context around a read would take them off the list on its exit."""
    from grpo_lightning.train.options import Sampling

    path = tmp_path / "options.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"sampling": Sampling(num_generations=3)}, "global_step": 0,
                "loops": {}, "pytorch-lightning_version": "2.6.0"}, path)
    assert read_checkpoint(path)["hyper_parameters"]["sampling"] == Sampling(num_generations=3)
    assert torch.load(path, weights_only=True)["hyper_parameters"]["sampling"].num_generations == 3
