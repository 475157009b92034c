"""The vLLM server engine: rollouts sampled by a ``vllm serve`` process (TRL's ``vllm_mode: server``).

The engine samples through ``/v1/completions`` with the prompts' token ids, reads back each sampled token's id
and log-prob (``return_token_ids``, ``logprobs: 0``) and builds the same :class:`Rollout` as the colocated
engine, so the importance-sampling correction works unchanged. The server must run with ``--generation-config
vllm`` and ``--logprobs-mode processed_logprobs``: otherwise unset sampling fields come from the model's
generation config and the log-probs ignore the temperature. (HTTP and the server process:
:mod:`~grpo_lightning.engines.server_connection`.)

Weights: after each update the engine's copy is stale; the next rollout writes the policy's weights (LoRA
merged; FSDP2 shards gathered one weight at a time) as safetensors into a fresh directory (written under a
temporary name, then renamed: the server never sees half a file; a fresh directory per version because vLLM
may keep re-reading a cached one), calls ``reload_weights(weights_path=...)`` on every worker through the
dev-mode route ``/collective_rpc``, then resets the prefix cache. This is the route that works on the CPU. It
needs the server to read the trainer's disk: a managed server, or one on the same machine. On GPUs vLLM's NCCL
weight transfer would avoid the disk; it is not implemented here.

Several training processes share one server: process 0 starts (or checks) it and pushes the weights, once
per step; every process samples its own prompts. Each of these stages ends in a collective that hands every
process the outcome, so a failure on one process stops all of them with the same message instead of leaving
the others waiting.

``max_staleness: 1`` samples the next step's rollout while the trainer updates on this one (:meth:`_submit`
returns at once; the mixin :class:`~grpo_lightning.engines.mixin.RolloutMixin` keeps it one step).

With no ``url`` the engine starts the server itself on 127.0.0.1 (a free port, ``VLLM_SERVER_DEV_MODE=1``) and
stops it at :meth:`close` (the module's teardown), at exit, or when this process dies (the server gets SIGTERM
from the kernel). Every wait is bounded; a server that cannot be reached, dies, or serves another model or
tokenizer raises :class:`VLLMServerError` naming the URL.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from grpo_lightning.core.importance import ImportanceSampling
from grpo_lightning.core.types import Rollout
from grpo_lightning.engines.base import PendingRollout, RolloutEngine, SamplingCall, build_rollout
from grpo_lightning.engines.server_connection import ServerConnection, VLLMServerError, free_port
from grpo_lightning.engines.vllm import policy_weights, sampling_options
from grpo_lightning.hf.models import causal_lm, eos_token_ids
from grpo_lightning.hf.passes import bare_model

__all__ = ["VLLMServerEngine", "VLLMServerError", "free_port"]

OPTION = "model.rollout.init_args"
SERVED_NAME = "policy"


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _from_process_0(value: Any) -> Any:
    """Process 0's ``value`` (picklable) on every process."""
    if _rank_and_world()[1] == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _outcome(error: str | None, first_only: bool) -> None:
    """Raise ``error`` on every process if any process has one: process 0's (``first_only``) or every process's."""
    world = _rank_and_world()[1]
    if first_only:
        error = _from_process_0(error)
    elif world > 1:
        errors = [None] * world
        torch.distributed.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise VLLMServerError(error)


class VLLMServerEngine(ServerConnection, RolloutEngine):
    """Samples rollouts from a vLLM server, managed by the engine or started by the user.

    Args:
        url: The server's base URL (``http://host:port``); ``None`` to start one on 127.0.0.1.
        api_key: Passed to a managed server (``--api-key``) and sent as a bearer token. It guards ``/v1`` only,
            not the dev routes: never expose a dev-mode server beyond a trusted network.
        model_name: The name the server serves the policy under (``--served-model-name``); checked at start.
        dtype: A managed server's weights dtype.
        max_model_len: A managed server's longest prompt + completion; ``None`` for the model's own.
        kv_cache_space: GiB of KV cache of a managed server on the CPU (``VLLM_CPU_KVCACHE_SPACE``).
        log_path: Where a managed server writes its log; ``None`` for ``vllm-server.log`` in the run's log directory.
        startup_timeout: Seconds a server may take to become healthy.
        request_timeout: Seconds one request may take.
        retries: Further tries of a request that failed to connect or timed out.
        importance_sampling: The correction for the gap between the server's log-probs and the trainer's.
        max_staleness: 0 samples each step's rollout from its own weights; 1 samples it during the previous
            step's update, from the weights before that update (one-step-off; docs/vllm.md).
        weights_dir: Where process 0 writes the weights it pushes: a directory the server can read (on a
            filesystem both machines share when the server runs on another); ``None`` for a temporary directory.
    """

    collective = True  # with several processes each call ends in a collective: all must call it as often

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        model_name: str = SERVED_NAME,
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_space: int = 1,
        log_path: str | None = None,
        startup_timeout: float = 300.0,
        request_timeout: float = 300.0,
        retries: int = 2,
        importance_sampling: ImportanceSampling | None = ImportanceSampling(),
        max_staleness: int = 0,
        weights_dir: str | None = None,
    ):
        if startup_timeout <= 0 or request_timeout <= 0 or retries < 0:
            raise ValueError(f"{OPTION}: the timeouts must be positive and retries at least 0")
        if max_staleness not in (0, 1):
            raise ValueError(f"{OPTION}.max_staleness must be 0 (synchronous) or 1 (one-step-off), got {max_staleness}")
        super().__init__(url, api_key, startup_timeout, request_timeout, retries)
        self.managed = url is None
        self.model_name, self.dtype, self.max_model_len = model_name, dtype, max_model_len
        self.kv_cache_space, self.log_path = kv_cache_space, log_path
        self.importance_sampling, self.max_staleness, self.weights_dir = importance_sampling, max_staleness, weights_dir
        self.started, self.stale = False, False
        self.timings: dict[str, float] = {}
        self._workdir: str | None = None  # made when the server starts (process 0)
        self._weights: str | None = None  # the directory of the version the server holds
        self._sampler: ThreadPoolExecutor | None = None  # one request in flight, made at the first
        self._in_flight: Future | None = None
        atexit.register(self.close)

    # --- the server's life ----------------------------------------------------------------------------------------

    def _start(self, policy: Any, tokenizer: Any) -> None:
        """Start (or reach) the server on process 0, wait until it is healthy, check that it serves this policy's
        tokenizer, and hand every process its URL."""
        weights = self._gathered_weights(policy)  # every process under FSDP2: a collective
        error = None
        if _rank_and_world()[0] == 0:
            try:
                self._start_here(policy, tokenizer, weights)
            except VLLMServerError as e:
                error = str(e)
        url, error = _from_process_0((self.url, error))
        if error:
            raise VLLMServerError(error)
        self.url, self.started = url, True

    def _start_here(self, policy: Any, tokenizer: Any, weights: dict[str, torch.Tensor]) -> None:
        if self.weights_dir:
            os.makedirs(self.weights_dir, exist_ok=True)
        self._workdir = self._workdir or tempfile.mkdtemp(prefix="grpo-vllm-server-", dir=self.weights_dir)
        if self.url is None:
            model_dir = self._write_weights(weights, policy, tokenizer)
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            # not the vllm console script: vllm-cpu's reads the version of a distribution named vllm and fails
            command = [
                sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port),
                "--served-model-name", self.model_name, "--generation-config", "vllm", "--logprobs-mode", "processed_logprobs",
                "--dtype", self.dtype, "--enforce-eager", "--disable-log-stats",
            ]
            if self.max_model_len:
                command += ["--max-model-len", str(self.max_model_len)]
            if self.api_key:
                command += ["--api-key", self.api_key]
            env = dict(os.environ, VLLM_SERVER_DEV_MODE="1", VLLM_CPU_KVCACHE_SPACE=str(self.kv_cache_space))
            self._launch(command, env, self.log_path or os.path.join(self.run_dir or self._workdir, "vllm-server.log"))
        self._wait_healthy()
        self._check_model(tokenizer)
        if self.process is None:  # a user's server holds its own weights: push ours before the first rollout
            self._push_here(weights)

    def _check_model(self, tokenizer: Any) -> None:
        served = [m.get("id") for m in self._request("/v1/models").get("data", [])]
        if self.model_name not in served:
            raise VLLMServerError(f"the vLLM server at {self.url} serves {served}, expected the model {self.model_name!r}")
        probe = "Hello world, 12 + 7 = 19."
        theirs = self._request("/tokenize", {"model": self.model_name, "prompt": probe, "add_special_tokens": False})["tokens"]
        ours = tokenizer(probe, add_special_tokens=False).input_ids
        if theirs != ours:
            raise VLLMServerError(f"the vLLM server at {self.url} tokenizes {probe!r} as {theirs}, the policy's tokenizer as {ours}")

    # --- weights --------------------------------------------------------------------------------------------------

    def _gathered_weights(self, policy: Any) -> dict[str, torch.Tensor] | None:
        """The policy's weights on the CPU on process 0, None elsewhere. Sharded (FSDP2), every process gathers
        each weight in turn (a collective) and process 0 keeps its copy: one full weight at a time on the device."""
        keep = _rank_and_world()[0] == 0
        if not keep and not any(isinstance(p, DTensor) for p in policy.parameters()):  # (FSDP2 shards the layers)
            return None
        weights = {}
        with torch.no_grad():
            for name, w in policy_weights(policy):
                if keep:
                    weights[name] = w.detach().to("cpu").contiguous()
        # tied weights share storage; safetensors refuses shared tensors
        seen: set[int] = set()
        for name, w in weights.items():
            if w.untyped_storage().data_ptr() in seen:
                weights[name] = w.clone()
            seen.add(weights[name].untyped_storage().data_ptr())
        return weights if keep else None

    def _write_weights(self, weights: dict[str, torch.Tensor], policy: Any = None, tokenizer: Any = None) -> str:
        """``weights`` (and with ``tokenizer``, the policy's config and tokenizer) in a fresh directory, renamed
        into place once complete."""
        from safetensors.torch import save_file

        final = tempfile.mkdtemp(prefix="v", dir=self._workdir)
        partial = final + ".partial"
        os.makedirs(partial)
        save_file(weights, os.path.join(partial, "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            lm = causal_lm(policy)
            lm.config.save_pretrained(partial)
            lm.generation_config.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
        os.rmdir(final)
        os.rename(partial, final)
        return final

    def _push(self, policy: Any) -> None:
        """The policy's weights into the server, once for all processes (process 0 pushes)."""
        clock = time.perf_counter()
        if self._in_flight is not None:  # a rollout in flight finishes on the weights it started with
            self._in_flight.exception()
        weights = self._gathered_weights(policy)
        error = None
        if weights is not None:
            try:
                self._push_here(weights)
            except VLLMServerError as e:
                error = str(e)
        _outcome(error, first_only=True)
        self.stale = False
        self.timings["weight_sync"] = time.perf_counter() - clock

    def _push_here(self, weights: dict[str, torch.Tensor]) -> None:
        directory = self._write_weights(weights)
        self._request("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": directory}})
        self._request("/reset_prefix_cache", {})  # cached prompt KV was computed with the old weights
        if self._weights is not None:
            shutil.rmtree(self._weights, ignore_errors=True)
        self._weights = directory

    def update_weights(self, policy: Any) -> None:
        self.stale = True  # pushed lazily: μ optimizer steps in a row cost one push

    def close(self) -> None:
        """Stop a managed server (SIGTERM, then SIGKILL after 20 s) and remove the engine's files."""
        if getattr(self, "_sampler", None) is not None:  # a request in flight fails once its server stops
            self._sampler.shutdown(wait=False, cancel_futures=True)
        self._sampler, self._in_flight = None, None
        self._stop()
        if getattr(self, "_workdir", None) is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        # a later generate (another stage of the same run) starts afresh
        self._workdir, self._weights, self.started = None, None, False
        if self.managed:
            self.url = None

    # --- sampling ------------------------------------------------------------------------------------------------

    def _generate(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: SamplingCall
    ) -> Rollout:
        return self._submit(policy, tokenizer, prompts, num_generations, max_new_tokens, options).result()

    def _submit(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: SamplingCall
    ) -> PendingRollout:
        """Push the weights if stale, send the request and return at once; the rollout is built when asked for."""
        asked = sampling_options(options.generation_kwargs, options.use_model_generation_config)
        self.timings = {}
        policy = bare_model(policy)
        if not self.started:
            self._start(policy, tokenizer)
        elif self.stale:
            self._push(policy)
        device = next(policy.parameters()).device
        eos_ids = eos_token_ids(causal_lm(policy), tokenizer)
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
        G = num_generations
        body = {
            "model": self.model_name, "prompt": [ids[m.bool()].tolist() for ids, m in zip(enc.input_ids, enc.attention_mask)],
            "n": G, "max_tokens": max_new_tokens, "min_tokens": asked["min_tokens"],
            "temperature": 0.0 if asked["greedy"] else options.temperature, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
            "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
            "stop_token_ids": eos_ids, "logprobs": 0, "return_token_ids": True, "skip_special_tokens": False,
        }
        clock = time.perf_counter()
        self._sampler = self._sampler or ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-server")
        self._in_flight = future = self._sampler.submit(self._request, "/v1/completions", body)

        def finish() -> Rollout:
            error = None
            try:
                choices = sorted(future.result()["choices"], key=lambda c: c["index"])  # [B*G]
                if len(choices) != len(prompts) * G:
                    error = f"the vLLM server at {self.url} returned {len(choices)} completions, expected {len(prompts) * G}"
            except VLLMServerError as e:
                error = str(e)
            _outcome(error, first_only=False)  # every process sampled, or every process stops
            self.timings["server_generate"] = time.perf_counter() - clock  # (async: includes the overlapped update)
            completions = [torch.tensor(c["token_ids"], dtype=torch.long, device=device) for c in choices]
            # -inf comes back as -9999.0; the sampled token's log-prob is never -inf
            logprobs = [torch.tensor(c["logprobs"]["token_logprobs"], dtype=torch.float32, device=device) for c in choices]
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
            prompt_ids, prompt_mask = enc.input_ids.repeat_interleave(G, dim=0), enc.attention_mask.repeat_interleave(G, dim=0)
            rollout = build_rollout(prompt_ids, prompt_mask, completions, eos_ids, pad_id, tokenizer, logprobs)  # [B*G, P]
            rollout.importance_sampling = self.importance_sampling
            return rollout

        return PendingRollout(finish)
