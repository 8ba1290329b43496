"""TrainingArguments(torch_compile=True) with every method that compiles:
pypeft.PypeftTrainer runs the compiled model (inductor, Trainer's default
backend) to the eager run's losses and parameter updates, with no graph
break, and saves the adapter from under the compiled wrapper.

Plain SGD, so that an update is the learning rate times the gradient and
fp32 tolerances apply (Adam's first step divides each gradient by its own
size, so a gradient near zero, rounded differently by inductor's fused
kernels, moved its parameter far more differently than fp32 rounding:
4.6e-4 after two Adam steps of READ, seen here).

Every compile here is an inductor compile of a tiny Llama on the CPU: the
twelve took 3.5 min with inductor's on-disk caches empty and 1 min with
them warm (they are on by default and shared between runs), on 2 busy cores.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import pypeft
from pypeft.integrations.trainer import adapter_directory

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as T  # noqa: E402
from trainer_helpers import NF4, RECIPES, args, build, dataset  # noqa: E402

def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run(name: str, out, compiled: bool):
    """(losses, update per trainable parameter) of two SGD steps."""
    model = build(name)
    before = trainable(model)
    trainer = pypeft.PypeftTrainer(model=model, train_dataset=dataset("llama", n=8),
                                   args=args(out, max_steps=2, optim="sgd", torch_compile=compiled))
    torch._dynamo.reset()
    counters.clear()
    trainer.train()
    if compiled:
        assert not counters["graph_break"], f"{name}: graph breaks: {dict(counters['graph_break'])}"
        assert counters["stats"]["unique_graphs"] >= 1  # it did compile
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    after = trainable(model)
    if pypeft.state_of(model).adapters:  # saved from under the compiled wrapper: it loads back
        trainer.save_model(str(out / "saved"))
        fresh = T.make("llama")
        if NF4 in RECIPES[name]:
            pypeft.quantize(fresh, "nf4")
        state = pypeft.state_of(model)
        for adapter in state.adapters:  # in the order patched: a fusion after the adapters it fuses
            pypeft.load_adapter(fresh, adapter_directory(out / "saved", adapter), adapter_name=adapter)
        pypeft.set_adapter(fresh, state.active)
        batch = T.inputs("llama")
        torch.testing.assert_close(T.output(fresh, batch), T.output(model.eval(), batch), atol=1e-6, rtol=1e-5)
    return losses, {k: after[k] - before[k] for k in before}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in RECIPES if n != "two loras"])
def test_torch_compile_trains_as_eager(tmp_path, name):
    eager_losses, eager = run(name, tmp_path / "eager", compiled=False)
    compiled_losses, compiled = run(name, tmp_path / "compiled", compiled=True)
    assert len(compiled_losses) == len(eager_losses) == 2
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert compiled.keys() == eager.keys() and eager
    assert any(u.abs().sum() > 0 for u in eager.values())
    for key in eager:
        torch.testing.assert_close(compiled[key], eager[key], rtol=1e-4, atol=1e-7, msg=key)
