"""Non-finite numbers never reach the weights: float32 reward checks, skipped optimizer steps, the stop after K."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from grpo_lightning.core.advantages import group_advantages
from grpo_lightning.core.scoring import RewardFunctionError, check_step_rewards, float32_finite, score
from grpo_lightning.train.cli import run
from grpo_lightning.train.guard import NonFiniteStepsError, SkipGuard, any_process
from grpo_lightning.train import update as updates
from grpo_lightning.train.update import UpdateResult
from test_train import make_config, scalars

QUIET = ["--eval.before", "false", "--eval.after", "false", "--torch_threads", "1"]


class BreakUpdates(L.Callback):
    """From rollout step ``step`` on (``until``: up to that step, excluded), the update misbehaves.

    ``nan``: the loss is multiplied by NaN (loss and gradients non-finite); ``nothing``: the update is not run
    at all, the reference for "that update did nothing".
    """

    def __init__(self, step: int, mode: str, until: int = 10**9):
        self.step, self.mode, self.until = step, mode, until
        self.batch_idx = -1

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        self.chunk_loss, update = updates.chunk_loss, module._update
        broken = lambda: self.step <= self.batch_idx < self.until  # noqa: E731

        def nan_chunk_loss(*args: Any) -> tuple:
            loss, logp, entropy, stats = self.chunk_loss(*args)
            return loss * (math.nan if broken() and self.mode == "nan" else 1.0), logp, entropy, stats

        updates.chunk_loss = nan_chunk_loss  # what the update's loop calls, for this run
        module._update = lambda data: UpdateResult({}, None) if broken() and self.mode == "nothing" else update(data)

    def teardown(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        updates.chunk_loss = self.chunk_loss

    def on_exception(self, trainer: L.Trainer, module: Any, exception: BaseException) -> None:
        updates.chunk_loss = self.chunk_loss  # a run stopped by the guard ends here, not in teardown


def breaking(step: int, mode: str, until: int = 10**9) -> list[str]:
    return ["--trainer.callbacks+=test_guard.BreakUpdates", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.mode={mode}", f"--trainer.callbacks.until={until}"]


def test_a_non_finite_step_changes_nothing(tmp_path, tiny_model_dir, gsm8k_dir):
    """3 rollout steps, the second's loss NaN: the weights equal those of the run whose second update did nothing."""

    def fit(name: str, mode: str) -> Any:
        config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, name, optimization={"mu": 1})
        # max_steps 2: the skipped step does not count, so both runs take 3 rollout steps
        return run(["fit", "--config", str(config), "--trainer.max_steps", "2", *QUIET, *breaking(1, mode, until=2)])

    with pytest.warns(UserWarning, match=r"optimizer step 1 skipped: loss nan, gradient norm nan"):
        skipped = fit("skipped", "nan")
    nothing = fit("nothing", "nothing")
    assert skipped.model.guard.state_dict() == {"consecutive": 0, "total": 1}
    a, b = skipped.model.policy.state_dict(), nothing.model.policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.isfinite(v).all() for v in a.values())
    adam = lambda cli: [s["step"].item() for s in cli.trainer.optimizers[0].state.values()]  # noqa: E731
    assert set(adam(skipped)) == set(adam(nothing)) == {2.0}  # Adam's step count skipped the NaN step too
    assert skipped.trainer.global_step == 2 and skipped.trainer.fit_loop.epoch_loop.batch_idx == 2  # 3 batches
    assert scalars(Path(skipped.trainer.log_dir))["skipped_steps"] == [0.0, 1.0, 1.0]


def test_k_consecutive_skips_stop_and_keep_the_last_good_checkpoint(tmp_path, tiny_model_dir, gsm8k_dir):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "k", optimization={"mu": 1, "max_consecutive_skips": 2})
    stop = pytest.raises(NonFiniteStepsError, match=r"2 optimizer steps in a row .* the last good checkpoint is .*last\.ckpt")
    with pytest.warns(UserWarning, match=r"optimizer step 1 skipped: loss nan") as warned, stop:
        run(["fit", "--config", str(config), "--trainer.max_steps", "4", *QUIET, *breaking(1, "nan")])
    skips = [str(w.message) for w in warned if "skipped" in str(w.message)]
    assert [f"{n} in a row, {n} in all" in s for n, s in enumerate(skips, 1)] == [True, True], skips
    kept = torch.load(tmp_path / "k" / "ckpt" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 1 and kept["skip_guard"] == {"consecutive": 0, "total": 0}
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values())
    assert not (tmp_path / "k" / "lightning_logs" / "version_0" / "hf_model").exists()  # nothing exported


def test_skip_guard_counts_consecutive_and_total_skips():
    guard = SkipGuard(max_consecutive=2)
    one, nan, inf = torch.tensor(1.0), torch.tensor(math.nan), torch.tensor(math.inf)
    assert guard.step_is_finite(None, one, one)
    assert not guard.step_is_finite(None, nan, one)  # a NaN loss
    assert not guard.step_is_finite(None, one, inf)  # a finite loss, an infinite gradient norm
    assert guard.state_dict() == {"consecutive": 2, "total": 2}
    with pytest.raises(NonFiniteStepsError, match="no checkpoint was written yet"):
        guard.check_limit(None)
    assert guard.step_is_finite(None, one, None)  # a GradScaler run: the norm is the scaler's business
    assert guard.state_dict() == {"consecutive": 0, "total": 2}
    guard.check_limit(None)  # 0 in a row: no stop
    restored = SkipGuard()
    restored.load_state_dict({"consecutive": 1, "total": 5})
    assert (restored.consecutive, restored.total) == (1, 5)


class TwoProcesses:
    """A strategy of 2 processes whose other process reports ``other``: ``reduce`` sums the two flags."""

    world_size, root_device = 2, torch.device("cpu")

    def __init__(self, other: bool):
        self.other = other

    def reduce(self, value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        return value + float(self.other)


def test_any_process_makes_one_decision_for_all():
    assert any_process(None, True) and not any_process(None, False)  # one process: the flag itself
    assert any_process(TwoProcesses(other=True), False)  # the other process saw a NaN: this one skips too
    assert not any_process(TwoProcesses(other=False), False)
    guard = SkipGuard()
    assert not guard.step_is_finite(TwoProcesses(other=True), torch.tensor(1.0), torch.tensor(1.0))
    assert guard.state_dict() == {"consecutive": 1, "total": 1}


def test_the_skip_counts_travel_in_the_checkpoint(tiny_model_dir):
    from grpo_lightning.train.module import GRPOModule
    from grpo_lightning.train.options import Sampling

    module = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2))
    module.guard.load_state_dict({"consecutive": 2, "total": 5})
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["skip_guard"] == {"consecutive": 2, "total": 5}
    restored = GRPOModule(str(tiny_model_dir), sampling=Sampling(num_generations=2))
    restored.on_load_checkpoint(checkpoint)
    assert restored.guard.state_dict() == {"consecutive": 2, "total": 5}


def test_rewards_beyond_float32_name_the_function():
    assert float32_finite(3.0e38) and not float32_finite(1e39) and not float32_finite(math.nan)

    def huge(prompts, completions, **kw):
        return [1.0, 1e39]

    with pytest.raises(RewardFunctionError, match=r"'huge' returned 1e\+39 for completion 1; .*finite in float32"):
        score({"huge": (huge, 1.0)}, ["p", "p"], ["a", "b"])


def test_rewards_whose_sum_overflows_are_refused():
    # 3e38 each is finite in float32, but a group's sum 6e38 is not: the mean is inf, the advantages NaN
    rewards = torch.tensor([3e38, 3e38, 0.0, 0.0])
    advantages = group_advantages(rewards, 4)
    assert advantages.isnan().all()
    with pytest.raises(RewardFunctionError, match=r"overflow float32 .* 'big' up to 3e\+38"):
        check_step_rewards(rewards, advantages, {"big": 3e38})
    with pytest.raises(RewardFunctionError):
        check_step_rewards(torch.tensor([0.0, 2.0]), torch.tensor([math.nan, 0.7]), {"ok": 2.0})


def test_rewards_near_1e20_keep_exact_advantages():
    # The variance (2.5e39) overflows float32, but torch's std does not square in float32: std = 5e19.
    # mean 2.5e19; std = sqrt((3·(2.5e19)² + (7.5e19)²) / 3) = 5e19; advantages −2.5e19/5e19, 7.5e19/5e19.
    rewards = torch.tensor([0.0, 1e20, 0.0, 0.0])
    assert math.isinf(rewards.var().item())
    advantages = group_advantages(rewards, 4)
    assert torch.allclose(advantages, torch.tensor([-0.5, 1.5, -0.5, -0.5]))
    check_step_rewards(rewards, advantages, {"big": 1e20})  # accepted: nothing overflowed on the way


def test_allow_step_judges_the_callers_norm_and_without_one_only_the_loss():
    from types import SimpleNamespace

    trainer = SimpleNamespace(strategy=None, global_step=4, checkpoint_callback=None)
    guard = SkipGuard()
    with pytest.warns(UserWarning, match="optimizer step 4 skipped: loss 1, gradient norm inf"):
        assert not guard.allow_step(trainer, torch.tensor(1.0), torch.tensor(math.inf))
    assert guard.allow_step(trainer, torch.tensor(1.0), torch.tensor(2.0))
    # no norm (a GradScaler's step: its inf gradients are the scaler's to skip): only the loss is judged
    assert guard.allow_step(trainer, torch.tensor(1.0), None)
    with pytest.warns(UserWarning, match="gradient norm not checked"):
        assert not guard.allow_step(trainer, torch.tensor(math.nan), None)
    assert guard.state_dict() == {"consecutive": 1, "total": 2}


@pytest.mark.slow
def test_a_skipped_step_leaves_the_reference_refresh_at_its_rollout_step(tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch):
    """ref_update_every 2, the second rollout step's update NaN (skipped): the refresh still comes at rollout step 2.

    4 rollout steps for max_steps 3 (the skip does not count). Counted as ``global_step // mu`` the steps would read
    0, 1, 1, 2 and the refresh would come one rollout step late, at the fourth.
    """
    import grpo_lightning.train.module as module_file

    calls: list[tuple[int, bool]] = []  # (the step the module passed, whether the reference was refreshed)
    original = module_file.refresh_reference

    def recording(reference, policy, step, every):
        calls.append((step, original(reference, policy, step, every)))
        return calls[-1][1]

    monkeypatch.setattr(module_file, "refresh_reference", recording)
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "ref", optimization={"mu": 1, "ref_update_every": 2})
    with pytest.warns(UserWarning, match="optimizer step 1 skipped"):
        cli = run(["fit", "--config", str(config), "--trainer.max_steps", "3", *QUIET, *breaking(1, "nan", until=2)])
    assert calls == [(0, False), (1, False), (2, True), (3, False)]
    assert cli.model.rollout_steps == 4 and cli.trainer.global_step == 3
    kept = torch.load(tmp_path / "ref" / "ckpt" / "last.ckpt", weights_only=True)
    assert kept["rollout_steps"] == 4 and kept["global_step"] == 3
