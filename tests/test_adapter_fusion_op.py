"""pypeft::adapter_fusion: what is particular to it. (The op contract —
opcheck, the reference on edge shapes, gradcheck, compile, TorchScript, what
it saves, bad input — runs from tests/op_table.py in test_op_contract.py.)
Here: the op against an nn.Module composition (N nn.Sequential adapters and
nn.Linear query / key / value, as the `adapters` library builds them), every
activation, what it saves when query is z, the dropout mask, bfloat16, and
CUDA against the CPU."""

import pytest
import torch
import torch.nn as nn

import reference as R
import saved_tensors
from conftest import requires_cuda
from pypeft.ops import adapter_fusion, counter_dropout

NN_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU("tanh"),
                  "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU, "identity": nn.Identity}


class Fusion(nn.Module):
    """N bottleneck adapters (down, act, up, times a scale) and a fusion layer
    attending over their outputs, in torch.nn modules (dropout 0)."""

    def __init__(self, d, m, scales, activation, value=True, dtype=torch.float64):
        super().__init__()
        self.scales = scales
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Linear(d, m, dtype=dtype), NN_ACTIVATIONS[activation](), nn.Linear(m, d, dtype=dtype))
            for _ in scales)
        self.query, self.key = nn.Linear(d, d, dtype=dtype), nn.Linear(d, d, dtype=dtype)
        self.value = nn.Linear(d, d, bias=False, dtype=dtype) if value else None

    def forward(self, z, query, residual, temperature):
        up = torch.stack([s * adapter(z) for s, adapter in zip(self.scales, self.adapters)], dim=-2)
        scores = (self.query(query).unsqueeze(-2) * self.key(up)).sum(-1)
        probs = torch.softmax(scores / temperature, dim=-1)
        values = self.value(up) if self.value is not None else up
        return (probs.unsqueeze(-1) * values).sum(-2) + residual

    def op_args(self):
        """The module's weights as the op takes them (stacked adapters)."""
        down = [a[0] for a in self.adapters]
        up = [a[2] for a in self.adapters]
        return dict(w_down=torch.stack([l.weight for l in down]), b_down=torch.stack([l.bias for l in down]),
                    w_up=torch.stack([l.weight for l in up]), b_up=torch.stack([l.bias for l in up]),
                    scales=self.scales, w_query=self.query.weight, b_query=self.query.bias, w_key=self.key.weight,
                    b_key=self.key.bias, w_value=self.value.weight if self.value is not None else None)


def fusion_inputs(lead, d, dtype=torch.float64, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*lead, d, generator=g, dtype=torch.float64).to(dtype).to(device) for _ in range(3)]


@pytest.mark.parametrize("activation", list(R.FUSION_ACTIVATIONS))
@pytest.mark.parametrize("value", [True, False])
def test_equals_an_nn_module_composition(activation, value):
    torch.manual_seed(0)
    module = Fusion(d=10, m=4, scales=[1.0, 0.5, 2.0], activation=activation, value=value)
    z, query, residual = fusion_inputs((2, 7), 10)
    z.requires_grad_()
    query.requires_grad_()
    residual.requires_grad_()
    want = module(z, query, residual, temperature=2.0)
    args = module.op_args()
    got = adapter_fusion(z, query, residual, activation=activation, temperature=2.0, **args)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)

    cotangent = torch.randn(want.shape, dtype=want.dtype, generator=torch.Generator().manual_seed(3))
    params = list(module.parameters())
    want_grads = torch.autograd.grad(want, [z, query, residual, *params], cotangent)
    # The op's weight gradients reach the module's parameters through torch.stack.
    got_grads = torch.autograd.grad(got, [z, query, residual, *params], cotangent)
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m: f"gradient {i}: {m}")


def saved_elements(z, query, n, m, rows):
    return (z.numel() + (0 if query is z else query.numel()) + rows * n * m + rows * n)


@pytest.mark.parametrize("query_is_z", [False, True])
def test_saves_inputs_activations_and_probabilities_only(query_is_z):
    """Saved: z and query (once when they are one tensor), [rows, N, m] and
    [rows, N]; the eager composition keeps N·d per row several times over."""
    torch.manual_seed(0)
    d, m, n, lead = 32, 4, 3, (4, 16)
    module = Fusion(d=d, m=m, scales=[1.0] * n, activation="gelu", dtype=torch.float32)
    z, query, residual = fusion_inputs(lead, d, torch.float32)
    z.requires_grad_()
    query = z if query_is_z else query.requires_grad_()
    args = module.op_args()
    seed = torch.tensor(3)
    params = [*module.parameters(), *(v for v in args.values() if isinstance(v, torch.Tensor)), seed]
    with saved_tensors.saved(exclude=params) as record:
        out = adapter_fusion(z, query, residual, activation="gelu", temperature=1.0, dropout_p=0.1, seed=seed,
                             **args)
    rows = z[..., 0].numel()
    assert record.nbytes == saved_elements(z, query, n, m, rows) * z.element_size(), record.shapes()
    with saved_tensors.saved(exclude=list(module.parameters())) as eager:
        module(z, query, residual, temperature=1.0)
    assert record.nbytes < eager.nbytes / 2, (record.nbytes, eager.nbytes)
    out.sum().backward()
    assert z.grad is not None


def test_dropout_mask_is_counter_dropout_on_the_scores():
    """The kept scores are those counter_dropout keeps on a [rows, N] tensor
    with the same seed; dropped scores are 0 before the temperature."""
    torch.manual_seed(0)
    n, m, d, lead, p, seed = 5, 3, 8, (6, 7), 0.4, 1234
    module = Fusion(d=d, m=m, scales=[1.0] * n, activation="relu")
    z, query, residual = fusion_inputs(lead, d)
    args = module.op_args()
    out, pre, probs = torch.ops.pypeft.adapter_fusion(
        z, query, residual, args["w_down"], args["b_down"], args["w_up"], args["b_up"], args["scales"], "relu",
        args["w_query"], args["b_query"], args["w_key"], args["b_key"], args["w_value"], 2.0, p, torch.tensor(seed))
    with torch.no_grad():
        up = torch.stack([adapter(z) for adapter in module.adapters], dim=-2)
        scores = (module.query(query).unsqueeze(-2) * module.key(up)).sum(-1).reshape(-1, n)
        keep = counter_dropout(torch.ones(scores.shape, dtype=torch.float64), p, torch.tensor(seed)) != 0
        assert torch.equal(keep, R.dropout_keep_mask(seed, scores.shape[0], n, p))
        assert 0 < keep.sum() < keep.numel()
        want = torch.softmax(torch.where(keep, scores / (1 - p), 0.0) / 2.0, -1)
    torch.testing.assert_close(probs.reshape(-1, n), want, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(pre, torch.einsum("...d,nmd->...nm", z, args["w_down"]) + args["b_down"])


def op_args_of(module):
    """op_args with plain tensors (no autograd graph to the module)."""
    return {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in module.op_args().items()}


def test_bfloat16_is_close_to_the_float64_reference():
    torch.manual_seed(0)
    d, lead = 64, (4, 32)
    module = Fusion(d=d, m=16, scales=[1.0, 0.5, 2.0], activation="gelu")
    args64 = op_args_of(module)
    inputs64 = fusion_inputs(lead, d)
    args16 = {k: v.bfloat16() if isinstance(v, torch.Tensor) else v for k, v in args64.items()}
    inputs16 = [t.bfloat16().requires_grad_() for t in inputs64]
    inputs64 = [t.bfloat16().double().requires_grad_() for t in inputs64]
    got = adapter_fusion(*inputs16, activation="gelu", temperature=1.0, **args16)
    want = R.adapter_fusion(*inputs64, args16["w_down"].double(), args16["b_down"].double(),
                            args16["w_up"].double(), args16["b_up"].double(), args16["scales"], "gelu",
                            args16["w_query"].double(), args16["b_query"].double(), args16["w_key"].double(),
                            args16["b_key"].double(), args16["w_value"].double(), 1.0)[0]
    assert got.dtype == torch.bfloat16
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, atol=0.02 * scale, rtol=0.02)
    cotangent = torch.randn(want.shape, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(got, inputs16, cotangent.bfloat16()),
                    torch.autograd.grad(want, inputs64, cotangent)):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.double(), b, atol=0.03 * b.abs().max().item(), rtol=0.03)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    """Same outputs, same mask and same gradients on CUDA as on the CPU
    (float16 and bfloat16 are covered by the op table's CUDA runs)."""
    torch.manual_seed(0)
    d, lead, p = 48, (8, 33), 0.3
    module = Fusion(d=d, m=12, scales=[1.0, 0.5, 2.0, 1.5], activation="silu", dtype=dtype)
    args = op_args_of(module)
    results = []
    for device in ("cpu", "cuda"):
        inputs = [t.to(device).requires_grad_() for t in fusion_inputs(lead, d, dtype)]
        dev_args = {k: v.to(device).requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        out = adapter_fusion(*inputs, activation="silu", temperature=1.5, dropout_p=p,
                             seed=torch.tensor(77, device=device), **dev_args)
        wrt = inputs + [v for v in dev_args.values() if isinstance(v, torch.Tensor)]
        grads = torch.autograd.grad(out, wrt, torch.ones_like(out))
        results.append([out.detach().cpu()] + [g.cpu() for g in grads])
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-9)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tol)


def test_gradients_of_the_probabilities_alone():
    """A loss on the fusion attentions only (no gradient reaches out): the op's
    backward runs without one and matches the reference's gradients."""
    torch.manual_seed(0)
    module = Fusion(d=8, m=3, scales=[1.0, 2.0], activation="tanh")
    args = op_args_of(module)
    z, query, residual = fusion_inputs((5,), 8)
    tensors = {"query": query, "w_query": args["w_query"], "w_key": args["w_key"], "w_down": args["w_down"]}
    weights = torch.randn(5, 2, dtype=torch.float64)
    grads = []
    for fn in (torch.ops.pypeft.adapter_fusion, R.adapter_fusion):
        leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
        call = {**args, **leaves}
        probs = fn(z, call["query"], residual, call["w_down"], call["b_down"], call["w_up"], call["b_up"],
                   call["scales"], "tanh", call["w_query"], call["b_query"], call["w_key"], call["b_key"],
                   call["w_value"], 1.0, 0.0, None if fn is not R.adapter_fusion else 0)[2]
        grads.append(torch.autograd.grad((probs * weights).sum(), list(leaves.values())))
    for name, a, b in zip(tensors, *grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=lambda m: f"{name}: {m}")
