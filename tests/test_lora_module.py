"""pypeft.LoraLinear: PEFT's initialisation, scaling and dtype conventions,
checked against the real `peft` package, and its behaviour in training."""

import copy
import math

import pytest
import torch
from torch import nn

import reference as R
from pypeft import LoraLinear

peft = pytest.importorskip("peft", reason="the `peft` package is the oracle for LoRA conventions")


def peft_lora_layer(base: nn.Linear, r, alpha, rslora=False, dropout=0.0):
    """PEFT's own LoRA layer around a copy of `base`."""
    model = nn.Sequential(copy.deepcopy(base))
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], lora_dropout=dropout, use_rslora=rslora)
    return peft.get_peft_model(model, cfg).base_model.model[0]


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("r,alpha", [(1, 1), (4, 8), (8, 32), (16, 5)])
def test_scaling_and_outputs_equal_peft(r, alpha, rslora):
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    theirs = peft_lora_layer(base, r, alpha, rslora)
    ours = LoraLinear(copy.deepcopy(base), r=r, alpha=alpha, rslora=rslora)
    assert ours.scaling["default"] == pytest.approx(theirs.scaling["default"], rel=1e-12)
    # Give both the same non-trivial adapter (B starts at zero in both).
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_()
        ours.lora_A["default"].copy_(theirs.lora_A["default"].weight)
        ours.lora_B["default"].copy_(theirs.lora_B["default"].weight)
    x = torch.randn(3, 7, 24)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)


def test_initialisation_follows_peft():
    torch.manual_seed(0)
    base = nn.Linear(256, 64)
    ours = LoraLinear(base, r=32, alpha=16)
    theirs = peft_lora_layer(base, 32, 16)
    a_peft = theirs.lora_A["default"].weight
    assert ours.lora_A["default"].shape == a_peft.shape and ours.lora_B["default"].shape == theirs.lora_B["default"].weight.shape
    assert torch.count_nonzero(ours.lora_B["default"]) == 0 and torch.count_nonzero(theirs.lora_B["default"].weight) == 0
    # Kaiming-uniform with a=√5 is U(-1/√in, 1/√in): same bound, same spread as PEFT's.
    bound = 1 / math.sqrt(256)
    assert ours.lora_A["default"].abs().max() <= bound and a_peft.abs().max() <= bound
    assert ours.lora_A["default"].std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert ours.lora_A["default"].std().item() == pytest.approx(a_peft.std().item(), rel=0.05)
    # A fresh adapter leaves the layer equal to the base.
    x = torch.randn(4, 256)
    assert torch.equal(ours(x), base(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_adapter_dtype_follows_peft(dtype):
    base = nn.Linear(16, 8).to(dtype)
    ours = LoraLinear(base, r=4, alpha=8)
    theirs = peft_lora_layer(base, 4, 8)
    assert ours.lora_A["default"].dtype == theirs.lora_A["default"].weight.dtype
    assert ours.lora_B["default"].dtype == theirs.lora_B["default"].weight.dtype
    y = ours(torch.randn(2, 16, dtype=dtype))
    assert y.dtype == dtype


def test_training_updates_only_the_adapter():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    layer = LoraLinear(base, r=4, alpha=8, dropout=0.1)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.default", "lora_B.default"]
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    a0, b0 = layer.lora_A["default"].detach().clone(), layer.lora_B["default"].detach().clone()
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(5, 16)).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(layer.lora_A["default"], a0) and not torch.equal(layer.lora_B["default"], b0)
    for k, v in base.state_dict().items():
        assert torch.equal(v, frozen[k]), k


def test_dropout_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 16), r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(6, 32)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, R.lora_linear(x, layer.base_layer.weight, layer.base_layer.bias,
                                                     layer.lora_A["default"], layer.lora_B["default"],
                                                     layer.scaling["default"]))
    assert torch.equal(layer(x), y_eval)
    layer.train()
    y1, y2 = layer(x), layer(x)
    assert not torch.equal(y1, y_eval) and not torch.equal(y1, y2)  # a fresh mask every step


@pytest.mark.parametrize("kwargs,arg", [
    (dict(r=0, alpha=8), "'r'"), (dict(r=2.5, alpha=8), "'r'"), (dict(r=4, alpha=float("nan")), "'alpha'"),
    (dict(r=4, alpha=8, dropout=1.0), "'dropout'"), (dict(r=4, alpha=8, dropout=-0.2), "'dropout'"),
])
def test_bad_options_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        LoraLinear(nn.Linear(4, 4), **kwargs)


def test_base_must_be_linear():
    with pytest.raises(TypeError, match="'base'.*Conv1d"):
        LoraLinear(nn.Conv1d(4, 4, 1), r=2, alpha=2)


def test_compiled_module_training_step_matches_eager():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8), r=4, alpha=8, dropout=0.0)
    nn.init.normal_(layer.lora_B["default"])
    x = torch.randn(3, 5, 16)

    def step(m):
        m.zero_grad()
        loss = m(x).pow(2).mean()
        loss.backward()
        return loss.detach(), m.lora_A["default"].grad.clone(), m.lora_B["default"].grad.clone()

    eager = step(layer)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    got = step(compiled)
    for u, v in zip(got, eager):
        torch.testing.assert_close(u, v)
    # With dropout the seed is drawn inside the graph: one graph serves every step.
    torch._dynamo.reset()
    layer.dropout["default"] = 0.3
    counts = torch._dynamo.utils.counters
    counts.clear()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    for _ in range(4):
        compiled(x).sum().backward()
    assert counts["stats"]["unique_graphs"] == 1
