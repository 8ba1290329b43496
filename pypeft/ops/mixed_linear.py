"""pypeft::lora_linear_mixed and pypeft::vera_linear_mixed: mixed-adapter
batches for serving, where each batch row runs with its own adapter.

    row b of x [B, ..., in], k = row_adapter[b]:
      k == -1:  y[b] = x[b] Wᵀ + b                      (bit for bit F.linear)
      LoRA:     y[b] = x[b] Wᵀ + b + scale[k] · (x[b] A_kᵀ) B_kᵀ
      VeRA:     y[b] = x[b] Wᵀ + b + λ_b[k] ⊙ ((λ_d[k] ⊙ (x[b] A_sᵀ)) B_sᵀ)

One op call per layer; the loop over adapters runs in C++ (csrc/mixed_linear.cpp).
Inference only: no dropout, and no gradient — backward through either op
raises a RuntimeError that says so (run them under torch.no_grad() or
torch.inference_mode(); train an adapter with lora_linear / vera_linear).

dtypes: x, weight and bias share one dtype: float32, float64 or bfloat16
(float16 too on CUDA). Each adapter's tensors share one dtype: x's, or float32
when x is bfloat16/float16; the adapter part is computed in that dtype and
added to y in y's dtype. Any other mix raises a TypeError naming the argument.
All tensors live on x's device.

row_adapter is a list of Python ints, so torch.compile specialises on it
(guards on its values): a compiled layer recompiles for each new assignment.

An NF4 base (QLoRA serving): with the keyword weight_absmax given (float32,
one per weight_blocksize values), weight holds uint8 NF4 codes [out, in // 2];
the frozen product runs tile by tile of W's rows (no full-precision W), and
base rows equal pypeft.ops.nf4_linear's.
"""

from __future__ import annotations

import torch

from pypeft.ops import _checks

_lora_op = torch.ops.pypeft.lora_linear_mixed.default
_vera_op = torch.ops.pypeft.vera_linear_mixed.default
_LORA_OP, _VERA_OP = "pypeft.lora_linear_mixed", "pypeft.vera_linear_mixed"


def lora_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: list[torch.Tensor],
    lora_b: list[torch.Tensor],
    scale: list[float],
    row_adapter: list[int],
    *,
    weight_absmax: torch.Tensor | None = None,
    weight_blocksize: int = 64,
) -> torch.Tensor:
    """A linear layer whose batch rows each run with their own LoRA adapter.

    Args:
        x: [B, ..., in] activations, at least 2-D; dim 0 indexes batch rows.
        weight: [out, in] frozen base weight, or (weight_absmax given) its NF4
            codes, uint8 [out, in // 2]; bias: [out] or None.
        lora_a: K tensors, lora_a[k] of shape [r_k, in] (ranks may differ).
        lora_b: K tensors, lora_b[k] of shape [out, r_k].
        scale: K floats, the adapters' LoRA scalings (alpha / r, ...).
        row_adapter: B ints in [-1, K): the adapter of each batch row; -1 runs
            the row through the base layer alone.
        weight_absmax: float32 [ceil(out * in / weight_blocksize)], the NF4
            weight's absmax (None: weight is dense).
        weight_blocksize: values per absmax of the NF4 weight (QLoRA: 64).
    Returns:
        y: [B, ..., out], y[b] = x[b] Wᵀ + bias + scale[k] · (x[b] A_kᵀ) B_kᵀ
        with k = row_adapter[b]; rows with k = -1 equal F.linear bit for bit.
    """
    return _lora_op(x, weight, bias, lora_a, lora_b, scale, row_adapter, weight_absmax, weight_blocksize)


def vera_linear_mixed(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    vera_a: torch.Tensor,
    vera_b: torch.Tensor,
    lambda_d: torch.Tensor,
    lambda_b: torch.Tensor,
    row_adapter: list[int],
    *,
    weight_absmax: torch.Tensor | None = None,
    weight_blocksize: int = 64,
) -> torch.Tensor:
    """A linear layer whose batch rows each run with their own VeRA adapter.

    Args:
        x: [B, ..., in] activations, at least 2-D; dim 0 indexes batch rows.
        weight: [out, in] frozen base weight, or (weight_absmax given) its NF4
            codes, uint8 [out, in // 2]; bias: [out] or None.
        vera_a: [r, max_in], vera_b: [max_out, r]: the frozen matrices shared
            by every adapter, sliced to A_s = vera_a[:, :in], B_s = vera_b[:out].
        lambda_d: [K, r], lambda_b: [K, out]: the K adapters' vectors, stacked.
        row_adapter: B ints in [-1, K): the adapter of each batch row; -1 runs
            the row through the base layer alone.
        weight_absmax, weight_blocksize: an NF4 weight's absmax and block size,
            as lora_linear_mixed's.
    Returns:
        y: [B, ..., out], y[b] = x[b] Wᵀ + bias + λ_b[k] ⊙ ((λ_d[k] ⊙ (x[b] A_sᵀ)) B_sᵀ)
        with k = row_adapter[b]; rows with k = -1 equal F.linear bit for bit.
    """
    return _vera_op(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, row_adapter, weight_absmax,
                    weight_blocksize)


# --- fake kernels: csrc/include/pypeft/mixed_linear.h's checks -------------------------

def _check_base_args(op, x, weight, bias, weight_absmax, weight_blocksize):
    """x [B, ..., in] (at least 2-D), weight [out, in] (or NF4 codes [out, in / 2]),
    bias [out] or None. Returns (out, in)."""
    _checks.check_defined(op, "x", x)
    _checks.check_value(x.dim() >= 2, op, "x",
                        "a tensor of shape [batch, ..., in_features] (at least 2-D: one adapter per batch row)",
                        f"{x.dim()}-D tensor of shape {_checks.shape_str(x.shape)}")
    n_in = _checks.check_linear_args(op, x, weight, bias, weight_absmax, weight_blocksize)
    return weight.shape[0], n_in


def _check_row_adapter(op, row_adapter, batch, adapters):
    """One entry per batch row, each in [-1, K)."""
    _checks.check_value(len(row_adapter) == batch, op, "row_adapter",
                        f"{batch} entries (one per batch row, x.size(0))", f"{len(row_adapter)} entries")
    expected = f"adapter indices in [-1, {adapters}) ({adapters} adapters; -1: the base layer alone)"
    for b, k in enumerate(row_adapter):
        # Two checks, no `and`: under torch.compile k may be symbolic.
        _checks.check_value(k >= -1, op, "row_adapter", expected, f"row_adapter[{b}] = {k}")
        _checks.check_value(k < adapters, op, "row_adapter", expected, f"row_adapter[{b}] = {k}")


def _check_lora_mixed_args(op, x, weight, bias, lora_a, lora_b, scale, row_adapter, weight_absmax,
                           weight_blocksize):
    out, n_in = _check_base_args(op, x, weight, bias, weight_absmax, weight_blocksize)
    adapters = len(lora_a)
    _checks.check_value(len(lora_b) == adapters, op, "lora_b", f"{adapters} tensors (one per adapter, as 'lora_a')",
                        f"{len(lora_b)} tensors")
    _checks.check_value(len(scale) == adapters, op, "scale", f"{adapters} numbers (one per adapter, as 'lora_a')",
                        f"{len(scale)} numbers")
    for k, (a, b, s) in enumerate(zip(lora_a, lora_b, scale)):
        a_name, b_name = f"lora_a[{k}]", f"lora_b[{k}]"
        _checks.check_dim(op, a_name, a, 2)
        _checks.check_value(a.shape[0] >= 1, op, a_name, "shape [r, in_features] with rank r >= 1",
                            f"shape {_checks.shape_str(a.shape)}")
        _checks.check_size(op, a_name, a, 1, n_in, "in_features, from weight [out, in]")
        _checks.check_dim(op, b_name, b, 2)
        _checks.check_size(op, b_name, b, 0, out, "out_features, from weight [out, in]")
        _checks.check_size(op, b_name, b, 1, a.shape[0], f"rank r, from {a_name} [r, in]")
        _checks.check_same_device(op, a_name, a, "x", x)
        _checks.check_same_device(op, b_name, b, "x", x)
        _checks.check_low_precision_partner(op, a_name, a, "x", x)
        _checks.check_same_dtype(op, b_name, b, a_name, a)
        _checks.check_finite(op, f"scale[{k}]", s)
    _check_row_adapter(op, row_adapter, x.shape[0], adapters)


def _check_vera_mixed_args(op, x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, row_adapter, weight_absmax,
                           weight_blocksize):
    out, n_in = _check_base_args(op, x, weight, bias, weight_absmax, weight_blocksize)
    _checks.check_dim(op, "vera_a", vera_a, 2)
    _checks.check_dim(op, "vera_b", vera_b, 2)
    r = vera_a.shape[0]
    _checks.check_value(r >= 1, op, "vera_a", "shape [r, max_in] with rank r >= 1",
                        f"shape {_checks.shape_str(vera_a.shape)}")
    _checks.check_value(vera_a.shape[1] >= n_in, op, "vera_a",
                        f"shape [r, max_in] with max_in >= in_features {n_in} (the shared matrix is sliced per layer)",
                        f"shape {_checks.shape_str(vera_a.shape)}")
    _checks.check_value(vera_b.shape[0] >= out, op, "vera_b",
                        f"shape [max_out, r] with max_out >= out_features {out} (the shared matrix is sliced per "
                        f"layer)", f"shape {_checks.shape_str(vera_b.shape)}")
    _checks.check_size(op, "vera_b", vera_b, 1, r, "rank r, from vera_a [r, max_in]")
    _checks.check_dim(op, "lambda_d", lambda_d, 2)
    adapters = lambda_d.shape[0]
    _checks.check_size(op, "lambda_d", lambda_d, 1, r, "rank r, from vera_a [r, max_in]")
    _checks.check_dim(op, "lambda_b", lambda_b, 2)
    _checks.check_size(op, "lambda_b", lambda_b, 0, adapters, "one row per adapter, as lambda_d [K, r]")
    _checks.check_size(op, "lambda_b", lambda_b, 1, out, "out_features, from weight [out, in]")
    _checks.check_same_device(op, "vera_a", vera_a, "x", x)
    _checks.check_low_precision_partner(op, "vera_a", vera_a, "x", x)
    for name, t in (("vera_b", vera_b), ("lambda_d", lambda_d), ("lambda_b", lambda_b)):
        _checks.check_same_device(op, name, t, "x", x)
        _checks.check_same_dtype(op, name, t, "vera_a", vera_a)
    _check_row_adapter(op, row_adapter, x.shape[0], adapters)


@torch.library.register_fake("pypeft::lora_linear_mixed")
def _lora_linear_mixed_fake(x, weight, bias, lora_a, lora_b, scale, row_adapter, weight_absmax=None,
                            weight_blocksize=64):
    _check_lora_mixed_args(_LORA_OP, x, weight, bias, lora_a, lora_b, scale, row_adapter, weight_absmax,
                           weight_blocksize)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake("pypeft::vera_linear_mixed")
def _vera_linear_mixed_fake(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, row_adapter, weight_absmax=None,
                            weight_blocksize=64):
    _check_vera_mixed_args(_VERA_OP, x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, row_adapter,
                           weight_absmax, weight_blocksize)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _register_inference_only(op: str, label: str, train_with: str) -> None:
    """An autograd formula that raises: a user who runs the op on tensors
    requiring grad gets its output (marked as requiring grad) and a clear error
    at backward, never a silent zero gradient."""

    def backward(ctx, grad_y):
        raise RuntimeError(
            f"{label}: mixed-adapter batches are for inference; the op has no gradient. "
            f"Run it under torch.no_grad() or torch.inference_mode(), and train an adapter "
            f"with {train_with}.")

    torch.library.register_autograd(op, backward, setup_context=lambda ctx, inputs, output: None)


_register_inference_only("pypeft::lora_linear_mixed", "pypeft.lora_linear_mixed", "pypeft.ops.lora_linear")
_register_inference_only("pypeft::vera_linear_mixed", "pypeft.vera_linear_mixed", "pypeft.ops.vera_linear")
