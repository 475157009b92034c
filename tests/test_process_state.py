"""The library changes process-wide state only while it runs, and puts it back after.

Importing sets nothing (warning filters, torch's threads, the classes allowed for weights_only loads, the
environment); a command-line run puts back the warning filters, torch's threads and glibc's mmap threshold it
set; the vLLM engine's variables are set only while vLLM starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from grpo_lightning.engines.vllm import environ_set
from grpo_lightning.fast import allocator
from grpo_lightning.train import cli
from grpo_lightning.train.checkpoints import SAFE_GLOBALS, allow_checkpoint_classes

# The third-party packages the library imports change some of this themselves (torch's DTensor allows its
# classes, Lightning and transformers add warning filters): they are imported first, then the state is taken.
IMPORT_EVERYTHING = """
import json, os, sys, warnings, torch
import lightning.pytorch, lightning.pytorch.cli, transformers, torch.distributed.tensor, torch.distributed.checkpoint
filters, threads, environ = list(warnings.filters), torch.get_num_threads(), dict(os.environ)
safe = list(torch.serialization.get_safe_globals())
import grpo_lightning.train.cli, grpo_lightning.engines.vllm, grpo_lightning.fast.allocator
import grpo_lightning.train.module, grpo_lightning.train.checkpoints
print(json.dumps({
    "filters": [repr(f) for f in warnings.filters if f not in filters], "threads": torch.get_num_threads() == threads,
    "environ": sorted(k for k in os.environ.keys() | environ.keys() if os.environ.get(k) != environ.get(k)),
    "safe": [repr(g) for g in torch.serialization.get_safe_globals() if g not in safe],
}))
"""


@pytest.mark.slow  # a fresh interpreter importing torch, Lightning and transformers: about 5 s on 2 busy cores
def test_importing_the_library_changes_no_process_state():
    out = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found == {"filters": [], "threads": True, "environ": [], "safe": []}, found


class RecordingLibc:
    """glibc's malloc calls, recorded instead of made: what the threshold would be, and this process's left alone."""

    def __init__(self):
        self.threshold: int | None = None  # None: glibc's own, adjusted as it goes
        self.trims = 0

    def mallopt(self, option: int, value: int) -> int:
        assert option == allocator.M_MMAP_THRESHOLD
        self.threshold = value
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trims += 1
        return 1


@pytest.fixture
def libc(monkeypatch) -> RecordingLibc:
    fake = RecordingLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: fake)
    return fake


def test_a_run_puts_back_threads_warning_filters_and_the_mmap_threshold(tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch, libc):
    config = {
        "seed_everything": 0,
        "torch_threads": 2,
        "malloc_mmap_threshold": 1 << 20,
        "trainer": {"accelerator": "cpu", "max_steps": 1, "default_root_dir": str(tmp_path), "logger": False,
                    "enable_model_summary": False, "enable_progress_bar": False},
        "model": {"model_name_or_path": str(tiny_model_dir), "sampling": {"num_generations": 2, "max_new_tokens": 4}},
        "data": {"source": str(gsm8k_dir), "batch_size": 1, "eval_size": 2},
        "checkpoint": {"save_last": False, "dirpath": str(tmp_path / "ckpt")},
        "eval": {"before": False, "after": False},
        "samples": {"every_n_steps": 0},
    }
    path = tmp_path / "one-step.yaml"
    path.write_text(yaml.safe_dump(config))
    during = {}

    def setting(nbytes):  # what the run sets, seen while it runs
        applied = set_threshold(nbytes)
        during.update(threads=torch.get_num_threads(), filters=list(warnings.filters), threshold=libc.threshold)
        return applied

    set_threshold = allocator.set_mmap_threshold
    monkeypatch.setattr(cli, "set_mmap_threshold", setting)
    # without pyproject.toml's filters for the same two warnings, which would only move to the front
    monkeypatch.setattr(warnings, "filters", [f for f in warnings.filters if not (f[1] and "eval mode" in f[1].pattern)
                                              and not (f[1] and "ModelCheckpoint" in f[1].pattern)])
    threads, filters = torch.get_num_threads(), list(warnings.filters)
    run = cli.run(["fit", "--config", str(path)])
    assert run.trainer.global_step == 1
    assert (during["threads"], during["threshold"]) == (2, 1 << 20)  # the run did set them
    added = [f[1].pattern for f in during["filters"] if f not in filters]
    assert sorted(("eval mode" in a, "ModelCheckpoint" in a) for a in added) == [(False, True), (True, False)], added
    assert torch.get_num_threads() == threads == 1  # (1: the tests' own setting, tests/conftest.py)
    assert warnings.filters == filters
    # glibc's starting threshold again (128 KiB, fixed: see allocator.threshold_restored), not the run's 1 MiB
    assert libc.threshold == allocator.GLIBC_START and allocator._fixed is None


def test_a_threshold_fixed_before_is_fixed_again_after(libc):
    assert allocator.set_mmap_threshold(64 * 1024)
    with allocator.threshold_restored():
        assert allocator.set_mmap_threshold(1 << 20) and libc.threshold == 1 << 20
        with allocator.heap_kept(4 << 20):  # a rollout's raise inside a run comes back to the run's
            assert libc.threshold == 4 << 20
        assert libc.threshold == 1 << 20 and libc.trims == 1
    assert libc.threshold == 64 * 1024 and allocator._fixed == 64 * 1024
    with allocator.threshold_restored():  # unchanged inside: nothing to put back
        pass
    assert libc.threshold == 64 * 1024
    allocator._fixed = None  # (the module's record as this test found it; glibc's was never touched)


def test_without_a_threshold_before_glibcs_starting_one_comes_back(libc):
    with allocator.threshold_restored():
        allocator.set_mmap_threshold(1 << 20)
    assert libc.threshold == 128 * 1024 and allocator._fixed is None


def test_the_vllm_engines_variables_are_set_only_inside_the_block(monkeypatch):
    monkeypatch.setenv("GRPO_TEST_KEPT", "before")
    monkeypatch.delenv("GRPO_TEST_NEW", raising=False)
    with environ_set({"GRPO_TEST_KEPT": "inside", "GRPO_TEST_NEW": "0"}):
        assert os.environ["GRPO_TEST_KEPT"] == "inside" and os.environ["GRPO_TEST_NEW"] == "0"
    assert os.environ["GRPO_TEST_KEPT"] == "before" and "GRPO_TEST_NEW" not in os.environ
    with pytest.raises(RuntimeError), environ_set({"GRPO_TEST_NEW": "1"}):
        raise RuntimeError  # put back on an error too
    assert "GRPO_TEST_NEW" not in os.environ


def test_the_checkpoint_classes_are_allowed_once_when_asked():
    torch.serialization.clear_safe_globals()  # (the conftest's fixture puts the list back after the test)
    allow_checkpoint_classes()
    allow_checkpoint_classes()
    allowed = torch.serialization.get_safe_globals()
    assert len(allowed) == len(SAFE_GLOBALS) and set(allowed) == set(SAFE_GLOBALS)  # each once
