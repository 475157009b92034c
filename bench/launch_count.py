"""Kernel launches counted on the CPU: every operator that runs a kernel, as a GPU would launch it.

:class:`LaunchCounter` is a ``TorchDispatchMode``: it sees each operator below autograd, after composite
operators have split into the ones that run (``linear`` into ``t`` and ``addmm``, a backward pass into its
products), and counts those that run a kernel; views, metadata and bare allocations launch nothing
(:data:`NO_KERNEL`). It keeps a count per operator and nothing else, so a whole GRPO step at the GPU config's
sizes is counted in constant memory (``bench.gpu_check --count-launches``).
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

# Operators that only make a view, read metadata or allocate: no kernel on a GPU.
NO_KERNEL = {f"aten.{name}" for name in (
    "view", "_unsafe_view", "_reshape_alias", "reshape", "as_strided", "transpose", "t", "permute", "expand",
    "expand_as", "slice", "select", "unsqueeze", "squeeze", "detach", "alias", "split", "split_with_sizes", "chunk",
    "narrow", "unbind", "unflatten", "flatten", "view_as", "numpy_T", "empty", "empty_strided", "empty_like",
    "new_empty", "new_empty_strided", "resolve_conj", "resolve_neg", "lift_fresh", "to", "result_type",
    "is_nonzero", "size", "stride", "dim", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
    "is_same_size", "_has_compatible_shallow_copy_type",
)}


class LaunchCounter(TorchDispatchMode):
    """``with LaunchCounter() as c: ...`` counts the operators run inside that launch a kernel: ``c.total``,
    ``c.by_op`` (operator name → count)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name not in NO_KERNEL:
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.by_op.values())
