"""This process's random-number state: what sampling draws from, saved and restored whole.

A checkpoint keeps every process's (``train/callbacks.py``'s ``RandomStates``), so that a resumed run samples
what the stopped run would have; a stop inside a step puts the step's back (``train/preemption.py``); an
engine that reseeds while it starts (vLLM) restores the one it found (``engines/vllm.py``).
"""

from __future__ import annotations

import random
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """This process's random-number state (torch, its own CUDA device's, Python).

    Only the current device's CUDA state: a process samples on its one device, and a resume may see fewer GPUs.
    """
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state saved by :func:`rng_state` (a CUDA state only where CUDA is available now)."""
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and len(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    random.setstate(state["python"])
