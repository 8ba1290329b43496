"""pypeft.patch(method="p_tuning"): the LSTM encoder on pypeft::recurrent_scan
against torch.nn.LSTM with copied weights (values and gradients), what trains,
what is saved (the encoder's output, as peft), loading back, bad options.
peft's own PromptEncoder is the oracle in tests/test_prompt_peft_oracle.py."""

import copy

import pytest
import torch
from safetensors.torch import load_file

import pypeft
import tiny_models as T
from prompt_helpers import batch_for, fresh, train_step
from pypeft.methods.prompt.encoders import PromptEncoder, ScanLSTM
from pypeft.methods.prompt.layer import ATTR

N = 4


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scan_lstm_equals_torch_lstm(layers, dtype):
    torch.manual_seed(layers)
    reference = torch.nn.LSTM(input_size=6, hidden_size=5, num_layers=layers, bidirectional=True,
                              batch_first=True, dtype=dtype)
    ours = ScanLSTM(6, 5, layers, 0.0, dtype, "cpu")
    assert set(dict(ours.named_parameters())) == set(dict(reference.named_parameters()))
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 7, 6, dtype=dtype, requires_grad=True)
    want = reference(x)[0]
    got = ours(x)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(got, want, **tol)
    g = torch.randn_like(want)
    want_grads = torch.autograd.grad(want, [x, *reference.parameters()], g)
    names = [n for n, _ in reference.named_parameters()]
    got_grads = torch.autograd.grad(got, [x, *(dict(ours.named_parameters())[n] for n in names)], g)
    for name, a, b in zip(["x", *names], got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")


def test_scan_lstm_initialises_as_torch_lstm():
    """Same distribution: uniform in ±1/sqrt(hidden)."""
    ours = ScanLSTM(6, 25, 1, 0.0, torch.float32, "cpu")
    for p in ours.parameters():
        assert p.abs().max() <= 1 / 5 and p.abs().max() > 0.8 / 5


def test_lstm_dropout_runs_between_layers_in_training_only():
    encoder = PromptEncoder(5, 8, "lstm", 6, 2, 0.5, torch.float32, "cpu")
    encoder.eval()
    still = encoder()
    torch.testing.assert_close(encoder(), still, rtol=0, atol=0)
    encoder.train()
    torch.manual_seed(0)
    assert not torch.allclose(encoder(), still)
    single = PromptEncoder(5, 8, "lstm", 6, 1, 0.5, torch.float32, "cpu").train()
    torch.testing.assert_close(single(), single(), rtol=0, atol=0)  # one layer: nothing between layers


@pytest.mark.parametrize("encoder", ["mlp", "lstm"])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_trains_the_encoder_and_saves_its_output(tmp_path, family, encoder):
    model = pypeft.patch(fresh(family), method="p_tuning", num_virtual_tokens=N, encoder=encoder,
                         encoder_hidden_size=8)
    live = model.get_submodule(ATTR).encoders["default"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    head = {n for n in trainable if ".copies." in n}
    assert trainable - head == {f"{ATTR}.encoders.default.{n}" for n, _ in live.named_parameters()}
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    train_step(model, family, batch_for(family))
    model.eval()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    pypeft.save_adapter(model, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"], live())
    loaded = pypeft.load_adapter(fresh(family), tmp_path)
    batch = batch_for(family, padding="left")
    torch.testing.assert_close(T.output(loaded, batch), T.output(model, batch), rtol=1e-6, atol=1e-6)
    # loaded as peft loads: the embeddings themselves, no encoder
    held = loaded.get_submodule(ATTR).encoders["default"]
    assert [n for n, _ in held.named_parameters()] == ["embedding.weight"]


def test_t5_encoder_runs_over_both_halves():
    """num_transformer_submodules = 2: the encoder runs over 2n tokens (the LSTM reads both halves), the
    encoder's input gets the first n."""
    model = pypeft.patch(fresh("t5"), method="p_tuning", num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=8)
    prompts = model.get_submodule(ATTR).prompts("default")
    assert prompts.shape == (2 * N, 64)
    base = T.make("t5")
    batch = batch_for("t5")
    ids = batch["input_ids"]
    embeds = torch.cat((prompts[:N].detach().expand(2, -1, -1), base.get_input_embeddings()(ids)), 1)
    want = T.output(base, {"inputs_embeds": embeds, "attention_mask": torch.ones(2, N + ids.shape[1]),
                           "decoder_input_ids": batch["decoder_input_ids"]})
    torch.testing.assert_close(T.output(model, batch), want, rtol=1e-6, atol=1e-6)


def test_unpatch_restores_exactly():
    base = T.make("gpt2-cls")
    model = pypeft.patch(copy.deepcopy(base), method="p_tuning", num_virtual_tokens=N, encoder="lstm")
    pypeft.unpatch(model)
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    batch = batch_for("gpt2-cls", padding="right")
    torch.testing.assert_close(T.output(model, batch), T.output(base, batch), rtol=0, atol=0)


@pytest.mark.parametrize("options, named", [
    ({"encoder": "gru"}, "encoder"),
    ({"encoder_hidden_size": 0}, "encoder_hidden_size"),
    ({"encoder_num_layers": 3}, "encoder_num_layers"),  # the MLP's depth is fixed (peft ignores it silently-ish)
    ({"encoder": "lstm", "encoder_num_layers": 0}, "encoder_num_layers"),
    ({"encoder_dropout": 1.0}, "encoder_dropout"),
    ({"num_virtual_tokens": -1}, "num_virtual_tokens"),
])
def test_bad_options_name_the_argument(options, named):
    with pytest.raises(ValueError, match=f"argument '{named}'"):
        pypeft.patch(fresh("llama"), method="p_tuning", **options)
