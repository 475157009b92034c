"""glibc's mmap threshold, fixed: buffers above it are mapped, so freeing them returns their memory."""

import subprocess
import sys

import pytest

from grpo_lightning.fast import allocator

# Run apart: the setting is process-wide and permanent, and an earlier fit in this process has made it already.
# (A 2 MiB chunk freed into the heap would serve the next 2 MiB request whatever the threshold: one run each.)
SCRIPT = """
import sys, torch
from grpo_lightning.fast import allocator
applied = allocator.set_mmap_threshold(2**20) if sys.argv[1] == "fixed" else None
torch.ones(20 * 2**20 // 4)  # freed at once: glibc's own threshold follows it up to 20 MiB
before = allocator.mapped_bytes()
x = torch.ones(2 * 2**20 // 4)
print(applied, allocator.mapped_bytes() - before)
"""


def mapped_by_a_2_mib_tensor(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(allocator.mapped_bytes() is None, reason="needs Linux with glibc")
def test_a_fixed_threshold_maps_buffers_that_the_moving_one_keeps_in_the_heap():
    assert mapped_by_a_2_mib_tensor("glibc") == ("None", 0)  # from the heap, where a free keeps it
    applied, mapped = mapped_by_a_2_mib_tensor("fixed")
    assert applied == "True" and mapped >= 2 * 2**20  # mapped: a free unmaps it


@pytest.mark.parametrize("bad", [0, -1, allocator.MAX_THRESHOLD + 1])
def test_a_threshold_glibc_would_refuse_is_one_clear_error(bad):
    with pytest.raises(ValueError, match="malloc_mmap_threshold must be in"):
        allocator.set_mmap_threshold(bad)


# A 4 MiB tensor under a threshold fixed at 1 MiB, inside heap_kept(8 MiB) and after it.
KEPT = """
import torch
from grpo_lightning.fast import allocator
assert allocator.set_mmap_threshold(2**20)
def mapped_by_4_mib():
    before = allocator.mapped_bytes()
    x = torch.ones(2**20)
    return allocator.mapped_bytes() - before
with allocator.heap_kept(8 * 2**20):
    inside = mapped_by_4_mib()
print(inside, mapped_by_4_mib())
"""


@pytest.mark.skipif(allocator.mapped_bytes() is None, reason="needs Linux with glibc")
def test_heap_kept_serves_a_rollouts_buffers_from_the_heap_and_puts_the_fixed_threshold_back():
    out = subprocess.run([sys.executable, "-c", KEPT], capture_output=True, text=True, check=True).stdout
    inside, after = map(int, out.split())
    assert inside == 0  # from the heap: no page of it mapped
    assert after >= 4 * 2**20  # the 1 MiB threshold is back: mapped, unmapped on free


def test_heap_kept_leaves_glibcs_own_threshold_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_fixed", None)  # as in a process that never fixed one
    calls = []
    monkeypatch.setattr(allocator, "_glibc", lambda: type("Libc", (), {"mallopt": lambda *a: calls.append(a)})())
    with allocator.heap_kept(8 * 2**20):
        pass
    assert calls == []  # fixing one now would switch glibc's adjustment off for good
