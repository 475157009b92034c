"""SIGTERM and SIGINT during fit: a checkpoint at the next stage boundary, a non-zero exit, an exact resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from grpo_lightning.train.cli import run
from grpo_lightning.train.distributed import restore_rng_states
from grpo_lightning.train.preemption import Preempted, Preemption, checkpoint_path
from test_train import make_config

TESTS = Path(__file__).resolve().parent
QUIET = ["--eval.before", "false", "--eval.after", "false", "--torch_threads", "1"]


class SignalAt(L.Callback):
    """A signal arrives while rollout step ``step`` is in ``stage`` (on process ``rank`` only).

    Without ``ready`` the process sends itself ``signum`` as the stage starts. With ``ready`` (a file path)
    it writes that file as the stage starts and waits, inside the stage, until a signal from outside (the
    test's) has reached the run's handler: the stage is still running when the signal comes.
    """

    def __init__(self, step: int, stage: str, signum: int = int(signal.SIGTERM), rank: int = 0, ready: str = ""):
        self.step, self.stage, self.signum, self.rank, self.ready = step, stage, signum, rank, ready

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        name = {"sampling": "_rollout", "update": "_update", "evaluation": "evaluate_batch"}[self.stage]
        original = getattr(module, name)
        (preemption,) = [c for c in trainer.callbacks if isinstance(c, Preemption)]

        def signalled(*args: Any) -> Any:
            if trainer.global_step // module.optimization.mu == self.step and trainer.global_rank == self.rank:
                if self.ready:
                    Path(self.ready).write_text("in the stage")
                else:
                    os.kill(os.getpid(), self.signum)
                while preemption.signum is None:  # (the handler has run when this is set)
                    time.sleep(0.01)
            return original(*args)

        setattr(module, name, signalled)


class SeeHandlers(L.Callback):
    """Records the name of the SIGUSR1 handler's type at each step."""

    seen: list[str] = []

    def on_train_batch_start(self, *args: Any) -> None:
        SeeHandlers.seen.append(type(signal.getsignal(signal.SIGUSR1)).__name__)


def fit_args(config: Path, out: Path, *extra: str) -> list[str]:
    # no periodic checkpoint: what the stopped run leaves is the preemption's own
    return ["fit", "--config", str(config), "--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "0",
            "--export.export_dir", str(out), *QUIET, *extra]


def signal_at(step: int, stage: str, signum: int = signal.SIGTERM) -> list[str]:
    return ["--trainer.callbacks+=test_preemption.SignalAt", f"--trainer.callbacks.step={step}",
            f"--trainer.callbacks.stage={stage}", f"--trainer.callbacks.signum={int(signum)}"]


def weights(cli: object) -> dict:
    return {k: v.clone() for k, v in cli.model.policy.state_dict().items()}


def largest_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, gsm8k_dir):
    """The uninterrupted run (3 rollout steps, μ = 1) and a maker of configs with their own directories."""
    tmp = tmp_path_factory.mktemp("preemption")

    def config(name: str) -> Path:
        return make_config(tmp, tiny_model_dir, gsm8k_dir, name, optimization={"mu": 1})

    full = weights(run(fit_args(config("full"), tmp / "full" / "out")))
    return tmp, config, full


def stopped_subprocess(tmp: Path, config: Path, stage: str) -> tuple[int, str]:
    """Run a fit in a subprocess and send it SIGTERM once it is inside ``stage`` of step 1: (status, stderr)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    ready = tmp / f"{config.stem}.ready"
    args = fit_args(config, tmp / "unused-export", *signal_at(1, stage), f"--trainer.callbacks.ready={ready}")
    with subprocess.Popen([sys.executable, "-m", "grpo_lightning.train.cli", *args], cwd=tmp, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as process:
        while not ready.exists() and process.poll() is None:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=600)
    return process.returncode, stderr


@pytest.mark.slow
@pytest.mark.parametrize("stage, steps_done", [("sampling", 1), ("update", 2)])
def test_sigterm_stops_with_a_checkpoint_that_resumes_exactly(setup, stage, steps_done):
    tmp, config, full = setup
    name = f"term-{stage}"
    status, stderr = stopped_subprocess(tmp, config(name), stage)
    assert status == 128 + signal.SIGTERM, stderr[-3000:]
    ckpt = tmp / name / "ckpt" / "last.ckpt"
    assert "stopped by SIGTERM" in stderr and f"--ckpt_path {ckpt}" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (tmp / "unused-export").exists()  # a stopped run exports nothing
    # during sampling the step is redone (1 step done); during the update it finishes first (2 done)
    assert torch.load(ckpt, weights_only=True)["global_step"] == steps_done
    resumed = run(fit_args(config(name), tmp / name / "out", "--ckpt_path", str(ckpt)))
    assert resumed.trainer.global_step == 3
    assert largest_difference(weights(resumed), full) == 0.0


def test_sigint_in_process_stops_and_resumes_exactly(setup):
    tmp, config, full = setup
    # Python's own handler, or SIG_IGN where the tests run in a background job (nohup, `&`)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Preempted) as stopped:
        run(fit_args(config("int"), tmp / "int" / "out", *signal_at(2, "sampling", signal.SIGINT)))
    assert stopped.value.exit_code == 130 and stopped.value.checkpoint == tmp / "int" / "ckpt" / "last.ckpt"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored after fit
    resumed = run(fit_args(config("int"), tmp / "int" / "out", "--ckpt_path", str(stopped.value.checkpoint)))
    assert largest_difference(weights(resumed), full) == 0.0


def test_a_signal_during_the_first_evaluation_stops_before_the_first_step(setup):
    tmp, config, full = setup
    args = fit_args(config("eval"), tmp / "eval" / "out", "--eval.before", "true", *signal_at(0, "evaluation", signal.SIGINT))
    with pytest.raises(Preempted, match="stopped by SIGINT before the step after optimizer step 0") as stopped:
        run(args)
    ckpt = torch.load(stopped.value.checkpoint, weights_only=True)
    assert ckpt["global_step"] == 0 and ckpt["callbacks"]["AccuracyCallback"]["accuracy_before"] is not None


class FakeTrainer:
    def __init__(self, dirpath: str | None):
        from lightning.pytorch.callbacks import ModelCheckpoint

        self.checkpoint_callback = ModelCheckpoint(dirpath=dirpath) if dirpath else None
        self.default_root_dir, self.received_sigterm = "root", False


def test_checkpoint_path_is_what_ckpt_path_last_finds():
    assert checkpoint_path(FakeTrainer("/runs/ckpt")) == Path("/runs/ckpt/last.ckpt")
    assert checkpoint_path(FakeTrainer(None)) == Path("root/last.ckpt")


def test_handlers_leave_slurm_requeue_signal_alone():
    """SIGTERM and SIGINT are taken over during training; SIGUSR1 (Lightning's SLURM requeue) is not touched."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    sentinel = lambda signum, frame: None  # noqa: E731 (stands for Lightning's requeue handler)
    signal.signal(signal.SIGUSR1, sentinel)
    try:
        callback = Preemption()
        callback.on_train_start(FakeTrainer(None), None)
        assert signal.getsignal(signal.SIGTERM) == callback._handle and signal.getsignal(signal.SIGINT) == callback._handle
        assert signal.getsignal(signal.SIGUSR1) is sentinel
        callback.on_train_end(None, None)
        assert signal.getsignal(signal.SIGTERM) == before[signal.SIGTERM]
        assert signal.getsignal(signal.SIGINT) == before[signal.SIGINT]  # (SIG_IGN where the tests run in a background job)
        assert signal.getsignal(signal.SIGUSR1) is sentinel
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_restore_rng_states_takes_this_process_state_and_warns_on_another_count():
    torch.manual_seed(3)
    from grpo_lightning.core.random_state import rng_state

    state = rng_state()
    expected = torch.rand(2)
    assert restore_rng_states([state], rank=0, world=1) is None
    assert torch.equal(torch.rand(2), expected)  # the same draws as after seeding
    assert "random states of 1 processes, this run has 2" in restore_rng_states([state], rank=0, world=2)


@pytest.mark.slow
def test_two_processes_stop_together_when_one_is_signalled(tmp_path):
    """Process 1 alone gets SIGTERM while sampling step 1: both stop there, one checkpoint holds both states."""
    from test_distributed import DDP, config

    cfg = config(tmp_path, "ddp", optimization={"mu": 1})
    args = ["fit", "--config", str(cfg), "--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "0", *QUIET,
            *DDP, *signal_at(1, "sampling"), "--trainer.callbacks.rank=1"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "grpo_lightning.train.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-4000:]
    ckpt = torch.load(tmp_path / "ddp" / "ckpt" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1 and len(ckpt["rng_states"]) == 2  # before step 1's update, on both
    assert done.stderr.count("Resume with:") == 1  # printed once, by process 0
    assert not (tmp_path / "ddp" / "export").exists()


def test_a_requeued_slurm_job_resumes_from_lightnings_hpc_checkpoint(setup, monkeypatch):
    """Lightning's SLURM requeue still works: SIGUSR1 is its handler during fit, and a requeued job resumes."""
    tmp, config, full = setup
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "grpo", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}
    for key, value in slurm.items():
        monkeypatch.setenv(key, value)
    SeeHandlers.seen = []
    first = run(fit_args(config("slurm"), tmp / "slurm" / "out", "--trainer.max_steps", "1",
                         "--trainer.callbacks+=test_preemption.SeeHandlers"))
    assert SeeHandlers.seen == ["_HandlersCompose"]  # Lightning's requeue handler, untouched
    # what Lightning's SIGUSR1 handler writes before it requeues the job
    first.trainer.save_checkpoint(tmp / "slurm" / "hpc_ckpt_1.ckpt")
    requeued = run(fit_args(config("slurm"), tmp / "slurm" / "out2"))  # no --ckpt_path, as a requeued job runs
    assert requeued.trainer.global_step == 3
    assert (Path(requeued.trainer.log_dir) / "config-2.yaml").is_file()  # the first run's config.yaml kept
    assert largest_difference(weights(requeued), full) == 0.0
