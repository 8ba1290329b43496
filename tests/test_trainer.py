"""pypeft under transformers' Trainer (pypeft.PypeftTrainer): checkpoints and
save_model hold the adapter in peft's format (the real `peft` loads them to
the same outputs), every adapter saved and resumed (every method: test_trainer_resume.py),
load_best_model_at_end loads the best checkpoint's adapter, activation
checkpointing gives the gradients of a run without it (LoRA, prompt tuning,
TokenTune), Seq2SeqTrainer on T5, and two CPU processes under torchrun.
Tiny models, a few steps each. torch_compile=True: test_trainer_compile.py;
the plain transformers.Trainer: test_trainer_resume.py."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import pypeft
from pypeft.io import adapter_state_dict

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as T  # noqa: E402

from trainer_helpers import (LENGTH, adapter, args, assert_adapter_dir, assert_peft_loads,  # noqa: E402
                             dataset, mean_loss)


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_lora_trains_and_checkpoints_hold_the_adapter_in_peft_format(tmp_path, family):
    base = T.make(family)
    model = pypeft.patch(copy.deepcopy(base), method="lora", r=4, alpha=8)
    data = dataset(family)
    before = mean_loss(model, data[:4])
    trainer = pypeft.PypeftTrainer(model=model, args=args(tmp_path / "run", save_strategy="steps", save_steps=2),
                                   train_dataset=data)
    trainer.train()
    assert mean_loss(model, data[:4]) < before
    for step in (2, 4):
        checkpoint = tmp_path / "run" / f"checkpoint-{step}"
        assert_adapter_dir(checkpoint)
        assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(os.listdir(checkpoint))
    final = tmp_path / "run" / "checkpoint-4"
    saved = load_file(final / "adapter_model.safetensors")
    assert saved.keys() == adapter(model).keys()
    if family == "bert":  # the classifier head trains beside the adapter and is saved with it
        assert any(".classifier." in k for k in saved)
    assert_peft_loads(base, final, model, family)
    trainer.save_model(str(tmp_path / "final"))
    assert_adapter_dir(tmp_path / "final")
    assert all(torch.equal(v, saved[k]) for k, v in load_file(tmp_path / "final" / "adapter_model.safetensors").items())


def test_every_adapter_is_saved_in_peft_layout_and_resumed(tmp_path):
    """"default" in the checkpoint itself, any other adapter in a folder named after it (as peft saves)."""
    base = T.make("llama")
    data = dataset("llama", n=8)

    def two_adapters():
        model = pypeft.patch(copy.deepcopy(base), method="lora", r=4, alpha=8)
        return pypeft.patch(model, method="lora", r=2, alpha=4, adapter_name="other")  # active: trains

    trained = two_adapters()
    pypeft.PypeftTrainer(model=trained, args=args(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2),
                         train_dataset=data).train()
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert_adapter_dir(checkpoint)
    assert_adapter_dir(checkpoint / "other")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), checkpoint)
    theirs.load_adapter(str(checkpoint / "other"), "other")
    theirs.set_adapter("other")
    batch = T.inputs("llama", length=LENGTH)
    torch.testing.assert_close(T.output(theirs.eval(), batch), T.output(trained.eval(), batch), atol=1e-5, rtol=1e-5)
    torch.manual_seed(7)
    resumed = two_adapters()
    pypeft.PypeftTrainer(model=resumed, args=args(tmp_path / "b", max_steps=2),
                         train_dataset=data).train(resume_from_checkpoint=str(checkpoint))
    for name in ("default", "other"):
        want, got = adapter_state_dict(trained, name), adapter_state_dict(resumed, name)
        assert all(torch.equal(want[k], got[k]) for k in want), name


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    data = dataset("llama")
    model = pypeft.patch(T.make("llama"), method="lora", r=4, alpha=8)
    # "Best" is the highest loss here, so that the best checkpoint is the earlier one (the loss falls).
    trainer = pypeft.PypeftTrainer(
        model=model, train_dataset=data, eval_dataset=data[:4],
        args=args(tmp_path, save_strategy="steps", eval_strategy="steps", save_steps=2, eval_steps=2,
                  load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True))
    trainer.train()
    losses = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert losses[1] < losses[0]
    assert Path(trainer.state.best_model_checkpoint).name == "checkpoint-2"
    best = load_file(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
    last = load_file(tmp_path / "checkpoint-4" / "adapter_model.safetensors")
    got = adapter(model)
    assert all(torch.equal(got[k], best[k]) for k in best)
    assert any(not torch.equal(got[k], last[k]) for k in last)


def test_a_model_without_adapters_is_saved_whole(tmp_path):
    """TokenTune alone trains the base weights: Trainer saves the model as usual."""
    model = pypeft.patch(T.make("llama"), method="tokentune", k=3, seed=0)
    trainer = pypeft.PypeftTrainer(model=model, train_dataset=dataset("llama", n=4), args=args(tmp_path, max_steps=1))
    trainer.train()
    trainer.save_model(str(tmp_path / "out"))
    files = set(os.listdir(tmp_path / "out"))
    assert "model.safetensors" in files and "adapter_config.json" not in files
    saved, own = load_file(tmp_path / "out" / "model.safetensors"), model.state_dict()
    assert saved and set(saved) <= set(own)
    assert all(torch.equal(saved[k], own[k]) for k in saved)


PATCHES = {
    "lora": [dict(method="lora", r=4, alpha=8)],
    "prompt_tuning": [dict(method="prompt_tuning", num_virtual_tokens=3)],
    "tokentune": [dict(method="lora", r=4, alpha=8), dict(method="tokentune", k=3, seed=0)],
}
# Checked for gradients only (the three above also train under Trainer below).
MORE_PATCHES = {
    "p_tuning": [dict(method="p_tuning", num_virtual_tokens=3)],
    "prefix_tuning": [dict(method="prefix_tuning", num_virtual_tokens=3)],
    "prompt_tuning+tokentune": [dict(method="prompt_tuning", num_virtual_tokens=3),
                                dict(method="tokentune", k=3, seed=0)],
}


def patched(name: str, family: str = "llama"):
    """The model patched as PATCHES[name] says, its trainable tensors drawn at
    random (LoRA's B starts at zero, which would leave A without gradient)."""
    model = T.make(family)
    for options in {**PATCHES, **MORE_PATCHES}[name]:
        pypeft.patch(model, **options)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name", [*PATCHES, *MORE_PATCHES])
def test_activation_checkpointing_gives_the_gradients_of_a_run_without_it(name, reentrant):
    batch = T.labels_for("llama", T.inputs("llama", length=LENGTH))
    grads = []
    for checkpointing in (False, True):
        model = patched(name).train()
        if checkpointing:  # what Trainer(gradient_checkpointing=True) calls
            model.activation_checkpointing_enable({"use_reentrant": reentrant})
            assert model.is_activation_checkpointing
        model(**batch).loss.backward()
        grads.append(trainable_grads(model))
    plain, checkpointed = grads
    assert plain.keys() == checkpointed.keys() and plain
    for key in plain:
        assert plain[key].abs().sum() > 0, key
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)


def test_tokentune_unpatch_restores_the_checkpointing_functions():
    model = patched("tokentune").train()
    model.activation_checkpointing_enable()
    layer = model.model.layers[0]
    original = layer._gradient_checkpointing_func
    model(**T.labels_for("llama", T.inputs("llama", length=LENGTH))).loss.backward()
    assert layer._gradient_checkpointing_func is not original  # wrapped to replay the selection
    pypeft.unpatch(model)
    assert layer._gradient_checkpointing_func is original


@pytest.mark.parametrize("name", list(PATCHES))
def test_trainer_with_gradient_checkpointing_trains_as_without(tmp_path, name):
    data = dataset("llama", n=4)
    adapters = []
    for checkpointing in (False, True):
        model = patched(name)
        pypeft.PypeftTrainer(model=model, train_dataset=data,
                             args=args(tmp_path / str(checkpointing), max_steps=1,
                                       gradient_checkpointing=checkpointing)).train()
        adapters.append(adapter(model))
    for key in adapters[0]:
        torch.testing.assert_close(adapters[1][key], adapters[0][key], atol=1e-6, rtol=1e-5, msg=key)


def test_seq2seq_trainer_on_t5_with_lora(tmp_path):
    base = T.make("t5")
    model = pypeft.patch(copy.deepcopy(base), method="lora", r=4, alpha=8)
    data = dataset("t5")
    before = mean_loss(model, data[:4])
    trainer = pypeft.PypeftSeq2SeqTrainer(
        model=model, train_dataset=data,
        args=args(tmp_path, transformers.Seq2SeqTrainingArguments, save_strategy="steps", save_steps=4))
    trainer.train()
    assert mean_loss(model, data[:4]) < before
    assert_adapter_dir(tmp_path / "checkpoint-4")
    assert_peft_loads(base, tmp_path / "checkpoint-4", model, "t5")


SCRIPT = Path(__file__).with_name("trainer_ddp_script.py")


def test_trainer_on_two_cpu_processes_under_torchrun(tmp_path):  # ~15 s: CI holds Trainer under DDP
    # The installed pypeft, as in test_cli: from tmp_path, not the source tree (CI's holds no built _C).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(SCRIPT), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert all(r["steps"] == 2 for r in ranks)
    assert ranks[0]["adapter"] == ranks[1]["adapter"]  # DDP kept the replicas equal
    assert_adapter_dir(tmp_path / "out")
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {k: v.double().sum().item() for k, v in saved.items()} == ranks[0]["adapter"]
    pypeft.load_adapter(T.make("llama"), tmp_path / "out")
