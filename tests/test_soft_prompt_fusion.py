"""AdapterFusion beside the soft-prompt methods: a model holding two
bottleneck adapters, their fusion and a prompt / P-tuning / prefix adapter
runs each adapter as it runs alone, trains exactly the active one, and
unpatches exactly."""

from __future__ import annotations

import copy

import pytest
import torch

import pypeft
import tiny_models as T
from prompt_helpers import train_step

SOFT = {"prompt_tuning": {"num_virtual_tokens": 3}, "p_tuning": {"num_virtual_tokens": 3, "encoder": "mlp"},
        "prefix_tuning": {"num_virtual_tokens": 3}}


def perturb(model, seed):
    """Trained-looking values for the trainable parameters (set from a seed, so
    that models patched in another order hold the same values)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("soft", list(SOFT))
@pytest.mark.parametrize("soft_first", [False, True], ids=["fusion-first", "soft-first"])
def test_fusion_beside_soft_prompt(soft, soft_first):
    family = "bert"
    base = T.make(family)
    batch = T.inputs(family)

    def add_fusion(model):
        for i, name in enumerate(("a", "b")):
            pypeft.patch(model, method="bottleneck", preset="pfeiffer", adapter_name=name)
            perturb(model, 10 + i)
        pypeft.patch(model, method="fusion", adapters=["a", "b"], adapter_name="f")
        perturb(model, 12)

    def add_soft(model):
        pypeft.patch(model, method=soft, adapter_name="s", **SOFT[soft])
        perturb(model, 13)

    model = copy.deepcopy(base)
    for step in ((add_soft, add_fusion) if soft_first else (add_fusion, add_soft)):
        step(model)
    # Each adapter alone: the same parameters in a model holding only its own method(s).
    fusion_alone, soft_alone = copy.deepcopy(base), copy.deepcopy(base)
    add_fusion(fusion_alone)
    add_soft(soft_alone)
    for name, alone in (("f", fusion_alone), ("s", soft_alone)):
        pypeft.set_adapter(model, name)
        torch.testing.assert_close(T.output(model, batch), T.output(alone, batch), rtol=1e-6, atol=1e-6)
    outputs = {name: (pypeft.set_adapter(model, name), T.output(model, batch))[1] for name in ("f", "s")}
    assert not torch.allclose(outputs["f"], outputs["s"])  # the two adapters do differ
    for name in ("f", "s"):
        pypeft.set_adapter(model, name)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.train()
        train_step(model, family, batch)
        model.eval()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and changed <= trainable, name
    pypeft.unpatch(model)
    assert model.state_dict().keys() == base.state_dict().keys()
    for key, value in base.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    torch.testing.assert_close(T.output(model, batch), T.output(base, batch), rtol=0, atol=0)
