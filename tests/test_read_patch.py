"""pypeft.patch(model, method="read"): the RNN beside a frozen backbone, against
a plain-PyTorch READ built from torch.nn cells (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

import pypeft
import saved_tensors
import tiny_models as tm
from reference import read_correction

# Where each family's final stack is, written out here rather than asked of pypeft.
STACKS = {"bert": ("bert.encoder", "layer"), "roberta": ("roberta.encoder", "layer"), "gpt2": ("transformer", "h"),
          "llama": ("model", "layers"), "t5": ("decoder", "block")}
CELLS = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell}
WIDTH = 64  # tiny_models' hidden size


def _hidden(output):
    if isinstance(output, torch.Tensor):
        return output
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def capture(model, family, batch, layers=None):
    """(outputs of the final stack's layers, the stack's output) of one forward."""
    stack_name, layers_attr = STACKS[family]
    stack = model.get_submodule(stack_name)
    seen, handles = {}, []
    for i, layer in enumerate(getattr(stack, layers_attr)):
        handles.append(layer.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, _hidden(out))))
    handles.append(stack.register_forward_hook(lambda m, a, out: seen.__setitem__("stack", _hidden(out))))
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    count = len(getattr(stack, layers_attr))
    chosen = range(count) if layers is None else [i % count for i in layers]
    return [seen[i] for i in chosen], seen["stack"]


def network_of(model, family, name="default"):
    return model.get_submodule(STACKS[family][0]).pypeft_read.networks[name]


def reference_modules(network, rnn: str, hidden: int):
    """torch.nn cell and joiner holding the network's weights."""
    cell = CELLS[rnn](WIDTH, hidden)
    joiner = nn.Linear(hidden, WIDTH)
    with torch.no_grad():
        for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, n).copy_(getattr(network, n))
        joiner.weight.copy_(network.joiner.weight)
        joiner.bias.copy_(network.joiner.bias)
    return cell, joiner


def randomise_joiner(network, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        network.joiner.weight.copy_(torch.randn(network.joiner.weight.shape, generator=g) * 0.5)
        network.joiner.bias.copy_(torch.randn(network.joiner.bias.shape, generator=g) * 0.1)


def patched(family, **options):
    model = tm.make(family)
    pypeft.patch(model, method="read", **options)
    return model


# --- forward and gradients against the reference ----------------------------------------

def check_against_reference(family, rnn="gru", hidden=8, aggregate="mean", layers=None):
    base, model, batch = tm.make(family), patched(family, rnn=rnn, hidden=hidden, aggregate=aggregate,
                                                  layers=layers), tm.inputs(family)
    network = network_of(model, family)
    randomise_joiner(network)
    cell, joiner = reference_modules(network, rnn, hidden)
    layer_outputs, base_out = capture(base, family, batch, layers)
    _, out = capture(model, family, batch)
    expected = base_out.detach() + read_correction(layer_outputs, cell, joiner, aggregate)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    (out * weights).sum().backward()
    (expected * weights).sum().backward()
    for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        torch.testing.assert_close(getattr(network, n).grad, getattr(cell, n).grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(network.joiner.weight.grad, joiner.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(network.joiner.bias.grad, joiner.bias.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(STACKS))
def test_correction_and_grads_match_reference(family):
    check_against_reference(family)


@pytest.mark.parametrize("rnn", list(CELLS))
@pytest.mark.parametrize("aggregate", ["mean", "last"])
def test_every_cell_and_aggregate_match_reference(rnn, aggregate):
    check_against_reference("bert", rnn=rnn, aggregate=aggregate)


def test_a_subset_of_layers_matches_reference():
    big = {"llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tm.VOCAB, hidden_size=WIDTH, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0))}
    original = dict(tm.FAMILIES)
    tm.FAMILIES.update(big)
    try:
        check_against_reference("llama", rnn="lstm", layers=[0, -1, 2], aggregate="last")
    finally:
        tm.FAMILIES.clear()
        tm.FAMILIES.update(original)


# --- the model at init, what trains, what is kept ----------------------------------------

@pytest.mark.parametrize("family", list(STACKS))
@pytest.mark.parametrize("rnn", list(CELLS))
def test_patched_model_starts_equal_to_base(family, rnn):
    base, model, batch = tm.make(family), patched(family, rnn=rnn, hidden=16), tm.inputs(family)
    torch.testing.assert_close(tm.output(model, batch), tm.output(base, batch), rtol=0, atol=0)
    # In training mode the backbone's dropout masks are the counter hash's (test_read_dropout.py).


@pytest.mark.parametrize("family", list(STACKS))
def test_only_read_and_the_head_get_gradients(family):
    model = patched(family, hidden=8)
    randomise_joiner(network_of(model, family))
    model.train()
    model(**tm.labels_for(family, tm.inputs(family))).loss.backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert got == trainable
    assert all(".pypeft_read." in n or ".copies.default." in n for n in got), sorted(got)
    assert any(".pypeft_read." in n for n in got)


# Autograd nodes only the backbone would make (attention, norms, embeddings, activations).
# (The loss's LogSoftmax is the head's.)
BACKBONE_NODES = ("Softmax", "SafeSoftmax", "Embedding", "NativeLayerNorm", "Rsqrt", "Pow", "ScaledDotProduct",
                  "Gelu", "Silu", "Bmm")


def graph_node_names(t: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return names


def saved_bytes(model, fn) -> tuple[int, torch.Tensor]:
    """Bytes of the distinct storages saved for backward in fn(), the model's parameters (and views of them)
    excluded."""
    with saved_tensors.saved(exclude=model.parameters()) as record:
        out = fn()
    return record.nbytes, out


@pytest.mark.parametrize("family", list(STACKS))
def test_no_graph_and_no_saved_tensor_of_the_backbone(family):
    hidden = 8
    model = patched(family, hidden=hidden)
    randomise_joiner(network_of(model, family))
    model.train()
    batch = tm.labels_for(family, tm.inputs(family))
    nbytes, out = saved_bytes(model, lambda: model(**batch).loss)
    names = graph_node_names(out)
    assert not [n for n in names if n.startswith(BACKBONE_NODES)], sorted(names)
    # What READ keeps: the normalised layer outputs and the RNN's states (and its
    # zero start state and summary); the head keeps at most a few [B, T, d] tensors.
    stack_name, layers_attr = STACKS[family]
    layers = len(getattr(model.get_submodule(stack_name), layers_attr))
    B, T = (batch.get("decoder_input_ids", batch["labels"]) if family == "t5" else batch["input_ids"]).shape
    rows = B * T
    read_bytes = 4 * (layers * rows * WIDTH + layers * rows * hidden + 2 * rows * hidden)
    head_bytes = 4 * 3 * rows * max(WIDTH, tm.VOCAB)
    assert nbytes <= read_bytes + head_bytes
    full = tm.make(family).train()
    full_bytes, _ = saved_bytes(full, lambda: full(**batch).loss)
    assert nbytes < 0.5 * full_bytes


def test_trainable_parameters_do_not_grow_with_depth():
    def count(layers):
        cfg = transformers.BertConfig(vocab_size=tm.VOCAB, hidden_size=WIDTH, num_hidden_layers=layers,
                                      num_attention_heads=4, intermediate_size=96, num_labels=3)
        model = transformers.BertForSequenceClassification(cfg)
        pypeft.patch(model, method="read", hidden=32)
        return pypeft.trainable_parameters(model)

    (t12, total12), (t24, total24) = count(12), count(24)
    assert total24 > 1.8 * total12 - t12  # the backbone did double
    assert abs(t24 - t12) / t12 < 0.01


# --- decoding, adapters, lifecycle -------------------------------------------------------

def test_cached_decoding_equals_a_full_forward():
    """Each token's correction depends only on its own layer states, so GPT-2's
    incremental decoding with a KV cache sees the corrections a full forward does."""
    model = patched("gpt2", hidden=8)
    randomise_joiner(network_of(model, "gpt2"))
    ids = tm.inputs("gpt2", batch=1)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        past = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = model(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = patched("bert", rnn="lstm", hidden=8, layers=[-1, 0], aggregate="last")
    randomise_joiner(network_of(model, "bert"))
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    batch = tm.inputs("bert")
    expected = tm.output(model, batch)
    pypeft.save_adapter(model, tmp_path / "read")
    loaded = pypeft.load_adapter(tm.make("bert"), tmp_path / "read")
    torch.testing.assert_close(tm.output(loaded, batch), expected, rtol=0, atol=0)
    config = loaded.pypeft.adapters["default"].config
    assert (config.rnn, config.hidden, tuple(config.layers), config.aggregate) == ("lstm", 8, (-1, 0), "last")


def test_loading_into_another_model_fails_and_changes_nothing(tmp_path):
    model = patched("bert", hidden=8)
    pypeft.save_adapter(model, tmp_path / "read")
    other = tm.make("roberta")
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(pypeft.io.AdapterFormatError, match="saved for a stack"):
        pypeft.load_adapter(other, tmp_path / "read")
    assert getattr(other, "pypeft", None) is None
    assert other.state_dict().keys() == before.keys()


def test_two_adapters_switch_disable_delete_and_unpatch():
    base, model, batch = tm.make("bert"), patched("bert", hidden=8), tm.inputs("bert")
    pypeft.patch(model, method="read", rnn="rnn", hidden=4, adapter_name="other")
    randomise_joiner(network_of(model, "bert"), seed=1)
    randomise_joiner(network_of(model, "bert", "other"), seed=2)
    pypeft.set_adapter(model, "default")  # patch() made "other" the active one
    first = tm.output(model, batch)
    pypeft.set_adapter(model, "other")
    second = tm.output(model, batch)
    assert not torch.allclose(first, second)
    assert {n for n, p in model.named_parameters() if p.requires_grad and "pypeft_read" in n} == \
        {n for n, _ in network_of(model, "bert", "other").named_parameters(prefix="bert.encoder.pypeft_read.networks.other")}
    with pypeft.disabled(model):
        torch.testing.assert_close(tm.output(model, batch), tm.output(base, batch), rtol=0, atol=0)
    with pytest.raises(ValueError, match="cannot be folded"):
        pypeft.merge(model)
    pypeft.delete_adapter(model, "default")
    torch.testing.assert_close(tm.output(model, batch), second, rtol=0, atol=0)
    pypeft.unpatch(model)
    assert "forward" not in model.bert.encoder.__dict__
    assert model.state_dict().keys() == base.state_dict().keys()
    torch.testing.assert_close(tm.output(model, batch), tm.output(base, batch), rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


def test_a_deep_copy_is_a_patched_model_of_its_own():
    import copy

    model, batch = patched("bert", hidden=8), tm.inputs("bert")
    randomise_joiner(network_of(model, "bert"))
    twin = copy.deepcopy(model)
    torch.testing.assert_close(tm.output(twin, batch), tm.output(model, batch), rtol=0, atol=0)
    with torch.no_grad():
        network_of(twin, "bert").joiner.bias.add_(1.0)
    assert not torch.allclose(tm.output(twin, batch), tm.output(model, batch))
    pypeft.unpatch(twin)
    torch.testing.assert_close(tm.output(twin, batch), tm.output(tm.make("bert"), batch), rtol=0, atol=0)
    assert "forward" in model.bert.encoder.__dict__  # the original keeps its READ


def test_compiled_model_gives_the_eager_gradients():
    model = patched("bert", hidden=8)
    network = network_of(model, "bert")
    randomise_joiner(network)
    batch = tm.labels_for("bert", tm.inputs("bert"))
    model(**batch).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    torch.compile(model, backend="aot_eager")(**batch).loss.backward()
    for n, g in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6)


# --- bad input ---------------------------------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"rnn": "transformer"}, "argument 'rnn': expected one of \\['gru', 'lstm', 'rnn'\\], got 'transformer'"),
    ({"hidden": 0}, "argument 'hidden': expected a positive int, got 0"),
    ({"hidden": -3}, "argument 'hidden'"),
    ({"aggregate": "max"}, "argument 'aggregate'"),
    ({"layers": [0, 2]}, "argument 'layers': index 2 is out of range for a stack of 2 layers"),
    ({"layers": [-3]}, "argument 'layers': index -3 is out of range"),
    ({"layers": [1, -1]}, "names a layer twice"),
    ({"layers": []}, "argument 'layers'"),
])
def test_bad_options_raise_and_change_nothing(options, match):
    model = tm.make("bert")
    with pytest.raises(ValueError, match=match):
        pypeft.patch(model, method="read", **options)
    assert getattr(model, "pypeft", None) is None and "forward" not in model.bert.encoder.__dict__
    assert all(p.requires_grad for p in model.parameters())


def test_a_model_without_layers_is_refused():
    with pytest.raises(ValueError, match="argument 'model'.*no stack of transformer layers"):
        pypeft.patch(nn.Sequential(nn.Linear(4, 4)), method="read")


def test_read_does_not_compose_with_methods_inside_the_backbone():
    model = patched("bert", hidden=8)
    for method in ("lora", "tokentune"):
        with pytest.raises(ValueError, match="does not compose"):
            pypeft.patch(model, method=method)
    lora = tm.make("bert")
    pypeft.patch(lora, method="lora")
    with pytest.raises(ValueError, match="patched with lora already"):
        pypeft.patch(lora, method="read")
