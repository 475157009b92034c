"""Transparent huge pages for torch's large CPU buffers: asked for by the command line, before torch is imported.

With glibc's mmap threshold fixed (:mod:`~grpo_lightning.fast.allocator`) every buffer above it is mapped
afresh, and the kernel faults its pages in and zeroes them at first touch, 4 KiB at a time: a 24-layer update
of bench setting (a) maps about 10 GB a step, 2.5 million faults. torch's CPU allocator can instead ask the
kernel for huge pages for each buffer of 2 MiB or more (page-aligned, ``madvise(MADV_HUGEPAGE)``; the kernel
backs the 2 MiB-aligned stretches inside it) when ``THP_MEM_ALLOC_ENABLE=1`` is set. It reads that variable
once, at its first allocation, that is while ``import torch`` runs, so the ``grpo-lightning`` command sets it
before it imports torch (:func:`ask_for_huge_pages`). Measured on the 24-layer bench, an update's faults
fell from 2.4–2.5 to 0.9–1.0 million and its time by 7–12%, at the same peak (bench/README.md).

The kernel has the last word: ``/sys/kernel/mm/transparent_hugepage/enabled`` at ``never`` leaves every
page 4 KiB, and at ``always`` large buffers get huge pages wherever they happen to be aligned. A value the
user set, ``THP_MEM_ALLOC_ENABLE=0`` say, is left as it is. Only the CPU's buffers are concerned.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "THP_MEM_ALLOC_ENABLE"  # torch's switch (c10/core/alloc_cpu.cpp)


def ask_for_huge_pages() -> bool:
    """Set ``THP_MEM_ALLOC_ENABLE=1`` unless the environment has a value; whether torch will use huge pages.

    Too late once torch is imported (in a test run or a notebook, say): then only what the environment said
    when it was imported counts.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault(VARIABLE, "1")
    return os.environ.get(VARIABLE) == "1"
