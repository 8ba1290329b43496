"""What the Trainer tests share: a learnable toy dataset per family,
TrainingArguments for a short CPU run, and checks of adapter checkpoints
(peft's files, no base weights; the real `peft` loads them)."""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import peft
import torch
import transformers

import pypeft
from pypeft.io import adapter_state_dict

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as T  # noqa: E402

LENGTH = 8
WHOLE_MODEL_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


def dataset(family: str, n: int = 16, distinct: int = 4, seed: int = 0) -> list[dict]:
    """n examples cycling through `distinct` sequences (learnable in a few steps)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, T.VOCAB, (distinct, LENGTH), generator=g)
    rows = []
    for i in range(n):
        row = {"input_ids": ids[i % distinct], "attention_mask": torch.ones(LENGTH, dtype=torch.long)}
        if family == "bert":
            row["labels"] = torch.tensor(i % distinct % 3)
        elif family == "t5":
            row["labels"] = ids[(i + 1) % distinct][:5]
        else:
            row["labels"] = ids[i % distinct]
        rows.append(row)
    return rows


def args(out, trainer_class=transformers.TrainingArguments, **kw) -> transformers.TrainingArguments:
    options = dict(per_device_train_batch_size=4, max_steps=4, learning_rate=2e-2, save_strategy="no",
                   logging_steps=1, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                   dataloader_num_workers=0, save_only_model=False)
    options.update(kw)
    return trainer_class(str(out), **options)


@torch.no_grad()
def mean_loss(model, rows: list[dict]) -> float:
    was = model.training
    model.eval()
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    loss = model(**batch).loss.item()
    model.train(was)
    return loss


def adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in adapter_state_dict(model, "default").items()}


def assert_adapter_dir(directory: Path) -> None:
    files = set(os.listdir(directory))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & WHOLE_MODEL_FILES, f"the base weights were saved: {files & WHOLE_MODEL_FILES}"


def assert_peft_loads(base, directory: Path, trained, family: str) -> None:
    """The real peft, and pypeft, load the directory into a fresh copy of the
    base to the trained model's outputs."""
    batch = T.inputs(family, length=LENGTH)
    want = T.output(trained.eval(), batch)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    torch.testing.assert_close(T.output(theirs, batch), want, atol=1e-5, rtol=1e-5)
    ours = pypeft.load_adapter(copy.deepcopy(base), directory)
    torch.testing.assert_close(T.output(ours, batch), want, atol=1e-6, rtol=1e-6)


NF4 = "nf4"  # a recipe step: pypeft.quantize(model, "nf4") at that point
# Patches of a tiny Llama, by name: the methods the Trainer tests sweep.
RECIPES = {
    "lora": [dict(method="lora", r=4, alpha=8)],
    "vera": [dict(method="vera", r=4)],
    "tokentune": [dict(method="tokentune", k=3, seed=0)],  # no adapter: trains the base weights themselves
    "lora+tokentune": [dict(method="lora", r=4, alpha=8), dict(method="tokentune", k=3, seed=0)],
    "read": [dict(method="read")],
    "bitfit": [dict(method="bitfit", add_missing_biases=True)],  # Llama has no biases of its own
    "bottleneck": [dict(method="bottleneck", preset="pfeiffer")],
    "prompt_tuning": [dict(method="prompt_tuning", num_virtual_tokens=3)],
    "p_tuning": [dict(method="p_tuning", num_virtual_tokens=3)],
    "prefix_tuning": [dict(method="prefix_tuning", num_virtual_tokens=3)],
    "nf4+lora": [NF4, dict(method="lora", r=4, alpha=8)],
    "fusion": [dict(method="bottleneck", preset="pfeiffer", adapter_name="a"),
               dict(method="bottleneck", preset="pfeiffer", adapter_name="b"), dict(method="fusion", adapters=["a", "b"])],
    "two loras": [dict(method="lora", r=4, alpha=8), dict(method="lora", r=2, alpha=4, adapter_name="other")],
}


def build(name: str, family: str = "llama", seed: int = 5) -> torch.nn.Module:
    """The tiny model of `family` patched as RECIPES[name] says, with every
    tensor patching added, and every trainable one, drawn from `seed` (LoRA's
    B and READ's output projection start at zero, which would leave the
    tensors before them without gradient, and make two builds agree)."""
    model = T.make(family)
    own = {id(p) for p in model.parameters()}  # by identity: patching renames the modules it wraps
    for step in RECIPES[name]:
        if step == NF4:
            pypeft.quantize(model, "nf4")
        else:
            pypeft.patch(model, **step)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and (p.requires_grad or id(p) not in own):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def adapters(model) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter's tensors (peft's keys), by adapter name."""
    return {name: adapter_state_dict(model, name) for name in pypeft.state_of(model).adapters}
