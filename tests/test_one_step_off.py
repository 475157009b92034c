"""One-step-off rollouts (``max_staleness: 1``, engines/mixin.py) on replayed rollouts: which batch each step
trains on, the staleness logged, the importance-sampling correction, and a resume from a rollout in flight.

A :class:`ReplayEngine` serves the rollouts a synchronous run sampled, so the one-step-off run trains on the same
samples and the two can be compared update for update. (The vLLM server engine's own one-step-off runs are in
tests/test_vllm_server.py.)
"""

from __future__ import annotations

import dataclasses

import lightning as L
import pytest
import torch

from grpo_lightning.core.importance import ImportanceSampling
from grpo_lightning.core.types import Rollout
from grpo_lightning.engines.generate import GenerateEngine
from grpo_lightning.engines.replay import RecordingEngine, ReplayEngine
from grpo_lightning.train.data import PromptDataModule
from grpo_lightning.train.module import GRPOModule
from grpo_lightning.train.options import Sampling

TINY = "builtin:tiny-arithmetic"


class Logged(L.Callback):
    """The step's logged values after each batch that updated."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, *args):
        if "reward" in trainer.callback_metrics and trainer.global_step > len(self.steps):
            self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})
            self.steps[-1]["prompt"] = module.last_samples[2]  # the first prompt of the batch the step scored


def fit(engine, steps: int, tmp_path=None, resume: str | None = None, callbacks=()) -> GRPOModule:
    L.seed_everything(0, verbose=False)
    module = GRPOModule(
        TINY, dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=16, temperature=2.0), rollout=engine,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
    )
    data = PromptDataModule(source="task:arithmetic", batch_size=2, eval_size=4, seed=0, tokenizer_name_or_path=TINY)
    saving = tmp_path is not None
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, enable_checkpointing=saving,
        callbacks=[*callbacks, *([L.pytorch.callbacks.ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=1, save_top_k=-1)] if saving else [])],
    )
    trainer.fit(module, data, ckpt_path=resume)
    return module


def weights(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def sampled() -> list[Rollout]:
    """Three steps' rollouts of a synchronous run (2 prompts × 4 samples each)."""
    recorder = RecordingEngine(GenerateEngine())
    fit(recorder, steps=3)
    return recorder.rollouts


def test_each_step_trains_on_the_batch_sent_a_step_before(sampled):
    at_its_step = Logged()
    synchronous = weights(fit(ReplayEngine(sampled[:2]), steps=2, callbacks=[at_its_step]))
    logged = Logged()
    engine = ReplayEngine(sampled, max_staleness=1)
    off = fit(engine, steps=2, callbacks=[logged])
    # batch 0: sent; batch 1: sent, update on rollout 0 (its batch's answers score it); batch 2: sent (for a
    # later step), update on rollout 1
    assert engine.served == 3 and off.rollout_steps == 2 and off.trainer.global_step == 2
    assert [s["prompt"] for s in logged.steps] == [s["prompt"] for s in at_its_step.steps]  # batch 0, then batch 1
    assert [s["reward"] for s in logged.steps] == [s["reward"] for s in at_its_step.steps]
    assert same(weights(off), synchronous)  # the same updates on the same rollouts
    # the first update's rollout was sampled by the weights it updates; the second's one update before
    assert [s["staleness"] for s in logged.steps] == [0.0, 1.0]


def with_sampler_logprobs(module: GRPOModule, rollout: Rollout, shift: float) -> Rollout:
    """``rollout`` as a sampler with the module's weights would return it (``shift`` 0): the trainer's own
    log-probs as the sampler's, and the correction on."""
    with torch.no_grad():
        logp = module._logprobs(module.passes, rollout)
    return dataclasses.replace(
        rollout, sample_logprobs=logp + shift, importance_sampling=ImportanceSampling("sequence_truncate", clip_max=3.0)
    )


def test_with_the_samplers_weights_the_corrected_update_is_the_synchronous_one(sampled):
    synchronous = weights(fit(ReplayEngine(sampled[:1]), steps=1))  # no correction
    start = GRPOModule(TINY, dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=16, temperature=2.0))
    rollout = with_sampler_logprobs(start, sampled[0], shift=0.0)
    # (batch 1 sends a second rollout, which no update of a 1-step run uses)
    corrected = weights(fit(ReplayEngine([rollout, sampled[1]], max_staleness=1), steps=1))
    gap = max((corrected[k] - synchronous[k]).abs().max().item() for k in corrected)
    print(f"largest weight gap, corrected one-step-off against synchronous: {gap:.1e}")
    assert gap < 1e-6
    # a sampler that put more probability on its tokens than the trainer does: ρ < 1 shrinks the update
    skewed = weights(fit(ReplayEngine([with_sampler_logprobs(start, sampled[0], shift=0.05), sampled[1]], max_staleness=1), steps=1))
    assert max((skewed[k] - synchronous[k]).abs().max().item() for k in skewed) > 100 * max(gap, 1e-9)


# the resumed run saves to a directory of its own: Lightning says the stopped run's best-k bookkeeping stays behind
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_a_resume_trains_on_the_rollout_that_was_in_flight(sampled, tmp_path):
    whole = fit(ReplayEngine(sampled, max_staleness=1), steps=2)
    part = fit(ReplayEngine(sampled[:2], max_staleness=1), steps=1, tmp_path=tmp_path / "part")
    saved = torch.load(tmp_path / "part" / "step=1.ckpt", weights_only=True)
    (state,) = saved["rollout_in_flight"]  # one process: rollout 1, sent by batch 1 before its update (from w0)
    assert torch.equal(state["rollout"]["input_ids"], sampled[1].input_ids) and state["version"] == 0
    assert not same(weights(part), weights(whole))  # the stop was before the end
    # continued to 2 steps: batch 2 sends rollout 2 and trains on the saved rollout 1, as the whole run did
    engine = ReplayEngine(sampled[2:], max_staleness=1)
    resumed = fit(engine, steps=2, tmp_path=tmp_path / "resumed", resume=str(tmp_path / "part" / "step=1.ckpt"))
    assert engine.served == 1 and resumed.trainer.global_step == 2
    assert same(weights(resumed), weights(whole))


def test_each_process_takes_its_own_rollout_in_flight_and_another_count_is_refused(sampled):
    from types import SimpleNamespace

    from grpo_lightning.engines.mixin import RolloutMixin

    def state(rollout: Rollout) -> dict:
        fields = {k: v for k, v in dataclasses.asdict(rollout).items() if k != "importance_sampling"}
        return {"batch": {"prompt": [f"rows {rollout.input_ids.shape}"]}, "version": 3, "rollout": fields}

    process = RolloutMixin()
    process.engine, process.trainer, process.global_rank = ReplayEngine([]), SimpleNamespace(world_size=2), 1
    process.load_in_flight_state([state(sampled[0]), state(sampled[1])])
    batch, version, pending = process.in_flight
    assert version == 3 and torch.equal(pending.result().input_ids, sampled[1].input_ids)  # process 1's
    process.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match="rollouts in flight of 2 processes, this run has 3"):
        process.load_in_flight_state([state(sampled[0]), state(sampled[1])])
    process.in_flight = None
    process.load_in_flight_state([None, None])  # a checkpoint of a synchronous run: nothing in flight
    assert process.in_flight is None


def test_the_progress_bar_counts_the_first_step_that_only_sends():
    from types import SimpleNamespace

    from grpo_lightning.train.callbacks import GRPOProgressBar

    def total(max_staleness: int, in_flight: object = None) -> int:
        bar = GRPOProgressBar()
        module = SimpleNamespace(engine=ReplayEngine([], max_staleness), in_flight=in_flight, optimization=SimpleNamespace(mu=2))
        bar._trainer = SimpleNamespace(max_steps=8, global_step=2, lightning_module=module)
        return bar.total_train_batches

    assert total(0) == 3  # (8 - 2) optimizer steps at μ 2
    assert total(1) == 4  # one-step-off starting: one batch more
    assert total(1, in_flight=("batch", 0, "rollout")) == 3  # resumed with a rollout in flight: none more
