"""Kernel launches of one log-prob pass (``HeadLogProb``'s forward) at the GPU config's sizes, counted with
``torch.profiler`` on the CPU.

The tensors live on the meta device: every operator is dispatched as on a GPU, but nothing is computed or
allocated, so the GPU config's [64, 500, 151,936] pass counts in seconds on a laptop. A launch is an operator
with no operator inside it (a composite like ``aten::linear`` launches through its children).

    python -m bench.softmax_launches              # blocks sized by memory (fast/head_loss.py)
    python -m bench.softmax_launches --block 8    # the former fixed 8 positions a block
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from grpo_lightning.fast import head_loss

# configs/qwen2.5-0.5b-gsm8k.yaml: 4 prompts × 16 samples, 500 new tokens, Qwen2.5-0.5B (H 896, V 151,936),
# model.memory.logprob_chunk_rows 8
ROWS, COMPLETION, HIDDEN, VOCAB, CHUNK_ROWS = 64, 500, 896, 151_936, 8


def count_launches(block: int | None) -> int:
    """Leaf operators run by one ``HeadLogProb`` forward with entropies; ``block`` fixes the softmax block."""
    meta = torch.device("meta")
    hidden = torch.empty(ROWS, COMPLETION, HIDDEN, device=meta, dtype=torch.bfloat16)
    weight = torch.empty(VOCAB, HIDDEN, device=meta, dtype=torch.bfloat16)
    targets = torch.zeros(ROWS, COMPLETION, device=meta, dtype=torch.long)
    patch = mock.patch.object(head_loss, "softmax_block_rows", lambda rows, vocab: block) if block else mock.MagicMock()
    # (autocast has no state to record on the meta device; the GPU's would be cuda, bf16, on)
    no_amp = mock.patch.object(head_loss, "autocast_state", lambda device: None)
    with patch, no_amp, profile(activities=[ProfilerActivity.CPU]) as prof:
        head_loss.HeadLogProb.apply(hidden, weight, None, targets, 1.0, CHUNK_ROWS, True)
    events = prof.events()
    parents = {id(e.cpu_parent) for e in events if e.cpu_parent is not None}
    return sum(1 for e in events if e.name.startswith("aten::") and id(e) not in parents)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block", type=int, default=None, help="fixed positions per softmax block (default: by memory)")
    args = parser.parse_args()
    rows = args.block or head_loss.softmax_block_rows(CHUNK_ROWS * COMPLETION, VOCAB)
    print(f"[{ROWS}, {COMPLETION}, {VOCAB}] in chunks of {CHUNK_ROWS} rows, {rows} positions a softmax block: "
          f"{count_launches(args.block)} launches")


if __name__ == "__main__":
    main()
