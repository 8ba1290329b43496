"""A method defined entirely here, in tests/, plugged into pypeft through the
public protocol (pypeft.Method, pypeft.PypeftLayer, pypeft.register_method)
with no change to pypeft/: a trainable per-channel scale on linear outputs,
y = base(x) * (1 + s). patch, a training step, save, load, set_adapter,
disabled, merge and unpatch must all work for it as for the built-in methods.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import pypeft
import tiny_models as T
from pypeft.targets import base_dims, find_modules_to_save, find_targets, modules_to_save_keys


@dataclass
class ScaleConfig:
    target_modules: list[str] | str | None = None
    adapter_name: str = "default"
    modules_to_save: list[str] | None = field(default=None)
    method = "toy_scale"


class ScaledLinear(pypeft.PypeftLayer):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.scales = nn.ParameterDict()
        self.active_adapter = None
        self.merged = None  # (name, weight before, bias before) while merged

    def add_adapter(self, name: str) -> None:
        self.scales[name] = nn.Parameter(torch.zeros(self.base_layer.out_features))

    def adapter_names(self):
        return list(self.scales)

    def activate(self, name):
        self.active_adapter = name
        for n, p in self.scales.items():
            p.requires_grad_(n == name)

    def delete_adapter(self, name):
        del self.scales[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @torch.no_grad()
    def merge(self):
        name = self.active_adapter
        if self.merged or name not in self.scales:
            return
        w, b = self.base_layer.weight, self.base_layer.bias
        self.merged = (name, w.clone(), b.clone())
        factor = 1 + self.scales[name]
        w.mul_(factor[:, None])
        b.mul_(factor)

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            _, w, b = self.merged
            self.base_layer.weight.copy_(w)
            self.base_layer.bias.copy_(b)
            self.merged = None

    def forward(self, x):
        y = self.base_layer(x)
        name = self.active_adapter
        if self.is_disabled() or self.merged or name not in self.scales:
            return y
        return y * (1 + self.scales[name])


class ScaleMethod(pypeft.Method):
    name = "toy_scale"
    config_class = ScaleConfig

    def plan(self, model, state, config):
        to_save = find_modules_to_save(model, config.modules_to_save)
        targets = find_targets(model, config.target_modules, self.name, to_save)
        return pypeft.Plan(self, config, targets, to_save)

    def attach(self, model, state, plan):
        for name in plan.targets:
            state.wrap(model, name, ScaledLinear).add_adapter(plan.adapter_name)

    def recognises(self, fields):
        return fields.get("pypeft_method") == self.name

    def to_disk(self, model, state, name):
        record = state.adapters[name]
        fields = {"pypeft_method": self.name, "target_modules": record.layers,
                  "modules_to_save": modules_to_save_keys(model, record.config.modules_to_save)}
        tensors = {f"scale.{layer}": model.get_submodule(layer).scales[name] for layer in record.layers}
        return fields, tensors

    def config_from_disk(self, fields, adapter_name):
        return ScaleConfig(target_modules=fields["target_modules"], adapter_name=adapter_name,
                           modules_to_save=fields.get("modules_to_save") or [])

    def expected_tensors(self, model, state, plan, fields, tensors):
        return {f"scale.{layer}": (base_dims(model, layer)[1],) for layer in plan.targets}

    def load_tensors(self, model, state, plan, tensors):
        for layer in plan.targets:
            model.get_submodule(layer).scales[plan.adapter_name].copy_(tensors[f"scale.{layer}"])


@pytest.fixture
def toy_method():
    pypeft.register_method(ScaleMethod())
    yield
    pypeft.registry.unregister_method(ScaleMethod.name)


def test_a_method_defined_outside_pypeft_runs_the_whole_lifecycle(toy_method, tmp_path):
    base = T.make("bert")
    original = copy.deepcopy(base.state_dict())
    batch = T.inputs("bert")
    base_out = T.output(base, batch)
    model = pypeft.patch(copy.deepcopy(base), method="toy_scale", target_modules=["query", "value"])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ScaledLinear)}
    assert len(layers) == 2 * base.config.num_hidden_layers
    assert not model.training and all(not m.training for m in layers.values())  # eval() as patched
    assert torch.equal(T.output(model, batch), base_out)  # scales start at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".scales.default" in n or n.startswith("classifier.copies.default.") for n in trainable)

    # a training step moves the scales (and the head), nothing else
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**T.labels_for("bert", batch)).loss.backward()
    opt.step()
    model.eval()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(m.scales["default"].abs().max() > 0 for m in layers.values())
    trained = T.output(model, batch)
    assert (trained - base_out).abs().max() > 1e-4

    # save / load into a fresh copy of the base: the same outputs
    pypeft.save_adapter(model, tmp_path / "toy")
    loaded = pypeft.load_adapter(copy.deepcopy(base), tmp_path / "toy")
    torch.testing.assert_close(T.output(loaded, batch), trained, rtol=0, atol=0)

    # a second adapter; set_adapter switches; disabled gives the base
    pypeft.patch(model, method="toy_scale", target_modules=["key"], adapter_name="second")
    assert model.pypeft.active == "second"
    assert torch.equal(T.output(model, batch), base_out)  # "second" is still zero
    pypeft.set_adapter(model, "default")
    torch.testing.assert_close(T.output(model, batch), trained, rtol=0, atol=0)
    with pypeft.disabled(model):
        assert torch.equal(T.output(model, batch), base_out)

    # merge folds it in and unmerge restores the weights exactly
    pypeft.merge(model)
    torch.testing.assert_close(T.output(model, batch), trained, rtol=1e-5, atol=1e-6)
    pypeft.unmerge(model)

    pypeft.unpatch(model)
    assert not any(isinstance(m, pypeft.PypeftLayer) for m in model.modules())
    state = model.state_dict()
    assert state.keys() == original.keys() and all(torch.equal(state[k], v) for k, v in original.items())


def test_registration_is_checked():
    with pytest.raises(TypeError, match="argument 'method'.*pypeft.Method"):
        pypeft.register_method(ScaleMethod)  # the class, not an instance
    with pytest.raises(ValueError, match="'method'.*'toy_scale'"):
        pypeft.patch(T.make("bert"), method="toy_scale")  # not registered outside the fixture
