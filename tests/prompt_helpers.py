"""Shared pieces of the prompt / P-tuning tests: building a peft model of
either method, one training step, inputs without and with padding."""

from __future__ import annotations

import copy
import functools

import torch

import tiny_models as T
from pypeft.methods.prompt.format import model_dims
from pypeft.models import task_type

CAUSAL = ["gpt2", "llama", "mistral", "qwen2", "opt"]
ENCODERS = ["bert", "roberta", "distilbert"]
LAST_TOKEN_CLS = ["gpt2-cls", "llama-cls", "mistral-cls", "qwen2-cls", "opt-cls"]
ALL = ENCODERS + CAUSAL + LAST_TOKEN_CLS + ["t5"]

# pypeft options -> peft config, per variant the tests sweep
VARIANTS = {
    "prompt": ("prompt_tuning", {}),
    "p-mlp": ("p_tuning", {"encoder": "mlp", "encoder_hidden_size": 24}),
    "p-lstm": ("p_tuning", {"encoder": "lstm", "encoder_hidden_size": 12, "encoder_num_layers": 2}),
}


def peft_config(peft, model, variant: str, n: int):
    method, options = VARIANTS[variant]
    task = task_type(model)
    # The model facts peft reads off the config, given by hand (peft knows no DistilBERT names for them).
    dims = {k: v for k, v in model_dims(model).items() if v is not None}
    if method == "prompt_tuning":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=n, **dims)
    return peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=n, **dims,
                                    encoder_reparameterization_type=options["encoder"].upper(),
                                    encoder_hidden_size=options["encoder_hidden_size"],
                                    encoder_num_layers=options.get("encoder_num_layers", 2))


@functools.lru_cache(maxsize=None)
def pad_id(family: str) -> int:
    pad = getattr(T.make(family).config, "pad_token_id", None)
    return 0 if pad is None else pad


def batch_for(family: str, batch: int = 2, length: int = 7, padding: str | None = None, seed: int = 1) -> dict:
    """Inputs with no padding, or with the first row padded on the right / left."""
    b = T.inputs(family, batch=batch, length=length, seed=seed)
    mask = torch.ones_like(b["input_ids"])
    if padding is not None:
        if padding == "right":
            mask[0, -3:] = 0
        else:
            mask[0, :3] = 0
    b["attention_mask"] = mask
    # pads carry the pad id, as a tokenizer writes them (the base last-token heads look for it)
    b["input_ids"] = b["input_ids"].masked_fill(mask == 0, pad_id(family))
    return b


def train_step(model, family: str, batch: dict, lr: float = 0.5) -> None:
    """One SGD step on every trainable parameter (so nothing is at its init)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(**T.labels_for(family, batch)).loss
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


def real_logits(logits: torch.Tensor, mask: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Per row, a causal LM's logits at its real tokens (the n virtual positions dropped)."""
    return [logits[i, n:][mask[i].bool()] for i in range(mask.shape[0])]


def fresh(family: str):
    return copy.deepcopy(T.make(family))
