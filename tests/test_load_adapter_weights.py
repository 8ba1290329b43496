"""pypeft.io.load_adapter_weights: a saved adapter copied into the adapter
the model holds, in place (what resuming a Trainer checkpoint needs);
checked like load_adapter, and a bad directory changes nothing."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

import pypeft
from pypeft.io import AdapterFormatError, adapter_state_dict, load_adapter_weights

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as T  # noqa: E402


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("family,options", [
    ("bert", dict(method="lora", r=4, alpha=8)),             # with the classifier head beside it
    ("llama", dict(method="prompt_tuning", num_virtual_tokens=3)),
    ("gpt2", dict(method="bottleneck", preset="pfeiffer")),
])
def test_loads_in_place_to_the_saved_outputs(tmp_path, family, options):
    base = T.make(family)
    saved = pypeft.patch(copy.deepcopy(base), **options)
    randomize(saved, 1)
    pypeft.save_adapter(saved, tmp_path)
    model = pypeft.patch(copy.deepcopy(base), **options)
    randomize(model, 2)
    before = list(model.parameters())
    load_adapter_weights(model, tmp_path)
    assert all(p is q for p, q in zip(before, model.parameters()))
    want, got = adapter_state_dict(saved, "default"), adapter_state_dict(model, "default")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    batch = T.inputs(family)
    torch.testing.assert_close(T.output(model, batch), T.output(saved, batch), atol=0, rtol=0)


def test_refuses_another_method_or_shape_and_changes_nothing(tmp_path):
    base = T.make("llama")
    pypeft.save_adapter(pypeft.patch(copy.deepcopy(base), method="vera", r=8), tmp_path / "vera")
    pypeft.save_adapter(pypeft.patch(copy.deepcopy(base), method="lora", r=8), tmp_path / "r8")
    model = pypeft.patch(copy.deepcopy(base), method="lora", r=4)
    randomize(model, 3)
    want = adapter_state_dict(model, "default")
    with pytest.raises(AdapterFormatError, match="expected an adapter of method 'lora'.*got one of 'vera'"):
        load_adapter_weights(model, tmp_path / "vera")
    with pytest.raises(AdapterFormatError, match="expected shape"):
        load_adapter_weights(model, tmp_path / "r8")
    with pytest.raises(ValueError, match="argument 'adapter_name': expected one of \\['default'\\], got 'x'"):
        load_adapter_weights(model, tmp_path / "r8", adapter_name="x")
    got = adapter_state_dict(model, "default")
    assert all(torch.equal(want[k], got[k]) for k in want)
