"""pypeft.PypeftSeq2SeqTrainer on T5 with the prompt methods (prompt tuning,
P-tuning, prefix tuning), evaluating with predict_with_generate=True during
training: it trains, its checkpoint is peft's format, and the predictions the
evaluation generated equal greedy decoding by the real peft's forward over
that checkpoint, and differ from the base model's (full forwards, no cache: peft 0.21's own generate mishandles
the cache under transformers 5, README). Bottleneck adapters are not here:
pypeft refuses them on T5 (two stacks of layers) at patch time.
LoRA on T5: tests/test_trainer.py."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import numpy as np
import peft
import pytest
import torch
import transformers

import pypeft

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as T  # noqa: E402
from trainer_helpers import args, dataset, mean_loss  # noqa: E402

PAD, EOS, START = 0, 1, 0  # tiny T5's pad, eos and decoder start ids
NEW_TOKENS = 5
# Greedy, and never pad or eos: the random tiny T5 otherwise generates pads
# only, before and after training, which any decoding would match.
GENERATION = transformers.GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=[PAD, EOS],
                                           decoder_start_token_id=START, pad_token_id=PAD, eos_token_id=EOS)
PROMPTS = {
    "prompt_tuning": dict(method="prompt_tuning", num_virtual_tokens=3),
    "p_tuning": dict(method="p_tuning", num_virtual_tokens=3),
    "prefix_tuning": dict(method="prefix_tuning", num_virtual_tokens=3),
}


@torch.no_grad()
def greedy(model, rows: list[dict]) -> torch.Tensor:
    """What generate gives under GENERATION, by full forwards of `model`."""
    ids = torch.stack([r["input_ids"] for r in rows])
    mask = torch.stack([r["attention_mask"] for r in rows])
    decoded = torch.full((len(rows), 1), START)
    for _ in range(NEW_TOKENS):
        logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoded).logits[:, -1]
        logits[:, [PAD, EOS]] = -torch.inf
        decoded = torch.cat([decoded, logits.argmax(-1, keepdim=True)], 1)
    return decoded


def t5() -> transformers.T5ForConditionalGeneration:
    """tests/tiny_models' T5 drawn at 3x its initialisation scale: at 1x, its
    greedy output is one token repeated, whatever the input or prompt."""
    config = T.t5().config
    config.initializer_factor = 3.0
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("name", list(PROMPTS))
def test_prompt_methods_train_and_evaluate_with_generate(tmp_path, name):
    base = t5()
    model = pypeft.patch(copy.deepcopy(base), **PROMPTS[name])
    data, held_out = dataset("t5"), dataset("t5", n=4, seed=1)
    before = mean_loss(model, data[:4])
    predictions = []

    def compute_metrics(prediction):
        predictions.append(torch.from_numpy(np.asarray(prediction.predictions)))
        return {}

    trainer = pypeft.PypeftSeq2SeqTrainer(
        model=model, train_dataset=data, eval_dataset=held_out, compute_metrics=compute_metrics,
        args=args(tmp_path, transformers.Seq2SeqTrainingArguments, save_strategy="steps", save_steps=4,
                  eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4, predict_with_generate=True,
                  generation_config=GENERATION))
    trainer.train()
    assert mean_loss(model, data[:4]) < before
    assert len(predictions) == 2  # evaluated at steps 2 and 4, generating
    assert [h["step"] for h in trainer.state.log_history if "eval_loss" in h] == [2, 4]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "checkpoint-4").eval()
    want = greedy(theirs, held_out)
    assert not torch.equal(want, greedy(base.eval(), held_out))  # the prompt changes what is generated
    got = predictions[-1]
    assert got.shape[0] == len(held_out) and got.shape[1] >= want.shape[1]
    assert torch.equal(got[:, :want.shape[1]], want)
    assert (got[:, want.shape[1]:] == PAD).all()  # Seq2SeqTrainer pads to the generation config's max_length
