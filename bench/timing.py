"""Phase timers and the result record both benchmark sides write.

A "GRPO step" is one rollout batch followed by its μ policy updates. TRL counts each of the μ updates as
its own optimizer step, so its side sums μ consecutive TRL steps into one GRPO step; grpo-lightning's
``training_step`` already is one GRPO step. The first GRPO step is warm-up (allocator growth, lazy
initialisation) and is left out of the median.
"""

from __future__ import annotations

import functools
import json
import resource
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager

PHASES = ("sampling", "reference", "old_policy", "update", "other")
RESULT_PREFIX = "BENCH_RESULT "  # the parent process finds the record by this prefix on stdout


class PhaseTimer:
    """Accumulates wall seconds per phase; ``snapshot`` lets a caller diff totals around a step.

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so that GPU work queued in a
    phase is charged to it rather than to whatever next waits for the GPU.
    """

    def __init__(self, sync=None) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.sync = sync or (lambda: None)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.totals[name] += time.perf_counter() - start

    def wrap(self, fn, name_of):
        """Wrap ``fn`` so each call is charged to ``name_of(*args, **kwargs)`` (a phase name or None)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = name_of(*args, **kwargs)
            if name is None:
                return fn(*args, **kwargs)
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed

    def snapshot(self) -> dict[str, float]:
        return dict(self.totals)


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before)}


def peak_rss_mib() -> float:
    """The process's peak resident set size; Linux reports ru_maxrss in KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def summarise(steps: list[dict[str, float]], warmup: int = 1) -> dict[str, float]:
    """Medians over the measured steps (all of them when there are too few to drop the warm-up)."""
    measured = steps[warmup:] if len(steps) > warmup else steps
    keys = ("wall", "cpu") + PHASES
    return {k: statistics.median(s.get(k, 0.0) for s in measured) for k in keys}


def emit(record: dict) -> None:
    """Print the result as one JSON line that the driver parses."""
    print(RESULT_PREFIX + json.dumps(record), flush=True)


def emit_result(framework: str, setting: str, config: dict, steps: list[dict], lengths: list[int],
                load_s: float, rss_loaded: float, **extra: object) -> None:
    """Emit one framework's result: per-step times, their medians, peak RSS and proof of full-length sampling."""
    emit(
        {
            "framework": framework,
            "setting": setting,
            "config": config,
            **extra,
            "steps": steps,
            "median": summarise(steps),
            "peak_rss_mib": peak_rss_mib(),
            "rss_after_load_mib": rss_loaded,
            "load_s": load_s,
            # equal to the setting's new_tokens when every completion ran to full length
            "min_completion_length": min(lengths) if lengths else None,
        }
    )
