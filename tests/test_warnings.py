"""No time bombs: a short fit makes no deprecated call into transformers, torch or Lightning.

A FutureWarning or DeprecationWarning counts against the project when the call that triggered it was made by
the project's own code. Walking outwards from the line that issued the warning, frames that only pass a
call along (``nn.Module.__call__``, transformers' forward and deprecation wrappers) are skipped; the first
frame left is the caller. Warnings that Lightning or jsonargparse raise about their own internal calls are
not the project's to fix and are not counted.
"""

import logging
import traceback
import warnings
from pathlib import Path

import pytest

import grpo_lightning
from grpo_lightning.core.scoring import load_reward_funcs, score
from grpo_lightning.train.cli import run
from test_train import make_config

PROJECT = str(Path(grpo_lightning.__file__).parent)
PASS_ALONG = ("/torch/nn/modules/module.py", "/transformers/utils/")


def deprecated_reward(prompts: list[str], completions: list[str], **kwargs) -> list[float]:
    """Warns its caller as a library's deprecated function does (the probe's call, made by scoring.py)."""
    warnings.warn("deprecated_reward is deprecated", DeprecationWarning, stacklevel=2)
    return [0.0] * len(completions)


def caller_of(stack: list[traceback.FrameSummary]) -> str:
    """The file of the frame that made the call which warned: stack is outermost first, the warning's line last."""
    frames = [f.filename for f in stack if not f.filename.endswith("/warnings.py")]  # the warning machinery
    for filename in reversed(frames[:-1]):  # frames[-1] issued the warning; walk outwards from its caller
        if not any(part in filename for part in PASS_ALONG):
            return filename
    return frames[-1]


def test_caller_skips_frames_that_pass_the_call_along():
    def frame(filename: str) -> traceback.FrameSummary:
        return traceback.FrameSummary(filename, 1, "f")

    ours = f"{PROJECT}/rollout.py"
    lib = "/x/site-packages"
    via_module_call = [ours, f"{lib}/torch/nn/modules/module.py", f"{lib}/transformers/utils/deprecation.py"]
    assert caller_of([frame(f) for f in via_module_call]) == ours
    lightning_internal = [ours, f"{lib}/lightning/pytorch/utilities/_pytree.py", f"{lib}/torch/utils/_pytree.py"]
    assert caller_of([frame(f) for f in lightning_internal]).endswith("lightning/pytorch/utilities/_pytree.py")


@pytest.mark.parametrize("lora", [None, {"r": 4}], ids=["full", "lora"])
def test_short_fit_makes_no_deprecated_calls(tmp_path, tiny_model_dir, gsm8k_dir, caplog, lora):
    caught: list[tuple[str, str, str]] = []  # (category, caller file, message)

    def record(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FutureWarning, DeprecationWarning)):
            stack = traceback.extract_stack()[:-1]  # without this hook's own frame
            caught.append((category.__name__, caller_of(stack), str(message)))

    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "warnings", **({"lora": lora} if lora else {}))
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")
        warnings.showwarning = record
        score(load_reward_funcs(["test_warnings.deprecated_reward"]), ["p"], ["c"])  # the project's call warns
        probe = list(caught)
        run(["fit", "--config", str(config), "--trainer.max_steps", "4"])  # 2 rollout steps at μ = 2
    # the probe: a deprecation the project's own code triggers is caught and laid at the project's door
    assert [(c[0], Path(c[1]).name) for c in probe] == [("DeprecationWarning", "scoring.py")]
    ours = [c for c in caught[len(probe) :] if c[1].startswith(PROJECT)]
    assert not ours, "deprecated calls made by the project:\n" + "\n".join(map(str, ours))
    logged = [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert not logged, f"deprecation messages logged during the fit: {logged}"
