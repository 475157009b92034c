"""Time and peak memory of one update's forward + backward on the benchmark model, with the speed pieces on and off.

    python -m bench.update_pass --setting a --repeats 3               # the real depth, 24 layers
    python -m bench.update_pass --layers 4 --variants on              # the quick cut, model.fast on only
    THP_MEM_ALLOC_ENABLE=0 python -m bench.update_pass --variants on  # without huge pages (fast/huge_pages.py)

The update of a GRPO step without sampling or Lightning around it: the benchmark's model (Qwen2.5-0.5B
geometry, fp32, 24 layers or ``--layers``), a rollout of the setting's shape (its real first prompts, random
completion tokens), ``train/update.py``'s ``chunk_loss`` over all rows and ``backward``, then a fused Adam step. Each variant
(on: ``model.fast`` and the memory-safe head, the fused head loss and gated MLPs; off: ``fast: false`` and the
plain head, autograd through chunked logits) runs in its own child process: it reports the fastest of ``--repeats``
passes (wall, CPU, user and system seconds and minor page faults of that pass) and its peak RSS above the
RSS after loading, which includes the gradients and Adam's state. glibc's mmap threshold is fixed at 1 MiB,
as the command line fixes it for a CPU run: every buffer above it is mapped afresh, and its pages are faulted
in and zeroed again (the system seconds and faults). Run it on a quiet machine: the variants run one after
the other.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo_lightning.fast.huge_pages import ask_for_huge_pages

ask_for_huge_pages()  # as the command line does, before torch is imported (THP_MEM_ALLOC_ENABLE=0: without)

from bench import workload
from bench.logprob_memory import current_rss_mib, run_child
from bench.timing import peak_rss_mib



def run_variant(setting_name: str, fused: bool, repeats: int, layers: int) -> dict:
    import torch

    from bench.ours_side import build
    from grpo_lightning.core.types import GRPOBatch, Rollout
    from grpo_lightning.fast.allocator import set_mmap_threshold
    from grpo_lightning.hf.passes import PlainHead
    from grpo_lightning.train.update import chunk_loss

    s = workload.SETTINGS[setting_name]
    set_mmap_threshold(1 << 20)  # as the command line does for a CPU run
    module = build(workload.prepare_model_dir(num_layers=layers), s, False, 2, {"fast": fused})
    if not fused:
        module.head = PlainHead()  # autograd through the chunked logits (before the first pass)
    G, C = s["generations"], s["new_tokens"]
    prompts = [r["prompt"] for r in workload.load_prompts(s["prompts"])]
    enc = module.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    g = torch.Generator().manual_seed(0)
    prompt_ids = enc.input_ids.repeat_interleave(G, 0)
    N, P = prompt_ids.shape
    completion = torch.randint(0, 151643, (N, C), generator=g)  # below the special tokens: no EOS
    ones = torch.ones(N, C, dtype=torch.long)
    rollout = Rollout(torch.cat([prompt_ids, completion], 1), torch.cat([enc.attention_mask.repeat_interleave(G, 0), ones], 1),
                      ones, P, [""] * N, torch.ones(N, dtype=torch.bool))
    data = GRPOBatch(rollout, None, torch.zeros(N), torch.randn(N, generator=g), ones, N, N * C, torch.zeros(()),
                     ref_logp=torch.randn(N, C, generator=g) * 0.1 - 12)
    optimizer = torch.optim.Adam(module.policy.parameters(), lr=workload.LR, fused=True)
    before, best = current_rss_mib(), (float("inf"),)
    for _ in range(repeats):
        start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        optimizer.zero_grad()
        loss, *_ = chunk_loss(module, data, slice(0, N), None, [])
        loss.backward()
        del loss
        optimizer.step()
        end = resource.getrusage(resource.RUSAGE_SELF)
        user, system = end.ru_utime - usage.ru_utime, end.ru_stime - usage.ru_stime
        best = min(best, (time.perf_counter() - start, user + system, user, system, end.ru_minflt - usage.ru_minflt))
    wall, cpu, user, system, faults = best
    return {"fast": fused, "seconds": wall, "cpu_seconds": cpu, "user_seconds": user, "system_seconds": system,
            "minor_faults": faults, "peak_extra_mib": peak_rss_mib() - before, "rows": N, "prompt_tokens": P,
            "layers": layers, "threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(workload.SETTINGS), default="a")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=workload.REAL_DEPTH, help="decoder layers (24: the real depth)")
    parser.add_argument("--variants", nargs="+", choices=("off", "on"), default=["off", "on"], help="model.fast off / on")
    parser.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_variant(args.setting, args.child == "on", args.repeats, args.layers)))
        return
    print(f"one update (forward + backward + fused Adam), setting ({args.setting}), {args.layers} layers, "
          f"the fastest of {args.repeats}")
    print(f"{'fast':<6}{'wall s':>8}{'cpu s':>8}{'user s':>8}{'sys s':>8}{'minor faults':>14}{'peak above loaded (MiB)':>25}")
    for flag in args.variants:
        r = run_child("bench.update_pass", flag, "--setting", args.setting, "--repeats", str(args.repeats),
                      "--layers", str(args.layers))
        print(f"{flag:<6}{r['seconds']:>8.2f}{r['cpu_seconds']:>8.2f}{r['user_seconds']:>8.2f}{r['system_seconds']:>8.2f}"
              f"{r['minor_faults']:>14,}{r['peak_extra_mib']:>25.0f}", flush=True)


if __name__ == "__main__":
    main()
