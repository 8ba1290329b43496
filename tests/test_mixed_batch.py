"""pypeft.mixed_batch: each batch row runs with its own adapter (or the base),
equal to running that row alone with its adapter active; one op call per
adapted layer; `peft`'s adapter_names as a second oracle for LoRA; errors."""

import copy
import re

import pytest
import torch

import pypeft
import tiny_models as T

FAMILIES = ["bert", "gpt2", "llama", "t5"]


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)


def with_adapters(family, method, names, **options):
    model = T.make(family)
    for i, name in enumerate(names):
        defaults = dict(r=4, alpha=8) if method == "lora" else dict(r=16)
        pypeft.patch(model, method=method, adapter_name=name, **{**defaults, **options})
        randomize(model, i)  # only the newest adapter is trainable, so each gets its own values
    return model


def row_alone(model, batch, row, name):
    one = {k: v[row:row + 1] for k, v in batch.items()}
    if name == "base":
        with pypeft.disabled(model):
            return T.output(model, one)
    pypeft.set_adapter(model, name)
    return T.output(model, one)


def check_rows(model, batch, row_names, atol=1e-5):
    with pypeft.mixed_batch(model, row_names):
        got = T.output(model, batch)
    active = model.pypeft.active
    for row, name in enumerate(row_names):
        torch.testing.assert_close(got[row:row + 1], row_alone(model, batch, row, name), atol=atol, rtol=1e-5,
                                   msg=lambda m: f"row {row} ({name}): {m}")
    pypeft.set_adapter(model, active)
    return got


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "vera"])
def test_each_row_equals_running_it_alone(family, method):
    names = ["a", "b", "c"]
    model = with_adapters(family, method, names)
    batch = T.inputs(family, batch=6)
    rows = ["b", "base", "a", "b", "c", "a"]  # interleaved, repeated, and a base row
    got = check_rows(model, batch, rows)
    everyone_c = T.output(model, batch)  # "c", the active adapter, on every row
    assert (got[0] - everyone_c[0]).abs().max() > 1e-4  # adapter b's row is not adapter c's
    # After the block the model runs its active adapter on every row again.
    pypeft.set_adapter(model, "c")
    torch.testing.assert_close(T.output(model, batch)[4:5], row_alone(model, batch, 4, "c"), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["lora", "vera"])
def test_one_op_call_per_adapted_layer(method):
    model = with_adapters("bert", method, ["a", "b", "c"])
    batch = T.inputs("bert", batch=5)
    op = {"lora": torch.ops.pypeft.lora_linear_mixed, "vera": torch.ops.pypeft.vera_linear_mixed}[method]
    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (op, op.default):
                calls.append(func)
            return func(*args, **(kwargs or {}))

    layers = len(model.pypeft.adapters["a"].layers)
    with pypeft.mixed_batch(model, ["a", "b", "c", "a", "base"]), Count():
        T.output(model, batch)
    assert len(calls) == layers


def test_modules_to_save_follow_each_row():
    # The classifier head is trained in full per adapter; each row uses its own copy.
    model = with_adapters("bert", "lora", ["a", "b"])
    heads = model.classifier.copies
    assert not torch.equal(heads["a"].weight, heads["b"].weight)
    check_rows(model, T.inputs("bert", batch=4), ["a", "b", "base", "b"])


def test_lora_and_vera_adapters_in_one_batch():
    model = with_adapters("bert", "lora", ["l1", "l2"])
    pypeft.patch(model, method="vera", r=16, adapter_name="v1", target_modules=["key"])
    randomize(model, 9)
    check_rows(model, T.inputs("bert", batch=4), ["v1", "l1", "base", "l2"])


def test_merged_model_is_unmerged_for_the_block():
    model = with_adapters("llama", "lora", ["a", "b"])
    batch = T.inputs("llama", batch=3)
    pypeft.set_adapter(model, "a")
    merged_out = T.output(pypeft.merge(model), batch)
    check_rows(model, batch, ["b", "a", "base"], atol=1e-4)
    assert model.pypeft.merged
    torch.testing.assert_close(T.output(model, batch), merged_out, atol=1e-5, rtol=1e-5)


def test_agrees_with_peft_adapter_names():
    peft = pytest.importorskip("peft", reason="peft's mixed batch is a second oracle")
    base = T.make("bert")
    batch = T.inputs("bert", batch=4)
    rows = ["x", "__base__", "y", "x"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8),
                                 adapter_name="x")
    theirs.add_adapter("y", peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8))
    ours = pypeft.patch(copy.deepcopy(base), method="lora", r=4, alpha=8, adapter_name="x")
    pypeft.patch(ours, method="lora", r=4, alpha=8, adapter_name="y")
    theirs_params = dict(theirs.named_parameters())
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name or ".copies." in name:
                value = torch.randn(p.shape, generator=g) * 0.2
                p.copy_(value)
                # ours: ...query.lora_A.x, classifier.copies.x.weight; peft: ...query.lora_A.x.weight,
                # classifier.modules_to_save.x.weight
                peft_name = re.sub(r"\.lora_([AB])\.(\w+)$", r".lora_\1.\2.weight", name)
                theirs_params["base_model.model." + peft_name.replace(".copies.", ".modules_to_save.")].copy_(value)
    with torch.no_grad():
        want = theirs.eval()(**batch, adapter_names=rows).logits
    with pypeft.mixed_batch(ours, [n if n != "__base__" else "base" for n in rows]):
        got = T.output(ours, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows, pattern", [
    (["a", "zed"], r"'adapter_names'.*unknown adapter 'zed'.*\['a', 'b'\] or 'base'"),
    ("a", r"'adapter_names'.*list of adapter names"),
    (["a", "b", "a"], r"'adapter_names'.*one name per batch row \(2\), got 3"),
])
def test_bad_adapter_names(rows, pattern):
    model = with_adapters("bert", "lora", ["a", "b"])
    batch = T.inputs("bert", batch=2)
    with pytest.raises(ValueError, match=pattern):
        with pypeft.mixed_batch(model, rows):
            T.output(model, batch)


def test_training_mode_is_refused():
    model = with_adapters("bert", "vera", ["a"]).train()
    with pytest.raises(ValueError, match=r"inference.*model\.eval\(\)"):
        with pypeft.mixed_batch(model, ["a", "base"]):
            pass
