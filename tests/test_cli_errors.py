"""Bad input through the command line: one message naming the option, file or row; no traceback; nothing written.

Each case runs ``grpo-lightning fit`` (the console script's ``main``, in this process: 20 subprocesses would
cost minutes) in a fresh run directory; two run as real subprocesses, to check the exit status the shell sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grpo_lightning.train.cli import main
from test_checkpoints import fake_checkpoint
from test_train import make_config

QUIET = ["--eval.before", "false", "--eval.after", "false", "--torch_threads", "1"]


def jsonl(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def inputs(tmp: Path, real_ckpt: Path) -> dict[str, tuple[list[str], str]]:
    """Each bad input: (arguments added to a good fit, what the message must say)."""
    (tmp / "in").mkdir()
    full = (tmp / "in" / "export")
    full.mkdir()
    (full / "keep.txt").write_text("an earlier export")
    (tmp / "in" / "cut.ckpt").write_bytes(real_ckpt.read_bytes()[:5000])
    (tmp / "in" / "notes.ckpt").write_text("not a checkpoint")
    (tmp / "in" / "empty.jsonl").write_text("")
    return {
        "missing model": (["--model.model_name_or_path", "./no/such/model"], "model path ./no/such/model does not exist"),
        "missing data": (["--data.source", "./missing.jsonl"], "data source ./missing.jsonl does not exist"),
        "empty data": (["--data.source", str(tmp / "in" / "empty.jsonl")], "empty.jsonl (train) holds no records"),
        "malformed data": (["--data.source", jsonl(tmp / "in" / "bad.jsonl", ["{oops"])], "bad.jsonl:1: not a JSON object"),
        "no ####": (["--data.source", jsonl(tmp / "in" / "plain.jsonl", [{"question": "q", "answer": "4"}])],
                    "plain.jsonl:1: 'answer' has no final answer"),
        "G = 1": (["--model.sampling.num_generations", "1"], "model.sampling.num_generations must be at least 2"),
        "loss type": (["--model.loss.loss_type", "ppo"], "model.loss.loss_type must be one of"),
        "T = 0": (["--model.sampling.temperature", "0"], "model.sampling.temperature must be positive"),
        "batch size 0": (["--data.batch_size", "0"], "data.batch_size must be at least 1"),
        "max_new_tokens 0": (["--model.sampling.max_new_tokens", "0"], "model.sampling.max_new_tokens must be at least 1"),
        "max_steps vs mu": (["--trainer.max_steps", "5"], "trainer.max_steps (5) counts optimizer steps and must be a multiple of model.optimization.mu (2)"),
        "reward module": (["--model.loss.reward_funcs", "[no_such_module.reward]"], "cannot import 'no_such_module.reward'"),
        "reward not callable": (["--model.loss.reward_funcs", "[grpo_lightning.core.scoring.DEFAULT_REWARD_FUNCS]"], "is not callable"),
        "data field": (["--data.question_field", "problem"], "train.jsonl:1: missing text field 'problem'"),
        "export dir": (["--export.export_dir", str(full)], f"export directory {full} is not empty"),
        "truncated ckpt": (["--ckpt_path", str(tmp / "in" / "cut.ckpt")], "cut.ckpt is truncated or corrupt"),
        "not a ckpt": (["--ckpt_path", str(tmp / "in" / "notes.ckpt")], "notes.ckpt is not a checkpoint"),
        "torch_threads 0": (["--torch_threads", "0"], "torch_threads must be at least 1"),
        "skips -1": (["--model.optimization.max_consecutive_skips", "-1"], "model.optimization.max_consecutive_skips must be 0 (never stop) or more"),
        "malloc 0": (["--malloc_mmap_threshold", "0"], "malloc_mmap_threshold must be in"),
    }


def listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory, tiny_model_dir, gsm8k_dir) -> Path:
    tmp = tmp_path_factory.mktemp("real")
    config = make_config(tmp, tiny_model_dir, gsm8k_dir, "real", optimization={"mu": 1})
    main(["fit", "--config", str(config), "--trainer.max_steps", "1", *QUIET])
    return tmp / "real" / "ckpt" / "last.ckpt"


def test_bad_inputs_stop_with_one_message_and_write_nothing(tmp_path, tiny_model_dir, gsm8k_dir, real_checkpoint, capsys):
    cases = inputs(tmp_path, real_checkpoint)
    assert len(cases) >= 15
    given = listing(tmp_path / "in")
    for name, (args, message) in cases.items():
        config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, name.replace(" ", "_"))
        with pytest.raises(SystemExit) as stopped:
            main(["fit", "--config", str(config), *QUIET, *args])
        err = capsys.readouterr().err
        assert stopped.value.code == 2, (name, err[-2000:])
        assert message in err and "Traceback" not in err, (name, err[-2000:])
        assert err.strip().splitlines()[-2].startswith("grpo-lightning: error: "), (name, err[-500:])
        run_dir = tmp_path / name.replace(" ", "_")
        assert listing(run_dir) == {}, (name, list(listing(run_dir)))  # at most empty directories remain
    assert listing(tmp_path / "in") == given  # no input file was changed or removed


@pytest.mark.parametrize("problem", ["corrupt", "another model"])
def test_ckpt_path_last_names_the_bad_file_and_keeps_it(tmp_path, tiny_model_dir, gsm8k_dir, real_checkpoint, capsys, problem):
    config = make_config(tmp_path, tiny_model_dir, gsm8k_dir, "last")
    ckpt_dir = tmp_path / "last" / "ckpt"
    ckpt_dir.mkdir(parents=True)
    older = ckpt_dir / "step=1.ckpt"
    older.write_bytes(real_checkpoint.read_bytes())
    os.utime(older, (1, 1))
    if problem == "corrupt":
        (ckpt_dir / "last.ckpt").write_bytes(real_checkpoint.read_bytes()[:-100])
        expected = f"checkpoint {ckpt_dir / 'last.ckpt'} is truncated or corrupt"
    else:
        torch.save(fake_checkpoint(w=torch.zeros(1)), ckpt_dir / "last.ckpt")
        expected = f"checkpoint {ckpt_dir / 'last.ckpt'} belongs to another model (saved from model m)"
    before = listing(tmp_path / "last")
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "--config", str(config), *QUIET, "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and expected in err, err[-2000:]
    assert f"readable older checkpoints: {older} (step 1)" in err
    assert listing(tmp_path / "last") == before  # both checkpoints kept as they were, nothing added


def cli_subprocess(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grpo_lightning.train.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.slow
def test_the_shell_sees_status_2_and_the_traceback_only_when_asked(tmp_path, tiny_model_dir, gsm8k_dir):
    config = str(make_config(tmp_path, tiny_model_dir, gsm8k_dir, "shell"))
    args = ["fit", "--config", config, *QUIET, "--model.sampling.num_generations", "1"]
    done = cli_subprocess(args)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "grpo-lightning: error: model.sampling.num_generations must be at least 2 (advantages compare samples), got 1" in done.stderr
    shown = cli_subprocess(args, GRPO_TRACEBACK="1")
    # the stack down to the check that raised (plain or, where pretty_errors is installed, reformatted)
    assert shown.returncode == 1 and "__post_init__" in shown.stderr
    assert listing(tmp_path / "shell") == {}


def test_stops_on_a_signal_are_not_reported_as_success(monkeypatch, capsys):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import grpo_lightning.train.cli as cli

    def stopped_by_lightning(args):  # Lightning's own SIGTERM stop is a SystemExit whose code is None (0)
        raise SIGTERMException()

    monkeypatch.setattr(cli, "run", stopped_by_lightning)
    with pytest.raises(SystemExit) as stopped:
        main(["validate", "--config", "c.yaml"])
    assert stopped.value.code == 143 and "stopped by SIGTERM" in capsys.readouterr().err
    assert cli.resume_command(["fit", "--config", "a b.yaml"], Path("/r/last.ckpt")) == (
        "grpo-lightning fit --config 'a b.yaml' --ckpt_path /r/last.ckpt"
    )
