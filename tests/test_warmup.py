"""The supervised warm-up: example layout, padding, a short fit that lowers the loss and saves a loadable model."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from grpo_lightning.builtin.answer_format import build_prompt
from grpo_lightning.builtin.arithmetic import completion_text
from grpo_lightning.builtin.tiny import build
from grpo_lightning.train.warmup import IGNORE, SFTWarmup, main, pad_batch, tokenize_example

QUESTION, ANSWER = "Ana has 3 cups. Ana buys 2 more. How many cups does Ana have now?", "3 + 2 = 5\n#### 5"


def test_pad_batch_hand_worked():
    batch = pad_batch([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_tokenize_example_masks_the_prompt(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build(tmp_path))
    example = tokenize_example(tokenizer, QUESTION, ANSWER)
    prompt = tokenizer(build_prompt(QUESTION), add_special_tokens=False)["input_ids"]
    P = len(prompt)
    assert example["input_ids"][:P] == prompt
    assert example["labels"][:P] == [IGNORE] * P
    assert example["labels"][P:] == example["input_ids"][P:]
    assert example["input_ids"][-1] == tokenizer.eos_token_id
    completion = tokenizer.decode(example["input_ids"][P:], skip_special_tokens=True)
    assert completion == completion_text(ANSWER) == "<reasoning>\n3 + 2 = 5\n</reasoning>\n<answer>\n5\n</answer>"


def test_training_lowers_completion_loss(tmp_path):
    torch.manual_seed(0)
    module = SFTWarmup(str(build(tmp_path / "init")), save_dir=str(tmp_path / "out"), lr=3e-3)
    example = tokenize_example(module.tokenizer, QUESTION, ANSWER)
    batch = pad_batch([example] * 4, module.tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = module.model(**batch).loss.item()
    for _ in range(20):
        optimizer.zero_grad()
        module.model(**batch).loss.backward()
        optimizer.step()
    assert module.model(**batch).loss.item() < first / 2


@pytest.mark.slow
def test_cli_fit_saves_a_loadable_model(tmp_path):
    out = tmp_path / "warm"
    main(
        [
            "fit",
            "--seed_everything=0",
            "--trainer.max_steps=3",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--model.model_name_or_path={build(tmp_path / 'init')}",
            f"--model.save_dir={out}",
            "--model.lr=1e-3",
            "--data.source=task:arithmetic-distilled",
            "--data.batch_size=4",
            "--data.val_size=8",
        ]
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "qwen2" and tokenizer.eos_token_id is not None
