"""What a GRPO step needs from several processes, on top of Lightning's strategies (DDP, FSDP).

Each process samples and scores its own prompts (``PromptStream`` gives process r the batches r, r + W, ...),
so one optimizer step covers the rows of every process. Four things then have to be global rather than
per process, and each function here does one of them through the strategy's own collectives:

- the step's counts and rewards (the loss denominators, ``scale_rewards: batch`` and the logged metrics):
  :func:`gather_rows`, :func:`sum_over_processes`;
- the gradient: DDP and FSDP average gradients over processes, so each process's loss part is multiplied by
  :func:`gradient_scale`, and accumulation chunks skip the all-reduce (:func:`no_backward_sync`);
- evaluation: each process evaluates its own examples, and :func:`gather_objects` / :func:`interleave`
  put the rows back in the order of the evaluation set;
- random states: every process's own, seeded apart (:func:`seed_this_process`), saved and restored
  (:func:`gather_objects`).

With one process every function is the identity, so a single-process run does exactly what it did before.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from grpo_lightning.core.random_state import rng_state, set_rng_state  # noqa: F401 (re-exported)
from grpo_lightning.hf.sharding import gradient_sync, is_sharded


def world_size(strategy: Any) -> int:
    return getattr(strategy, "world_size", 1) if strategy is not None else 1


def gradient_scale(strategy: Any) -> int:
    """The factor on each process's loss part: DDP and FSDP average gradients over the W processes.

    The parts are divided by counts of the whole step (every process's rows), so their *sum* over processes is
    the step's loss; averaging their gradients would divide it by W once more.
    """
    return world_size(strategy)


@contextmanager
def no_backward_sync(strategy: Any, enabled: bool = True, root: Any = None) -> Iterator[None]:
    """Skip the gradient reduction in the backward passes inside: DDP's all-reduce (Lightning's
    ``block_backward_sync``), or FSDP2's reduce-scatter when ``root`` (the policy's pass root) is sharded.

    Gradients accumulate locally; the next backward outside the block reduces the accumulated sum, so an
    optimizer step costs one reduction however many chunks it has. A no-op with one process.
    """
    if is_sharded(root):
        with gradient_sync(root, not enabled):
            yield
        return
    block = getattr(strategy, "block_backward_sync", None)
    if not enabled or block is None or world_size(strategy) == 1:
        yield
        return
    with block():
        yield


def gather_rows(strategy: Any, columns: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each column [n] of this process → the column [W*n] of every process, process 0's rows first.

    One collective for all columns (stacked as float64, exact for counts and float32 values); every process
    gets the same result. Each process must pass the same columns with the same n. Dtypes are kept.
    """
    if world_size(strategy) == 1:
        return columns
    names = list(columns)
    table = torch.stack([columns[k].to(torch.float64) for k in names], dim=1)  # [n, K]
    gathered = strategy.all_gather(table)  # [W, n, K]
    gathered = gathered.reshape(-1, len(names))  # [W*n, K]
    return {k: gathered[:, i].to(columns[k].dtype) for i, k in enumerate(names)}


def sum_over_processes(strategy: Any, values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Scalars summed over processes (one collective): parts of a step-wide mean become the mean."""
    if world_size(strategy) == 1 or not values:
        return values
    names = list(values)
    stacked = torch.stack([torch.as_tensor(values[k], dtype=torch.float64) for k in names])
    total = strategy.reduce(stacked.clone(), reduce_op="sum")
    return {k: total[i].to(torch.as_tensor(values[k]).dtype) for i, k in enumerate(names)}


def seed_this_process(rank: int) -> None:
    """Seed process r > 0 with ``seed_everything``'s seed + r (process 0, and a single process, keep theirs).

    ``seed_everything`` gives every process the same seed, so processes would draw the same random numbers
    for their different prompts; sampling should be independent across processes.
    """
    seed = os.environ.get("PL_GLOBAL_SEED")
    if rank == 0 or seed is None:
        return
    torch.manual_seed(int(seed) + rank)  # every device's generator too
    random.seed(int(seed) + rank)


def restore_rng_states(states: Any, rank: int, world: int) -> str | None:
    """Restore process ``rank``'s state from a checkpoint's ``rng_states`` (one per process; None: nothing).

    A checkpoint of another number of processes restores what it has; the returned text says that sampling then
    will not repeat what the stopped run would have drawn (None when the counts agree).
    """
    if states is None:
        return None
    if rank < len(states):
        set_rng_state(states[rank])
    if len(states) == world:
        return None
    return (
        f"the checkpoint holds the random states of {len(states)} processes, this run has {world}: "
        "sampling will not repeat what the stopped run would have drawn"
    )


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a no-op elsewhere), so that a phase's time is its own."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gather_objects(strategy: Any, obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in process order; ``[obj]`` with one process."""
    if world_size(strategy) == 1:
        return [obj]
    out: list[Any] = [None] * world_size(strategy)
    torch.distributed.all_gather_object(out, obj)
    return out


def interleave(parts: list[list[Any]]) -> list[Any]:
    """Undo a round-robin split: process r held items r, r + W, r + 2W, ... (the evaluation sampler's)."""
    W = len(parts)
    out: list[Any] = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r::W] = part
    return out
