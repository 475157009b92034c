"""The vLLM server engine: rollouts sampled by a ``vllm serve`` process (TRL's ``vllm_mode: server``).

The engine talks HTTP only. It samples through ``/v1/completions`` with the prompts' token ids, reads back each
sampled token's id and log-prob (``return_token_ids``, ``logprobs: 0``) and builds the same :class:`Rollout` as
the colocated engine, so the importance-sampling correction works unchanged. The server must run with
``--generation-config vllm`` and ``--logprobs-mode processed_logprobs``: otherwise unset sampling fields come
from the model's generation config and the log-probs ignore the temperature.

Weights: after each update the engine's copy is stale; the next rollout writes the policy's weights (LoRA
merged) as safetensors into a fresh directory (written under a temporary name, then renamed: the server never
sees half a file; a fresh directory per version because vLLM may keep re-reading a cached one), calls
``reload_weights(weights_path=...)`` on every worker through the dev-mode route ``/collective_rpc``, then resets
the prefix cache. This is the route that works on the CPU. It needs the server to read the trainer's disk: a
managed server, or one on the same machine. On GPUs vLLM's NCCL weight transfer would avoid the disk; it is
not implemented here.

With no ``url`` the engine starts the server itself on 127.0.0.1 (a free port, ``VLLM_SERVER_DEV_MODE=1``) and
stops it at :meth:`close` (the module's teardown), at exit, or when this process dies (the server gets SIGTERM
from the kernel). Every wait is bounded; a server that cannot be reached, dies, or serves another model or
tokenizer raises :class:`VLLMServerError` naming the URL.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

import torch

from grpo_lightning.core.importance import ImportanceSampling
from grpo_lightning.core.types import Rollout
from grpo_lightning.engines.base import RolloutEngine, SamplingCall, build_rollout
from grpo_lightning.engines.vllm import policy_weights, sampling_options
from grpo_lightning.hf.models import causal_lm, eos_token_ids
from grpo_lightning.hf.passes import bare_model

OPTION = "model.rollout.init_args"
SERVED_NAME = "policy"


class VLLMServerError(ConnectionError):
    """The vLLM server cannot serve the run: the message names its URL and what was expected."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # in the child, before exec: the kernel sends SIGTERM when the trainer dies
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VLLMServerEngine(RolloutEngine):
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
    """

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
    ):
        if startup_timeout <= 0 or request_timeout <= 0 or retries < 0:
            raise ValueError(f"{OPTION}: the timeouts must be positive and retries at least 0")
        self.url = url.rstrip("/") if url else None
        self.managed = url is None
        self.api_key, self.model_name, self.dtype, self.max_model_len = api_key, model_name, dtype, max_model_len
        self.kv_cache_space, self.log_path = kv_cache_space, log_path
        self.startup_timeout, self.request_timeout, self.retries = startup_timeout, request_timeout, retries
        self.importance_sampling = importance_sampling
        self.process: subprocess.Popen | None = None
        self.started, self.stale = False, False
        self.timings: dict[str, float] = {}
        self._workdir: str | None = None  # made when the server starts
        self._weights: str | None = None  # the directory of the version the server holds
        atexit.register(self.close)

    # --- HTTP ---------------------------------------------------------------------------------------------------

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None, retries: int | None = None) -> Any:
        """One JSON request, retried on connection failures and timeouts; a clear error when they run out."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        last: Exception | None = None
        for attempt in range(1 + (self.retries if retries is None else retries)):
            self._check_alive()
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=timeout or self.request_timeout) as answer:
                    text = answer.read().decode()
                    return json.loads(text) if text else None
            except urllib.error.HTTPError as e:  # the server answered: retrying will not change its mind
                raise VLLMServerError(f"the vLLM server at {self.url} refused {path}: HTTP {e.code} {e.read().decode()[:300]}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = e
                time.sleep(min(2.0 ** attempt, 10.0))
        self._check_alive()
        raise VLLMServerError(f"the vLLM server at {self.url} did not answer {path}: {last}") from last

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise VLLMServerError(
                f"the managed vLLM server at {self.url} exited with status {self.process.returncode}; its log: {self.log_file}"
            )

    # --- the server's life ----------------------------------------------------------------------------------------

    def _start(self, policy: Any, tokenizer: Any) -> None:
        """Start (or reach) the server, wait until it is healthy, and check that it serves this policy's tokenizer."""
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError(
                f"{OPTION}: the vLLM server engine runs with one training process for now (each would push its own "
                "weights); use the colocated grpo_lightning.engines.vllm.VLLMEngine under DDP or FSDP2"
            )
        self._workdir = self._workdir or tempfile.mkdtemp(prefix="grpo-vllm-server-")
        if self.url is None:
            model_dir = self._write_weights(policy, tokenizer)
            port = free_port()
            self.url = f"http://127.0.0.1:{port}"
            self.log_file = self.log_path or os.path.join(self.run_dir or self._workdir, "vllm-server.log")
            os.makedirs(os.path.dirname(os.path.abspath(self.log_file)), exist_ok=True)
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
            with open(self.log_file, "ab") as log:
                # its own process group: close() stops the engine-core processes the server spawns too
                self.process = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent, start_new_session=True
                )
        else:
            self.log_file = "(not managed)"
        deadline = time.monotonic() + self.startup_timeout
        while True:
            try:
                self._request("/health", timeout=5, retries=0)
                break
            except VLLMServerError as e:
                if self.process is not None and self.process.poll() is not None or time.monotonic() > deadline:
                    raise VLLMServerError(f"{e} (waited up to {self.startup_timeout:.0f} s for /health)") from None
                time.sleep(1.0)
        self.started = True
        self._check_model(tokenizer)
        if self.process is None:  # a user's server holds its own weights: push ours before the first rollout
            self._push(policy)

    def _check_model(self, tokenizer: Any) -> None:
        served = [m.get("id") for m in self._request("/v1/models").get("data", [])]
        if self.model_name not in served:
            raise VLLMServerError(f"the vLLM server at {self.url} serves {served}, expected the model {self.model_name!r}")
        probe = "Hello world, 12 + 7 = 19."
        theirs = self._request("/tokenize", {"model": self.model_name, "prompt": probe, "add_special_tokens": False})["tokens"]
        ours = tokenizer(probe, add_special_tokens=False).input_ids
        if theirs != ours:
            raise VLLMServerError(f"the vLLM server at {self.url} tokenizes {probe!r} as {theirs}, the policy's tokenizer as {ours}")

    def _write_weights(self, policy: Any, tokenizer: Any | None = None) -> str:
        """The policy's weights (and, the first time, its config and tokenizer) in a fresh directory, renamed
        into place once complete."""
        from safetensors.torch import save_file

        final = tempfile.mkdtemp(prefix="v", dir=self._workdir)
        partial = final + ".partial"
        os.makedirs(partial)
        with torch.no_grad():
            weights = {name: w.detach().to("cpu").contiguous() for name, w in policy_weights(policy)}
        # tied weights share storage; safetensors refuses shared tensors
        seen: set[int] = set()
        for name, w in weights.items():
            if w.untyped_storage().data_ptr() in seen:
                weights[name] = w.clone()
            seen.add(weights[name].untyped_storage().data_ptr())
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
        clock = time.perf_counter()
        directory = self._write_weights(policy)
        self._request("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": directory}})
        self._request("/reset_prefix_cache", {})  # cached prompt KV was computed with the old weights
        if self._weights is not None:
            shutil.rmtree(self._weights, ignore_errors=True)
        self._weights, self.stale = directory, False
        self.timings["weight_sync"] = time.perf_counter() - clock

    def update_weights(self, policy: Any) -> None:
        self.stale = True  # pushed lazily: μ optimizer steps in a row cost one push

    def close(self) -> None:
        """Stop a managed server (SIGTERM, then SIGKILL after 20 s) and remove the engine's files."""
        if getattr(self, "_workdir", None) is None:
            return
        process, self.process = self.process, None
        if process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)  # the group: the server and the engine core it spawned
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # whatever of the group is left
            process.wait(timeout=10)
        shutil.rmtree(self._workdir, ignore_errors=True)
        # a later generate (another stage of the same run) starts afresh
        self._workdir, self._weights, self.started = None, None, False
        if self.managed:
            self.url = None

    # --- sampling ------------------------------------------------------------------------------------------------

    def _generate(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: SamplingCall
    ) -> Rollout:
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
        choices = sorted(self._request("/v1/completions", body)["choices"], key=lambda c: c["index"])  # [B*G]
        self.timings["server_generate"] = time.perf_counter() - clock
        if len(choices) != len(prompts) * G:
            raise VLLMServerError(f"the vLLM server at {self.url} returned {len(choices)} completions, expected {len(prompts) * G}")
        completions = [torch.tensor(c["token_ids"], dtype=torch.long, device=device) for c in choices]
        # -inf comes back as -9999.0; the sampled token's log-prob is never -inf
        logprobs = [torch.tensor(c["logprobs"]["token_logprobs"], dtype=torch.float32, device=device) for c in choices]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        prompt_ids, prompt_mask = enc.input_ids.repeat_interleave(G, dim=0), enc.attention_mask.repeat_interleave(G, dim=0)
        rollout = build_rollout(prompt_ids, prompt_mask, completions, eos_ids, pad_id, tokenizer, logprobs)  # [B*G, P]
        rollout.importance_sampling = self.importance_sampling
        return rollout
