"""Resuming every method's training from a checkpoint, under
pypeft.PypeftTrainer and under the plain transformers.Trainer (as a peft user
would run it), and from one's checkpoint under the other.

PypeftTrainer's checkpoints hold each adapter in its format (tests/
test_trainer.py checks LoRA's against peft); resuming copies them back into
the adapters in place.

The plain Trainer: the model is still the transformers class it was (patched
in place, no wrapper), so Trainer._save calls its save_pretrained, and a
checkpoint holds model.safetensors: the patched model's whole state_dict
under pypeft's module names (q_proj.base_layer.weight, q_proj.lora_A.default,
...), base weights included, and no adapter files. Resuming loads that file
with load_state_dict into the freshly patched model, in place.

Either way a run resumed on a model patched afresh (other values) ends with
the adapters of an unbroken run, for every method; load_best_model_at_end
too. PypeftTrainer resumes a plain Trainer's checkpoint (it defers to
Trainer where it finds no adapter files). The reverse does not work: plain
Trainer reads adapter files only into a peft.PeftModel, and refuses
PypeftTrainer's adapter-only checkpoint with an error, before any step
(rather than training on from a fresh adapter)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import pypeft
from pypeft.integrations.trainer import TRAINING_STATE_NAME, load_adapters
from pypeft.io import load_adapter_weights

sys.path.insert(0, os.path.dirname(__file__))
from trainer_helpers import RECIPES, adapters, args, build, dataset  # noqa: E402

# Every recipe holding an adapter (TokenTune alone holds none: Trainer saves
# and resumes it as any model), and LoRA on BERT: its classifier head trains
# beside the adapter, as a copy.
CASES = [(n, "llama") for n in RECIPES if n not in ("tokentune", "lora+tokentune")] + [("lora", "bert"),
                                                                                       ("p_tuning", "bert")]


def assert_same_adapters(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].keys() == want[name].keys(), name
        for key in want[name]:
            torch.testing.assert_close(got[name][key], want[name][key], atol=1e-7, rtol=1e-6, msg=f"{name}: {key}")


def unbroken_run(name: str, family: str, out: Path, trainer=transformers.Trainer):
    """Four steps, checkpoints at 2 and 4; the model."""
    model = build(name, family)
    trainer(model=model, train_dataset=dataset(family), args=args(out, save_strategy="steps", save_steps=2)).train()
    return model


def resume(name: str, family: str, checkpoint: Path, out: Path, trainer=transformers.Trainer):
    """A model patched afresh (other values: the run must end with the
    checkpoint's), trained from `checkpoint` to step 4; the model."""
    model = build(name, family, seed=6)
    parameters = [p for p in model.parameters() if p.requires_grad]
    run = trainer(model=model, train_dataset=dataset(family), args=args(out))
    run.train(resume_from_checkpoint=str(checkpoint))
    assert run.state.global_step == 4
    assert all(p is q for p, q in zip(parameters, [p for p in model.parameters() if p.requires_grad]))
    return model


def trained_on(model, before: dict[str, dict[str, torch.Tensor]]) -> bool:
    """Whether the active adapter changed since `before` (adapters())."""
    active = pypeft.state_of(model).active
    now = adapters(model)[active]
    return any(not torch.equal(now[k], v) for k, v in before[active].items())


@pytest.mark.parametrize("name, family", CASES)
def test_plain_trainer_resumes_to_the_adapters_of_an_unbroken_run(tmp_path, name, family):
    unbroken = unbroken_run(name, family, tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-2"
    files = set(os.listdir(checkpoint))
    assert "model.safetensors" in files and "adapter_config.json" not in files
    saved = load_file(checkpoint / "model.safetensors")
    assert saved.keys() == unbroken.state_dict().keys()  # the patched model's names, base weights included
    resumed = resume(name, family, checkpoint, tmp_path / "b")
    assert_same_adapters(adapters(resumed), adapters(unbroken))
    own = resumed.state_dict()
    trained = [n for n, p in resumed.named_parameters() if p.requires_grad]
    assert trained and any(not torch.equal(saved[n], own[n]) for n in trained), "it did not train on after resuming"


@pytest.mark.parametrize("name, family", CASES)
def test_pypeft_trainer_resumes_to_the_adapters_of_an_unbroken_run(tmp_path, name, family):
    unbroken = unbroken_run(name, family, tmp_path / "a", pypeft.PypeftTrainer)
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert not set(os.listdir(checkpoint)) & {"model.safetensors", "pytorch_model.bin"}
    # P-tuning's encoder, which peft's files do not hold, is kept beside them (and nothing else's is).
    assert ((checkpoint / TRAINING_STATE_NAME).is_file()) == (name == "p_tuning")
    at_two = build(name, family, seed=6)
    assert load_adapters(at_two, checkpoint) == list(pypeft.state_of(at_two).adapters)  # every adapter saved
    resumed = resume(name, family, checkpoint, tmp_path / "b", pypeft.PypeftTrainer)
    assert_same_adapters(adapters(resumed), adapters(unbroken))
    assert trained_on(resumed, adapters(at_two)), "it did not train on after resuming"


def test_p_tuning_peft_files_are_refused_for_an_adapter_in_training(tmp_path):
    """They hold the prompts the encoder computed: copied into the encoder's input, they would be encoded
    again by weights the files do not hold (peft's own resuming does that)."""
    pypeft.save_adapter(build("p_tuning"), tmp_path)
    resumed = build("p_tuning", seed=6)
    before = adapters(resumed)
    with pytest.raises(pypeft.AdapterFormatError, match="prompt encoder"):
        load_adapter_weights(resumed, tmp_path)
    assert_same_adapters(adapters(resumed), before)


def test_pypeft_trainer_resumes_a_plain_trainer_checkpoint(tmp_path):
    unbroken = unbroken_run("lora", "llama", tmp_path / "a")
    resumed = build("lora", seed=6)
    trainer = pypeft.PypeftTrainer(model=resumed, train_dataset=dataset("llama"),
                                   args=args(tmp_path / "b", save_strategy="steps", save_steps=4))
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert_same_adapters(adapters(resumed), adapters(unbroken))
    assert "adapter_config.json" in os.listdir(tmp_path / "b" / "checkpoint-4")  # and writes peft's format on


def test_plain_trainer_refuses_a_pypeft_trainer_checkpoint(tmp_path):
    pypeft.PypeftTrainer(model=build("lora"), train_dataset=dataset("llama"),
                         args=args(tmp_path / "a", save_strategy="steps", save_steps=2)).train()
    resumed = build("lora", seed=6)
    before = adapters(resumed)
    trainer = transformers.Trainer(model=resumed, train_dataset=dataset("llama"), args=args(tmp_path / "b"))
    with pytest.raises(ValueError, match="checkpoint"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 0
    assert_same_adapters(adapters(resumed), before)


def test_plain_trainer_loads_the_best_checkpoint_at_end(tmp_path):
    data = dataset("llama")
    model = build("lora")
    # "Best" is the highest loss here, so that the best checkpoint is the earlier one (the loss falls).
    trainer = transformers.Trainer(
        model=model, train_dataset=data, eval_dataset=data[:4],
        args=args(tmp_path, save_strategy="steps", eval_strategy="steps", save_steps=2, eval_steps=2,
                  load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True))
    trainer.train()
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "model.safetensors")
    own = model.state_dict()
    assert all(torch.equal(own[k], best[k]) for k in best)
    assert any(not torch.equal(own[k], last[k]) for k in last)


def test_a_training_state_save_cut_short_leaves_the_last_one_whole(tmp_path, monkeypatch):
    """pypeft_training_state.safetensors is written under a temporary name and renamed: a failure while writing
    (disk full, a kill) leaves the previous file as it was and no partial file behind."""
    from pypeft.integrations import trainer as trainer_module

    model = build("p_tuning")
    trainer_module.save_adapters(model, tmp_path)
    before = load_file(tmp_path / TRAINING_STATE_NAME)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)

    def half_written(tensors, path):
        Path(path).write_bytes(b"\0" * 64)  # a few bytes, then the writer dies
        raise OSError("No space left on device")

    monkeypatch.setattr(trainer_module, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        trainer_module.save_adapters(model, tmp_path)
    after = load_file(tmp_path / TRAINING_STATE_NAME)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
