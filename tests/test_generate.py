"""Rollouts (engines/generate.py) and the log-prob passes over them (hf/passes.py): EOS ids, positions,
samples conditioned on the prompt and drawn from the distribution the loss scores, the shared-prompt pass."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lightning.engines.generate import generate_rollout
from grpo_lightning.hf.models import eos_token_ids, is_checkpointing, set_checkpointing
from grpo_lightning.hf.passes import position_ids, sequence_logprobs


def test_eos_ids_from_generation_config_and_tokenizer(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.generation_config.eos_token_id = [7, 3]  # Qwen declares two EOS ids
    assert eos_token_ids(model, tokenizer) == [0, 3, 7]  # plus the tokenizer's <|endoftext|> = 0


def test_position_ids_skip_left_padding():
    assert position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


PROMPTS = ["Natalia sold clips to 48 of her friends in April.", "Weng earns $12 an hour for babysitting."]


def _policy_in_training_setup(path):
    """The policy as the training loop holds it: train mode, gradient checkpointing on."""
    model = AutoModelForCausalLM.from_pretrained(path)
    set_checkpointing(model, True)
    model.train()
    return model, AutoTokenizer.from_pretrained(path)


def test_samples_are_conditioned_on_the_prompt(tiny_model_dir):
    """The sampler's log-probs equal a teacher-forced forward of the whole sequence (prompt included).

    Had sampling run the checkpointed decoder in train mode, the decoder layers would drop the KV cache
    while ``generate`` feeds one token per step: each step would see only its last token, and its
    log-probs would differ from the full-context ones by far more than rounding.
    """
    model, tokenizer = _policy_in_training_setup(tiny_model_dir)
    torch.manual_seed(0)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 2, 24, temperature=1.0, record_logprobs=True)
    assert model.training and is_checkpointing(model)  # the training state is restored afterwards
    mask = rollout.completion_mask.bool()
    with torch.no_grad():
        model.eval()
        teacher = sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    gap = (teacher - rollout.sample_logprobs)[mask].abs().max().item()
    assert gap < 1e-4, f"sampled log-probs differ from the full-context forward by {gap}"


def test_samples_come_from_the_distribution_the_loss_scores(tiny_model_dir):
    """At T = 0.7 the sampler's own log-probs of its tokens equal the training pass's within 1e-4.

    The model declares Qwen2.5-Instruct's top-k 20, top-p 0.8 and repetition penalty 1.05: by default
    sampling ignores them and draws from softmax(logits / T), and the log-prob pass divides by T too.
    With the seed's option (the model's generation config) the sampler draws from a narrower distribution.
    """
    model, tokenizer = _policy_in_training_setup(tiny_model_dir)
    model.generation_config.update(do_sample=True, top_k=20, top_p=0.8, repetition_penalty=1.05)
    gaps = {}
    for use_model_config in (False, True):
        torch.manual_seed(0)
        rollout = generate_rollout(
            model, tokenizer, PROMPTS, 4, 24, temperature=0.7, record_logprobs=True,
            use_model_generation_config=use_model_config,
        )
        assert model.generation_config.top_k == 20  # the model's own config is back after sampling
        mask = rollout.completion_mask.bool()
        with torch.no_grad():
            train_pass = sequence_logprobs(
                model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length, temperature=0.7
            )
        gaps[use_model_config] = (train_pass - rollout.sample_logprobs)[mask].abs().max().item()
    assert gaps[False] < 1e-4, f"sampler and training pass disagree by {gaps[False]}"
    assert gaps[True] > 0.05  # top-k / top-p renormalise: the training pass would score another distribution


def test_sampled_logprobs_recomputed_consistently(tiny_model_dir):
    """Sampled rollouts: the mask is 1 through each row's first EOS and 0 after it, and the teacher-forced pass
    gives one full forward's log-softmax at every position the mask keeps."""
    model, tokenizer = _policy_in_training_setup(tiny_model_dir)
    torch.manual_seed(1)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 3, 12, temperature=1.0)
    assert rollout.input_ids.shape[0] == 6 and len(rollout.completions) == 6
    P, eos = rollout.prompt_length, set(eos_token_ids(model, tokenizer))
    completion = rollout.input_ids[:, P:]  # [6, C]
    for row, mask in zip(completion.tolist(), rollout.completion_mask.tolist()):
        ends = [i for i, token in enumerate(row) if token in eos]
        kept = ends[0] + 1 if ends else len(row)
        assert mask == [1] * kept + [0] * (len(row) - kept)
    logp = sequence_logprobs(model, rollout.input_ids, rollout.attention_mask, P, chunk_rows=4)  # [6, C]
    with torch.no_grad():
        logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                       position_ids=position_ids(rollout.attention_mask)).logits  # [6, P + C, V]
        full = torch.log_softmax(logits[:, P - 1 : -1].float(), -1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    keep = rollout.completion_mask.bool()
    assert torch.allclose(logp.detach()[keep], full[keep], atol=1e-5)


def test_shared_prompt_pass_equals_full_pass_with_gradients(tiny_model_dir):
    """Reading each prompt once for its G completions gives the same log-probs and gradients as G full passes."""
    model, tokenizer = _policy_in_training_setup(tiny_model_dir)
    torch.manual_seed(2)
    rollout = generate_rollout(model, tokenizer, PROMPTS, 3, 10)
    set_checkpointing(model, False)  # the shared pass needs the cache that checkpointed layers drop
    args = (model, rollout.input_ids, rollout.attention_mask, rollout.prompt_length)
    results = []
    for group in (1, 3):
        model.zero_grad()
        logp = sequence_logprobs(*args, chunk_rows=4, group=group)
        (logp * rollout.completion_mask).sum().backward()
        results.append((logp.detach(), [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (shared, shared_grads) = results
    mask = rollout.completion_mask.bool()
    assert torch.allclose(full[mask], shared[mask], atol=1e-5)
    for a, b in zip(full_grads, shared_grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_shared_prompt_sampling_matches_plain_sampling(tiny_model_dir):
    model, tokenizer = _policy_in_training_setup(tiny_model_dir)
    greedy = {"do_sample": False}
    plain = generate_rollout(model, tokenizer, PROMPTS, 2, 16, generation_kwargs=greedy, share_prompt=False)
    shared = generate_rollout(model, tokenizer, PROMPTS, 2, 16, generation_kwargs=greedy, share_prompt=True)
    assert torch.equal(plain.input_ids, shared.input_ids)
