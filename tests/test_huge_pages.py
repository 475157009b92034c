"""The command line asks torch for transparent huge pages before importing it, and leaves a user's choice alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_lightning.fast import huge_pages

# What a fresh process sees: the switch, and the huge pages under a 64 MiB buffer after the command's import.
CHILD = """
import os, sys
import grpo_lightning.train.cli  # the command's module: it asks before it imports torch
import torch
buffer = torch.ones(16 * 2**20)  # 64 MiB, every page touched
huge = [int(line.split()[1]) for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages")]
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge[0] if huge else -1)
"""
KERNEL = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def child(env_value: str | None) -> tuple[str, int]:
    env = {k: v for k, v in os.environ.items() if k != huge_pages.VARIABLE}
    if env_value is not None:
        env[huge_pages.VARIABLE] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env=env).stdout
    switch, huge_kib = out.split()
    return switch, int(huge_kib)


@pytest.mark.skipif(not KERNEL.exists() or "[madvise]" not in KERNEL.read_text(), reason="needs Linux with THP on madvise")
def test_the_command_line_gets_huge_pages_for_large_buffers_unless_the_user_said_no():
    switch, huge_kib = child(None)
    assert switch == "1" and huge_kib >= 32 * 1024  # most of the 64 MiB on 2 MiB pages
    switch, huge_kib = child("0")  # the user's value stays, and torch asks for nothing
    assert switch == "0" and huge_kib == 0


def test_asking_after_torch_is_imported_changes_nothing(monkeypatch):
    monkeypatch.delenv(huge_pages.VARIABLE, raising=False)
    assert "torch" in sys.modules  # (the test run imported it): torch has read the switch already
    assert huge_pages.ask_for_huge_pages() is False and huge_pages.VARIABLE not in os.environ
    monkeypatch.setenv(huge_pages.VARIABLE, "1")
    assert huge_pages.ask_for_huge_pages() is True
