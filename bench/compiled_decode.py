"""A static KV cache with a compiled decoding step, against eager decoding: the lever measured alone.

    python -m bench.compiled_decode --layers 24          # the real depth, setting (a)'s 8 rows × 64 tokens
    python -m bench.compiled_decode --layers 2 --tiny    # a quick look

Runs transformers' ``generate`` (greedy, every completion forced to full length) on the seeded benchmark model
three ways, each three times, in one process: the dynamic cache (what ``generate`` uses by default),
the static cache eager, and the static cache with the decoding step compiled (``torch.compile`` through
``generate``'s own compile path, which transformers switches on for GPUs and which is forced here for the
CPU). The first compiled call includes the compilation: the difference to the later ones is its cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import workload

WAYS = ("dynamic cache", "static cache", "static cache, compiled")


def timed_calls(model, ids, tokens: int, way: str, calls: int = 3) -> list[float]:
    """Seconds of ``calls`` generate calls of ``tokens`` new tokens for the rows ``ids`` [rows, P]."""
    import torch
    from transformers.generation.configuration_utils import CompileConfig

    options = {}
    if way != "dynamic cache":
        compile_config = CompileConfig()
        compile_config._compile_all_devices = way.endswith("compiled")  # transformers compiles on GPUs only
        options = {"cache_implementation": "static", "compile_config": compile_config,
                   "disable_compile": not way.endswith("compiled")}
    seconds = []
    with torch.no_grad():
        for _ in range(calls):
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                           min_new_tokens=tokens, do_sample=False, **options)
            seconds.append(time.perf_counter() - start)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tiny", action="store_true", help="the 64-wide geometry instead of Qwen2.5-0.5B's")
    parser.add_argument("--rows", type=int, default=8, help="rows sampled at once (setting (a): 2 prompts × 4)")
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = workload.prepare_model_dir(num_layers=args.layers, tiny=args.tiny)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (args.rows, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    print(f"{args.layers} layers, {args.rows} rows × {args.tokens} new tokens after {args.prompt_tokens}, "
          f"{args.threads} threads: seconds per generate call")
    for way in WAYS:
        seconds = timed_calls(model, ids, args.tokens, way)
        print(f"  {way:24s} " + "  ".join(f"{s:6.2f}" for s in seconds)
              + f"   ({min(seconds) / args.tokens * 1000:.0f} ms a token at best, prefill included)", flush=True)


if __name__ == "__main__":
    main()
