"""pypeft::adapter_fusion: AdapterFusion (Pfeiffer et al. 2021) over N
bottleneck adapters in one op, with the `adapters` library's math:

    a_i = act(W_down_i z + b_down_i)        u_i = s_i (W_up_i a_i + b_up_i)
    q = W_q query + b_q                     k_i = W_k u_i + b_k
    p = softmax_i(drop(q·k_i) / temperature)
    out = residual + W_v Σ_i p_i u_i        (W_v = identity when w_value is None)

The N up-projections u_i are never materialised: the scores and the context
are products with the N adapters' up-projections stacked into one matrix
(csrc/include/pypeft/adapter_fusion.h). Saved for backward: z and query (once
when they are one tensor), the bottleneck pre-activations [..., N, m] and p
[..., N]; nothing of size N·d per token. The dropout mask on the [rows, N]
scores is counter_dropout's, regenerated in backward; dropped scores become 0
(the library's nn.Dropout before the temperature), kept ones are scaled by
1 / (1 - dropout_p).

The raw op, torch.ops.pypeft.adapter_fusion, also returns pre_act [..., N, m]
and probs [..., N] (the fusion attentions the library reports with
output_adapter_fusion_attentions); gradients reaching them are honoured.

Scales and temperature are Python floats, constants to torch.compile: a
temperature annealed every step (the library's temperature=True) recompiles
a compiled graph at each new value.

dtypes: one for every tensor: float32, float64, bfloat16 (float16 too on
CUDA); anything else raises a TypeError naming the argument.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pypeft.ops import _checks, saved_inputs
from pypeft.ops._checks import check_shape, check_value, shape_str
from pypeft.ops._double_backward import forbid_double_backward

_op = torch.ops.pypeft.adapter_fusion.default
_backward_op = torch.ops.pypeft.adapter_fusion_backward.default
_OP, _BACKWARD_OP = "pypeft.adapter_fusion", "pypeft.adapter_fusion_backward"

ACTIVATIONS = ("relu", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid", "leaky_relu", "identity")


def adapter_fusion(
    z: torch.Tensor,
    query: torch.Tensor,
    residual: torch.Tensor | None,
    w_down: torch.Tensor,
    b_down: torch.Tensor,
    w_up: torch.Tensor,
    b_up: torch.Tensor,
    scales: Sequence[float],
    activation: str,
    w_query: torch.Tensor,
    b_query: torch.Tensor | None,
    w_key: torch.Tensor,
    b_key: torch.Tensor | None,
    w_value: torch.Tensor | None,
    temperature: float,
    dropout_p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """AdapterFusion's output for z [..., d].

    Args:
        z: [..., d] the adapters' input; query: [..., d] the fusion query
            (may be z itself); residual: [..., d] added to the output, or None.
        w_down: [N, m, d], b_down: [N, m]; w_up: [N, d, m], b_up: [N, d]: the
            N adapters' projections stacked; scales: their N scaling factors
            (Python floats: constants to torch.compile).
        activation: the adapters' non-linearity, one of ACTIVATIONS
            ("gelu" is erf-based, "gelu_tanh" the tanh approximation,
            "leaky_relu" has slope 0.01).
        w_query, w_key: [d, d], b_query, b_key: [d] or None; w_value: [d, d]
            (no bias) or None for no value projection. (The library's
            value_before_softmax True and False are the same math.)
        temperature: > 0; the scores are divided by it.
        dropout_p: dropout probability on the scores, in [0, 1).
        seed: 0-dim int64 tensor choosing the mask, needed when dropout_p > 0.
    Returns:
        out: [..., d].
    """
    return _op(z, query, residual, w_down, b_down, w_up, b_up, [float(s) for s in scales], activation, w_query,
               b_query, w_key, b_key, w_value, float(temperature), float(dropout_p), seed)[0]


# --- argument checks (the C++ driver's, csrc/adapter_fusion.cpp) -------------------------

def _like_z(op, arg, t, z):
    _checks.check_same_device(op, arg, t, "z", z)
    _checks.check_same_dtype(op, arg, t, "z", z)


def _like_z_shaped(op, arg, t, z):
    check_shape(op, arg, t, z.shape, " (the shape of 'z')")
    _like_z(op, arg, t, z)


def _check_args(op, z, query, w_down, w_up, b_up, scales, activation, w_query, b_query, w_key, b_key, w_value,
                temperature, dropout_p, seed):
    """What the forward and backward ops share; returns (N, m)."""
    _checks.check_defined(op, "z", z)
    check_value(z.dim() >= 1, op, "z", "a tensor of shape [..., d]", "a 0-D tensor")
    _checks.check_activation_dtype(op, "z", z)
    d = z.shape[-1]
    check_value(d >= 1, op, "z", "a tensor of shape [..., d] with d >= 1", f"shape {shape_str(z.shape)}")
    _like_z_shaped(op, "query", query, z)
    _checks.check_dim(op, "w_down", w_down, 3)
    n, m = w_down.shape[0], w_down.shape[1]
    for size in (n, m):
        check_value(size >= 1, op, "w_down", "shape [N, m, d] with N >= 1 adapters and bottleneck m >= 1",
                    f"shape {shape_str(w_down.shape)}")
    _checks.check_size(op, "w_down", w_down, 2, d, "d, from z [..., d]")
    _like_z(op, "w_down", w_down, z)
    check_shape(op, "w_up", w_up, (n, d, m), " (N, m from w_down [N, m, d])")
    _like_z(op, "w_up", w_up, z)
    check_shape(op, "b_up", b_up, (n, d), " (N from w_down [N, m, d])")
    _like_z(op, "b_up", b_up, z)
    check_value(len(scales) == n, op, "scales", f"{n} values (one per adapter, N from w_down [N, m, d])",
                f"{len(scales)} values")
    for s in scales:
        _checks.check_value(s == s and abs(s) != float("inf"), op, "scales", "finite numbers", _checks.number_str(s))
    check_value(activation in ACTIVATIONS, op, "activation", "one of " + ", ".join(f"'{a}'" for a in ACTIVATIONS),
                f"'{activation}'")
    square = " (d, from z [..., d])"
    for arg, t, shape in (("w_query", w_query, (d, d)), ("b_query", b_query, (d,)), ("w_key", w_key, (d, d)),
                          ("b_key", b_key, (d,)), ("w_value", w_value, (d, d))):
        if t is not None or arg in ("w_query", "w_key"):
            check_shape(op, arg, t, shape, square)
            _like_z(op, arg, t, z)
    check_value(temperature == temperature and abs(temperature) != float("inf") and temperature > 0, op,
                "temperature", "a finite number > 0", _checks.number_str(temperature))
    _checks.check_probability(op, "dropout_p", dropout_p)
    _checks.check_seed(op, "seed", seed, dropout_p > 0.0, z)
    return n, m


@torch.library.register_fake("pypeft::adapter_fusion")
def _adapter_fusion_fake(z, query, residual, w_down, b_down, w_up, b_up, scales, activation, w_query, b_query,
                         w_key, b_key, w_value, temperature, dropout_p, seed):
    n, m = _check_args(_OP, z, query, w_down, w_up, b_up, scales, activation, w_query, b_query, w_key, b_key,
                       w_value, temperature, dropout_p, seed)
    check_shape(_OP, "b_down", b_down, (n, m), " (N, m from w_down [N, m, d])")
    _like_z(_OP, "b_down", b_down, z)
    if residual is not None:
        _like_z_shaped(_OP, "residual", residual, z)
    lead = tuple(z.shape[:-1])
    return z.new_empty(z.shape), z.new_empty((*lead, n, m)), z.new_empty((*lead, n))


@torch.library.register_fake("pypeft::adapter_fusion_backward")
def _adapter_fusion_backward_fake(grad_out, grad_pre_act, grad_probs, z, query, pre_act, probs, w_down, w_up, b_up,
                                  scales, activation, w_query, b_query, w_key, b_key, w_value, temperature, dropout_p,
                                  seed, output_mask):
    op = _BACKWARD_OP
    n, m = _check_args(op, z, query, w_down, w_up, b_up, scales, activation, w_query, b_query, w_key, b_key, w_value,
                       temperature, dropout_p, seed)
    lead = tuple(z.shape[:-1])
    pre_why, probs_why = " ([..., N, m]: z's leading dims, N, m from w_down)", " ([..., N]: z's leading dims, N from w_down)"
    _like_z_shaped(op, "grad_out", grad_out, z)
    for arg, t, shape, why in (("grad_pre_act", grad_pre_act, (*lead, n, m), pre_why),
                               ("grad_probs", grad_probs, (*lead, n), probs_why),
                               ("pre_act", pre_act, (*lead, n, m), pre_why), ("probs", probs, (*lead, n), probs_why)):
        if t is not None or arg in ("pre_act", "probs"):
            check_shape(op, arg, t, shape, why)
            _like_z(op, arg, t, z)
    d = z.shape[-1]
    present = (True, True, True, True, True, True, True, True, b_query is not None, True, b_key is not None,
               w_value is not None)
    shapes = (z.shape, query.shape, z.shape, (n, m, d), (n, m), (n, d, m), (n, d), (d, d), (d,), (d, d), (d,), (d, d))
    return tuple(z.new_empty(shape) if need and there else None
                 for need, there, shape in zip(output_mask, present, shapes))


# --- autograd --------------------------------------------------------------------------

def _setup_context(ctx, inputs, output):
    (z, query, residual, w_down, b_down, w_up, b_up, scales, activation, w_query, b_query, w_key, b_key, w_value,
     temperature, dropout_p, seed) = inputs
    _, pre_act, probs = output
    ctx.z_recipe, z_saved = saved_inputs.plan(z)
    # The library's usual call passes one tensor as both: keep it once.
    ctx.query_is_z = query is z
    ctx.query_recipe, query_saved = (None, ()) if ctx.query_is_z else saved_inputs.plan(query)
    ctx.z_count = len(z_saved)
    ctx.save_for_backward(pre_act, probs, w_down, w_up, b_up, w_query, b_query, w_key, b_key, w_value, seed,
                          *z_saved, *query_saved)
    ctx.scales, ctx.activation, ctx.temperature, ctx.dropout_p = scales, activation, temperature, dropout_p
    # Gradients of the auxiliary outputs are almost always absent: None, not zeros.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_pre_act, grad_probs):
    pre_act, probs, w_down, w_up, b_up, w_query, b_query, w_key, b_key, w_value, seed, *inputs = ctx.saved_tensors
    z = saved_inputs.rebuild(ctx.z_recipe, tuple(inputs[:ctx.z_count]))
    query = z if ctx.query_is_z else saved_inputs.rebuild(ctx.query_recipe, tuple(inputs[ctx.z_count:]))
    need = ctx.needs_input_grad
    if grad_out is None:
        grad_out = torch.zeros_like(z)
    mask = [*need[:7], *need[9:14]]  # the tensor inputs, without scales and activation
    grads = _backward_op(grad_out, grad_pre_act, grad_probs, z, query, pre_act, probs, w_down, w_up, b_up,
                         ctx.scales, ctx.activation, w_query, b_query, w_key, b_key, w_value, ctx.temperature,
                         ctx.dropout_p, seed, mask)
    return (*grads[:7], None, None, *grads[7:], None, None, None)


torch.library.register_autograd("pypeft::adapter_fusion", _backward, setup_context=_setup_context)

forbid_double_backward("pypeft::adapter_fusion_backward", "pypeft.adapter_fusion")
