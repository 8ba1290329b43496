"""Methods over an NF4 base (QLoRA and its relatives): a quantised model patched
with LoRA, VeRA, TokenTune (alone and with LoRA), bottleneck adapters or prompt
tuning gives the outputs and gradients of the same model with each NF4 layer
replaced by an nn.Linear holding its dequantised weight (the dense path, which
the other tests hold to peft and the adapters library), in both orders
(quantize then patch, patch then quantize). merge() requantises and reports the
rounding; unmerge() gives the original codes back bit for bit."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import pypeft
import tiny_models
from pypeft.quant import NF4Linear

TOL = dict(atol=2e-5, rtol=2e-5)


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The model with every NF4Linear replaced by an nn.Linear of its dequantised weight (frozen)."""
    out = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in out.named_modules() if isinstance(m, NF4Linear)]:
        dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        dense.weight = nn.Parameter(layer.dequantized_weight(torch.float32), requires_grad=False)
        if layer.bias is not None:
            dense.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=layer.bias.requires_grad)
        out.set_submodule(name, dense)
    return out


def randomise_adapters(model: nn.Module, seed: int = 3) -> None:
    """Trained-looking adapters (LoRA's B starts at zero, which would hide the update)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def copy_trainable(src: nn.Module, dst: nn.Module) -> None:
    theirs = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            if p.requires_grad:
                theirs[name].copy_(p)


def step(model, family, seed=7):
    """Loss and the trainable parameters' gradients of one forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # TokenTune's selection, dropout masks: the same draw in both models
    loss = model(**tiny_models.labels_for(family, tiny_models.inputs(family))).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_step(quantised, dense, family):
    loss_q, grads_q = step(quantised, family)
    loss_d, grads_d = step(dense, family)
    torch.testing.assert_close(loss_q, loss_d, **TOL)
    assert sorted(grads_q) == sorted(grads_d) and grads_q
    for name in grads_q:
        torch.testing.assert_close(grads_q[name], grads_d[name], **TOL, msg=name)
    batch = tiny_models.inputs(family)
    quantised.eval()
    dense.eval()  # no dropout: the two models' masks would come from different RNG states
    torch.testing.assert_close(tiny_models.output(quantised, batch), tiny_models.output(dense, batch), **TOL)


def patched_pair(family, patches, order="quantize first"):
    """(quantised model, its dequantised twin), both patched with `patches`
    (method, options) in turn from the same seed, adapters equal and randomised."""
    model = tiny_models.make(family)
    if order == "quantize first":
        pypeft.quantize(model)
        dense = dequantized_copy(model)
        pairs = (model, dense)
        for m in pairs:
            torch.manual_seed(0)
            for method, options in patches:
                pypeft.patch(m, method=method, **options)
    else:
        for method, options in patches:
            torch.manual_seed(0)
            pypeft.patch(model, method=method, **options)
        pypeft.quantize(model)
        dense = dequantized_copy(model)
    randomise_adapters(model)
    copy_trainable(model, dense)
    model.train()
    dense.train()
    return model, dense


LORA = ("lora", dict(r=4, alpha=8))


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "llama-cls"])
@pytest.mark.parametrize("order", ["quantize first", "patch first"])
def test_lora_over_nf4_is_lora_over_the_dequantised_weights(family, order):
    model, dense = patched_pair(family, [LORA], order)
    nf4 = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert nf4 and all(not p.requires_grad for m in nf4 for p in m.parameters())
    assert_same_step(model, dense, family)


def test_lora_dropout_over_nf4():
    model, dense = patched_pair("llama", [("lora", dict(r=4, alpha=8, dropout=0.3))])
    assert_same_step(model, dense, "llama")


@pytest.mark.parametrize("patches", [
    [("vera", dict(r=8))],
    [("tokentune", dict(k=3))],
    [LORA, ("tokentune", dict(k=3))],
    [("vera", dict(r=8)), ("tokentune", dict(k=3))],
    [("bottleneck", dict(preset="pfeiffer"))],
    [("bottleneck", dict(preset="pfeiffer", adapter_name="a")), ("bottleneck", dict(preset="pfeiffer", adapter_name="b")),
     ("fusion", dict(adapters=["a", "b"]))],
    [("prompt_tuning", dict(num_virtual_tokens=3))],
    [("prefix_tuning", dict(num_virtual_tokens=3))],
    [("p_tuning", dict(num_virtual_tokens=3))],
    [("read", dict(hidden=16))],
], ids=lambda p: "+".join(m for m, _ in p))
def test_methods_over_nf4(patches):
    model, dense = patched_pair("llama", patches)
    assert_same_step(model, dense, "llama")


@pytest.mark.parametrize("patches", [[("bitfit", {})], [("bitfit", {}), ("lora", dict(r=4, alpha=8, adapter_name="l"))]],
                         ids=["bitfit", "bitfit+lora"])
def test_bitfit_over_nf4(patches):
    model, dense = patched_pair("gpt2", patches)  # GPT-2's layers have biases (Llama's have none)
    assert_same_step(model, dense, "gpt2")


def test_compute_dtype_bfloat16_runs_adapters_in_bfloat16():
    model = pypeft.quantize(tiny_models.make("llama"), compute_dtype=torch.bfloat16)
    dense = dequantized_copy(model)
    for m in (model, dense):
        torch.manual_seed(0)
        pypeft.patch(m, method="lora", r=4, alpha=8)
    randomise_adapters(model)
    copy_trainable(model, dense)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].dtype == torch.float32  # peft's autocast_adapter_dtype over a bf16 compute dtype
    # The dense twin computes in bfloat16 where the quantised layers do.
    for name, m in dense.named_modules():
        if isinstance(m, nn.Linear) and "lm_head" not in name:
            m.to(torch.bfloat16)
    batch = tiny_models.inputs("llama")
    with torch.no_grad():
        x = model.model.embed_tokens(batch["input_ids"])
        y = layer(x)
        ref = dense.model.layers[0].self_attn.q_proj(x.to(torch.bfloat16)).float()
    assert y.dtype == x.dtype  # back in the activations' dtype, as the NF4 layer's own forward
    torch.testing.assert_close(y, ref, atol=2e-2, rtol=2e-2)


def test_merge_requantises_reports_the_rounding_and_unmerge_restores_the_codes():
    model, dense = patched_pair("llama", [LORA])
    model.eval()
    stored = {k: v.clone() for k, v in model.state_dict().items()}
    batch = tiny_models.inputs("llama")
    before = tiny_models.output(model, batch)
    with pytest.warns(UserWarning, match=r"requantis.*rounding.*unmerge"):
        pypeft.merge(model)
    layers = [m for m in model.modules() if getattr(m, "merge_error", None) is not None]
    assert layers
    for layer in layers:
        err = layer.merge_error
        assert 0 < err["relative_to_weight"] < 0.2 and err["max_abs"] > 0
        # What the merge rounded away, measured independently: the merged codes
        # decoded against the exact sum.
        target = layer.base_layer.dequantized_weight(torch.float32)  # requantised
        assert torch.isfinite(target).all()
    merged = tiny_models.output(model, batch)
    # The merged model runs the requantised weights: close to, not equal to, the unmerged one.
    assert not torch.equal(merged, before)
    torch.testing.assert_close(merged, before, atol=0.1, rtol=0.1)
    pypeft.unmerge(model)
    after = model.state_dict()
    assert sorted(after) == sorted(stored)
    for k in stored:
        assert torch.equal(after[k], stored[k]), k
    torch.testing.assert_close(tiny_models.output(model, batch), before, atol=0, rtol=0)


def test_merge_error_matches_an_independent_requantisation():
    model, _ = patched_pair("llama", [LORA])
    layer = model.model.layers[0].self_attn.q_proj
    base = layer.base_layer
    exact = base.dequantized_weight(torch.float32) + layer.delta_weight("default").detach()
    codes, absmax = pypeft.ops.nf4_quantize(exact)
    requantised = pypeft.ops.nf4_dequantize(codes, pypeft.ops.nf4_double_dequantize(
        *pypeft.ops.nf4_double_quantize(absmax)), 64, exact.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pypeft.merge(model)
    assert torch.equal(base.dequantized_weight(torch.float32), requantised)
    err = requantised - exact
    assert layer.merge_error["max_abs"] == pytest.approx(float(err.abs().max()))
    assert layer.merge_error["relative_to_update"] == pytest.approx(
        float(err.norm() / layer.delta_weight("default").detach().norm()), rel=1e-5)


def test_mixed_adapter_batch_over_nf4():
    model = pypeft.quantize(tiny_models.make("llama"))
    dense = dequantized_copy(model)
    for m in (model, dense):
        torch.manual_seed(0)
        pypeft.patch(m, method="lora", r=4, alpha=8, adapter_name="a")
        pypeft.patch(m, method="lora", r=2, alpha=4, adapter_name="b")
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        theirs = dict(dense.named_parameters())
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                theirs[name].copy_(p)
    batch = tiny_models.inputs("llama")
    with pypeft.mixed_batch(model, ["a", "b"]), pypeft.mixed_batch(dense, ["a", "b"]):
        torch.testing.assert_close(tiny_models.output(model, batch), tiny_models.output(dense, batch), **TOL)
