"""Kernel launches counted below autograd (bench/launch_count.py): operators that run a kernel, not views."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `bench`

from bench.launch_count import LaunchCounter  # noqa: E402


def test_counts_the_operators_that_run_a_kernel_and_no_view():
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with torch.no_grad(), LaunchCounter() as counter:
        y = layer(x).view(3, 2)  # linear: t (a view) and addmm; view: none
        y = y + 1  # add
        y.relu_()  # relu_
    assert dict(counter.by_op) == {"aten.addmm": 1, "aten.add": 1, "aten.relu_": 1} and counter.total == 3


def test_a_backward_pass_is_counted_as_the_products_it_runs():
    w = torch.randn(4, 3, requires_grad=True)
    x = torch.randn(2, 4)
    with LaunchCounter() as counter:
        (x @ w).sum().backward()  # forward: mm, sum; backward: the ones of sum's gradient, expand (a view), mm for dw
    assert counter.by_op["aten.mm"] == 2 and counter.by_op["aten.sum"] == 1 and "aten.expand" not in counter.by_op


def test_the_phase_profile_splits_products_from_the_rest():
    from torch.profiler import ProfilerActivity, profile

    from bench.profile_phases import summarize

    a = torch.randn(64, 64)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (a @ a + 1).view(-1)  # three calls: matmul (which runs mm), add, view
    text = summarize("update", 1.0, prof, rows=5)
    assert text.startswith("== update: 1.00 s wall, 3 operator calls; products ")
    assert "aten::mm" in text and "aten::add" in text
