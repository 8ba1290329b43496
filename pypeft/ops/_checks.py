"""Argument checks for the fake (meta) kernels: csrc/include/pypeft/checks.h
and the per-op checks of csrc/, in Python, with the same conditions and the
same messages ("<op>: argument '<arg>': expected ..., got ...", ValueError for
values and shapes, TypeError for dtypes).

Why the fake kernels check everything the real ones do:
- Under FakeTensor (torch.compile, opcheck, export) the fake kernel is all
  that runs: without the checks a wrong shape (a lora_a of the wrong width)
  would trace into a graph and fail later, somewhere else, or never.
- register_fake registers the fake kernel as the op's Meta kernel, and the
  dispatcher picks Meta whenever one argument is a meta tensor. A meta tensor
  mixed with CPU tensors therefore reaches the fake kernel with real tensors,
  and an unchecked `x.new_empty(...)` would return uninitialised CPU memory as
  the op's result. Every tensor argument's device is checked against the
  op's first tensor argument (x), as the real kernels check it.

Values that only the data can tell (positions in range and distinct) are left
to the real kernels. Shapes may be symbolic (torch.compile with dynamic
shapes): conditions go through torch._check_value / torch._check_type, which
guard on them instead of failing.
"""

from __future__ import annotations

import torch

_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def dtype_name(dtype: torch.dtype) -> str:
    """The dtype as c10::toString names it (what the C++ messages print)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def shape_str(sizes) -> str:
    return "[" + ", ".join(str(s) for s in sizes) + "]"


def number_str(v: float) -> str:
    """A double as C++'s ostream prints it (6 significant digits, no '.0')."""
    return "%g" % v


def check_value(cond, op: str, arg: str, expected, got) -> None:
    """ValueError "<op>: argument '<arg>': expected <expected>, got <got>" unless cond."""
    torch._check_value(cond, lambda: f"{op}: argument '{arg}': expected {expected}, got {got}")


def check_type(cond, op: str, arg: str, expected, got) -> None:
    """As check_value, a TypeError (dtypes)."""
    torch._check_type(cond, lambda: f"{op}: argument '{arg}': expected {expected}, got {got}")


def check_defined(op: str, arg: str, t) -> None:
    check_value(t is not None, op, arg, "a tensor", "None")


def check_dim(op: str, arg: str, t, dim: int) -> None:
    check_defined(op, arg, t)
    check_value(t.dim() == dim, op, arg, f"{dim}-D tensor", f"{t.dim()}-D tensor of shape {shape_str(t.shape)}")


def check_size(op: str, arg: str, t, d: int, expected, what: str) -> None:
    check_value(t.shape[d] == expected, op, arg, f"size {expected} in dim {d} ({what})",
                f"shape {shape_str(t.shape)}")


def check_shape(op: str, arg: str, t, expected, what: str = "") -> None:
    """t's whole shape is `expected` (what: why, appended in parentheses)."""
    check_defined(op, arg, t)
    check_value(t.dim() == len(expected), op, arg, f"shape {shape_str(expected)}{what}", f"shape {shape_str(t.shape)}")
    for got, want in zip(t.shape, expected):
        check_value(got == want, op, arg, f"shape {shape_str(expected)}{what}", f"shape {shape_str(t.shape)}")


def check_same_device(op: str, arg: str, t, ref_arg: str, ref) -> None:
    check_value(t.device == ref.device, op, arg, f"a tensor on {ref.device} (the device of '{ref_arg}')",
                f"a tensor on {t.device}")


def check_same_dtype(op: str, arg: str, t, ref_arg: str, ref) -> None:
    check_type(t.dtype == ref.dtype, op, arg, f"dtype {dtype_name(ref.dtype)} (the dtype of '{ref_arg}')",
               dtype_name(t.dtype))


def check_like(op: str, arg: str, t, ref_arg: str, ref) -> None:
    check_same_device(op, arg, t, ref_arg, ref)
    check_same_dtype(op, arg, t, ref_arg, ref)


def check_dtype_in(op: str, arg: str, t, allowed) -> None:
    names = ", ".join(dtype_name(d) for d in allowed)
    check_type(t.dtype in allowed, op, arg, f"one of dtypes {{{names}}} on {t.device}", dtype_name(t.dtype))


def check_activation_dtype(op: str, arg: str, t) -> None:
    """float32, float64, bfloat16; float16 too on CUDA."""
    if t.device.type == "cuda":
        check_dtype_in(op, arg, t, (torch.float32, torch.float64, torch.bfloat16, torch.float16))
    else:
        check_dtype_in(op, arg, t, (torch.float32, torch.float64, torch.bfloat16))


def check_low_precision_partner(op: str, arg: str, t, ref_arg: str, ref) -> None:
    """t's dtype is ref's, or float32 beside a bfloat16 / float16 ref (fp32
    master weights beside low-precision activations)."""
    low = ref.dtype in (torch.bfloat16, torch.float16)
    check_type(t.dtype == ref.dtype or (low and t.dtype == torch.float32), op, arg,
               f"dtype {dtype_name(ref.dtype)} (the dtype of '{ref_arg}')" + (" or float32" if low else ""),
               dtype_name(t.dtype))


def check_finite(op: str, arg: str, v: float) -> None:
    check_value(v == v and abs(v) != float("inf"), op, arg, "a finite number", number_str(v))


def check_probability(op: str, arg: str, p: float) -> None:
    check_value(0.0 <= p < 1.0, op, arg, "a probability in [0, 1)", number_str(p))


def check_seed(op: str, arg: str, seed, required: bool, ref) -> None:
    """A one-element int64 tensor on the CPU or ref's device; required: not None."""
    if seed is None:
        check_value(not required, op, arg, "a 0-dim int64 tensor when dropout_p > 0", "None")
        return
    check_type(seed.dtype == torch.int64, op, arg, "an int64 tensor", dtype_name(seed.dtype))
    check_value(seed.numel() == 1, op, arg, "a tensor with one element", f"shape {shape_str(seed.shape)}")
    check_value(seed.device.type == "cpu" or seed.device == ref.device, op, arg,
                f"a tensor on cpu or {ref.device}", f"a tensor on {seed.device}")


def check_row_ids(op: str, row_ids, x, rows) -> None:
    """Optional int64 ids, one per row of x viewed as [rows, C], on x's device."""
    if row_ids is None:
        return
    check_type(row_ids.dtype == torch.int64, op, "row_ids", "an int64 tensor", dtype_name(row_ids.dtype))
    check_same_device(op, "row_ids", row_ids, "x", x)
    check_value(row_ids.numel() == rows, op, "row_ids", f"one id per row of x ({rows})",
                f"shape {shape_str(row_ids.shape)}")


def numel(sizes):
    n = 1
    for s in sizes:
        n = n * s
    return n


# --- NF4 weights (csrc/include/pypeft/nf4_args.h, nf4_linear.h) ------------------------

#: The names of an NF4 base weight's arguments in the adapter ops (nf4_linear's
#: own are weight, absmax, blocksize).
NF4_BASE_ARGS = ("weight", "weight_absmax", "weight_blocksize")
NF4_LINEAR_ARGS = ("weight", "absmax", "blocksize")


def ceil_div(a, b):
    return (a + b - 1) // b


def check_nf4_blocksize(op: str, blocksize: int, arg: str = "blocksize") -> None:
    check_value(blocksize >= 2 and blocksize % 2 == 0, op, arg,
                "an even block size >= 2 (bitsandbytes uses 32 ... 4096; QLoRA 64)", blocksize)


def check_absmax(op: str, absmax, blocks, ref_arg: str, ref, arg: str = "absmax") -> None:
    check_defined(op, arg, absmax)
    check_type(absmax.dtype == torch.float32, op, arg, "a float32 tensor", dtype_name(absmax.dtype))
    check_value(absmax.numel() == blocks, op, arg, f"{blocks} values (one per block)",
                f"shape {shape_str(absmax.shape)}")
    check_same_device(op, arg, absmax, ref_arg, ref)


def check_nf4_weight(op: str, weight, absmax, blocksize, x, x_arg: str = "x", names=NF4_LINEAR_ARGS) -> tuple:
    """uint8 codes [out, in / 2] on x's device, x [..., in], absmax one float32
    per block of `blocksize` values (even): returns (out, in)."""
    codes_arg, absmax_arg, blocksize_arg = names
    check_dim(op, codes_arg, weight, 2)
    check_type(weight.dtype == torch.uint8, op, codes_arg, "uint8 NF4 codes [out, in / 2]", dtype_name(weight.dtype))
    check_same_device(op, codes_arg, weight, x_arg, x)
    check_nf4_blocksize(op, blocksize, blocksize_arg)
    out, n_in = weight.shape[0], weight.shape[1] * 2
    check_value((x.shape[-1] if x.dim() else 1) == n_in, op, x_arg,
                f"last dim {n_in} (in_features: twice {codes_arg}'s {weight.shape[1]} bytes per row)",
                f"shape {shape_str(x.shape)}")
    check_absmax(op, absmax, ceil_div(out * n_in, blocksize), codes_arg, weight, absmax_arg)
    return out, n_in


def check_no_nf4_weight_grad(op: str, weight_absmax, need_weight) -> None:
    """A backward op over an NF4 weight computes no gradient for it: it is frozen."""
    check_value(not (weight_absmax is not None and need_weight), op, "output_mask",
                "no gradient asked for weight (output_mask[1] false): an NF4 weight is frozen",
                "output_mask[1] true with weight_absmax given")


def refuse_nf4_state_grad(op: str, absmax_requires_grad: bool) -> None:
    """In an adapter op's autograd setup (forward, with grad enabled): an NF4
    weight's absmax is frozen state, as its codes are (uint8, which cannot
    require grad); one that requires grad is refused at once."""
    if absmax_requires_grad:
        raise RuntimeError(f"{op}: weight_absmax is part of the frozen NF4 weight; it must not require grad")


# --- the linear layers (csrc/include/pypeft/lora_linear.h, vera_linear.h) -----------

def weight_in_features(weight, weight_absmax) -> int:
    """in_features of a weight [out, in], or of NF4 codes [out, in / 2] (weight_absmax given)."""
    return weight.shape[1] * 2 if weight_absmax is not None else weight.shape[1]


def check_dense_weight_dtype(op: str, weight, x, x_arg: str = "x") -> None:
    hint = "; uint8 NF4 codes need weight_absmax (and weight_blocksize)" if weight.dtype == torch.uint8 else ""
    check_type(weight.dtype == x.dtype, op, "weight", f"dtype {dtype_name(x.dtype)} (the dtype of '{x_arg}'){hint}",
               dtype_name(weight.dtype))


def check_weight_form(op: str, weight, weight_absmax) -> None:
    """With weight_absmax given, weight must hold NF4 codes before in_features is read off it."""
    if weight_absmax is not None:
        check_type(weight.dtype == torch.uint8, op, "weight", "uint8 NF4 codes [out, in / 2]",
                   dtype_name(weight.dtype))


def check_linear_args(op: str, x, weight, bias, weight_absmax=None, weight_blocksize: int = 64):
    """x [..., in], weight [out, in], bias [out] or None: one dtype, one device.
    With weight_absmax, weight is NF4 codes [out, in / 2] (uint8) instead.
    Returns in_features."""
    check_defined(op, "x", x)
    check_value(x.dim() >= 1, op, "x", "a tensor of shape [..., in_features]", "a 0-D tensor")
    check_activation_dtype(op, "x", x)
    check_dim(op, "weight", weight, 2)
    check_weight_form(op, weight, weight_absmax)
    nf4 = weight_absmax is not None
    out, n_in = weight.shape[0], weight_in_features(weight, weight_absmax)
    expected = ("NF4 codes [out_features, in_features / 2], both >= 1" if nf4
                else "shape [out_features, in_features], both >= 1")
    check_value(n_in >= 1, op, "weight", expected, f"shape {shape_str(weight.shape)}")
    check_value(out >= 1, op, "weight", expected, f"shape {shape_str(weight.shape)}")
    if nf4:
        check_nf4_weight(op, weight, weight_absmax, weight_blocksize, x, names=NF4_BASE_ARGS)
    else:
        if weight.dtype == torch.uint8:  # codes without their absmax: say so before their width misleads
            check_dense_weight_dtype(op, weight, x)
        check_size(op, "x", x, x.dim() - 1, n_in, "in_features, from weight [out, in]")
        check_same_device(op, "weight", weight, "x", x)
        check_dense_weight_dtype(op, weight, x)
    if bias is not None:
        check_dim(op, "bias", bias, 1)
        check_size(op, "bias", bias, 0, out, "out_features, from weight [out, in]")
        check_like(op, "bias", bias, "x", x)
    return n_in


def check_lora_linear_args(op: str, x, weight, bias, lora_a, lora_b, scale, dropout_p, seed,
                           a_name: str = "lora_a", b_name: str = "lora_b", weight_absmax=None,
                           weight_blocksize: int = 64) -> None:
    """lora_linear's arguments; a_name / b_name: what the adapter matrices are
    called (vera_linear passes its shared matrices' slices as vera_a, vera_b).
    weight_absmax given: weight is NF4 codes (check_linear_args)."""
    n_in = check_linear_args(op, x, weight, bias, weight_absmax, weight_blocksize)
    out = weight.shape[0]
    check_dim(op, a_name, lora_a, 2)
    r = lora_a.shape[0]
    check_value(r >= 1, op, a_name, "shape [r, in_features] with rank r >= 1", f"shape {shape_str(lora_a.shape)}")
    check_size(op, a_name, lora_a, 1, n_in, "in_features, from weight [out, in]")
    check_dim(op, b_name, lora_b, 2)
    check_size(op, b_name, lora_b, 0, out, "out_features, from weight [out, in]")
    check_size(op, b_name, lora_b, 1, r, f"rank r, from {a_name} [r, in]")
    check_same_device(op, a_name, lora_a, "x", x)
    check_same_device(op, b_name, lora_b, "x", x)
    check_low_precision_partner(op, a_name, lora_a, "x", x)
    check_same_dtype(op, b_name, lora_b, a_name, lora_a)
    check_finite(op, "scale", scale)
    check_probability(op, "dropout_p", dropout_p)
    check_seed(op, "seed", seed, dropout_p > 0.0, x)


def check_lora_linear_backward_args(op: str, grad_out, grad_u, x, weight, lora_a, lora_b, u, scale, dropout_p,
                                    seed, row_ids, a_name: str = "lora_a", b_name: str = "lora_b",
                                    weight_absmax=None, weight_blocksize: int = 64) -> None:
    check_lora_linear_args(op, x, weight, None, lora_a, lora_b, scale, dropout_p, seed, a_name, b_name,
                           weight_absmax, weight_blocksize)
    rows = numel(x.shape[:-1])
    check_row_ids(op, row_ids, x, rows)
    y_shape = (*x.shape[:-1], weight.shape[0])
    u_shape = (*x.shape[:-1], lora_a.shape[0])
    check_shape(op, "grad_out", grad_out, y_shape)
    check_like(op, "grad_out", grad_out, "x", x)
    check_shape(op, "u", u, u_shape)
    check_like(op, "u", u, "x", x)
    if grad_u is not None:
        check_shape(op, "grad_u", grad_u, u_shape)
        check_like(op, "grad_u", grad_u, "x", x)


def check_vera_shared(op: str, weight, vera_a, vera_b, lambda_d, lambda_b, x, weight_absmax=None) -> None:
    """The shared A [r, max_in], B [max_out, r] against the layer (weight [out,
    in], or NF4 codes [out, in / 2]) and the vectors λ_d [r], λ_b [out]:
    shapes, devices and dtypes."""
    check_dim(op, "vera_a", vera_a, 2)
    check_dim(op, "vera_b", vera_b, 2)
    check_dim(op, "weight", weight, 2)
    check_weight_form(op, weight, weight_absmax)
    out, n_in = weight.shape[0], weight_in_features(weight, weight_absmax)
    r = vera_a.shape[0]
    check_value(vera_a.shape[1] >= n_in, op, "vera_a",
                f"shape [r, max_in] with max_in >= in_features {n_in} (the shared matrix is sliced per layer)",
                f"shape {shape_str(vera_a.shape)}")
    check_value(vera_b.shape[0] >= out, op, "vera_b",
                f"shape [max_out, r] with max_out >= out_features {out} (the shared matrix is sliced per layer)",
                f"shape {shape_str(vera_b.shape)}")
    check_size(op, "vera_b", vera_b, 1, r, "rank r, from vera_a [r, max_in]")
    check_dim(op, "lambda_d", lambda_d, 1)
    check_size(op, "lambda_d", lambda_d, 0, r, "rank r, from vera_a [r, max_in]")
    check_dim(op, "lambda_b", lambda_b, 1)
    check_size(op, "lambda_b", lambda_b, 0, out, "out_features, from weight [out, in]")
    for name, t in (("lambda_d", lambda_d), ("lambda_b", lambda_b)):
        check_same_device(op, name, t, "x", x)
        check_same_dtype(op, name, t, "vera_a", vera_a)


def check_vera_linear_args(op: str, x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p, seed,
                           weight_absmax=None, weight_blocksize: int = 64) -> None:
    check_vera_shared(op, weight, vera_a, vera_b, lambda_d, lambda_b, x, weight_absmax)
    out, n_in = weight.shape[0], weight_in_features(weight, weight_absmax)
    check_lora_linear_args(op, x, weight, bias, vera_a[:, :n_in], vera_b[:out], 1.0, dropout_p, seed,
                           "vera_a", "vera_b", weight_absmax, weight_blocksize)


# --- token-subset ops (csrc/include/pypeft/token_subset.h) ---------------------------

def check_positions(op: str, positions, x_arg: str, x, batch_dim: int = 0, token_dim: int = 1) -> None:
    """positions [B, k] int64 on x's device, B and T from x's dims batch_dim
    and token_dim, k <= T. (Their values, in [0, T) and distinct per row, are
    checked by the real kernels: the data is not here.)"""
    check_defined(op, x_arg, x)
    check_value(x.dim() > max(batch_dim, token_dim), op, x_arg,
                f"a tensor with batch and token dims {batch_dim} and {token_dim}", f"shape {shape_str(x.shape)}")
    check_dim(op, "positions", positions, 2)
    check_type(positions.dtype == torch.int64, op, "positions", "an int64 tensor", dtype_name(positions.dtype))
    check_same_device(op, "positions", positions, x_arg, x)
    B, T, k = x.shape[batch_dim], x.shape[token_dim], positions.shape[1]
    check_value(positions.shape[0] == B, op, "positions", f"[B, k] with B = {B} (the batch of '{x_arg}')",
                f"shape {shape_str(positions.shape)}")
    check_value(k <= T, op, "positions", f"at most {T} positions per row (the tokens of '{x_arg}')", str(k))


def row_features(x):
    """F, the features of one token's row: the product of x's dims after [B, T]."""
    return numel(x.shape[2:])


def check_rows(op: str, rows_arg: str, rows, positions, ref_arg: str, ref) -> None:
    """A backward op's saved rows [B * k, F] against ref ([B, T, ...]), the
    gradient whose selected rows they pair with."""
    check_dim(op, rows_arg, rows, 2)
    check_same_device(op, rows_arg, rows, ref_arg, ref)
    n, f = positions.shape[0] * positions.shape[1], row_features(ref)
    expected = f"shape [{n}, {f}] (the B * k selected rows of '{ref_arg}')"
    check_value(rows.shape[0] == n, op, rows_arg, expected, f"shape {shape_str(rows.shape)}")
    check_value(rows.shape[1] == f, op, rows_arg, expected, f"shape {shape_str(rows.shape)}")



# --- recurrent cells and scan (csrc/include/pypeft/recurrent.h) -----------------------

RECURRENT_GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def check_cell(op: str, cell: str) -> None:
    check_value(cell in RECURRENT_GATES, op, "cell", "one of 'rnn', 'gru', 'lstm'", f"'{cell}'")


def check_state(op: str, arg: str, t, rows, hidden, x_arg: str, x) -> None:
    """A [rows, H]-shaped tensor (h, c and their gradients) like x."""
    check_dim(op, arg, t, 2)
    check_size(op, arg, t, 0, rows, f"rows N, from '{x_arg}'")
    check_size(op, arg, t, 1, hidden, "hidden size H, from w_hh [G·H, H]")
    check_like(op, arg, t, x_arg, x)


def check_recurrent_args(op: str, cell: str, sequence: bool, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """Everything a forward op reads: x [N, in] (a cell; arguments x, h, c) or
    xs [L, N, in] (the scan; xs, h0, c0). Returns (rows N, hidden H)."""
    x_arg, h_arg, c_arg = ("xs", "h0", "c0") if sequence else ("x", "h", "c")
    check_dim(op, x_arg, x, 3 if sequence else 2)
    check_activation_dtype(op, x_arg, x)
    G = RECURRENT_GATES[cell]
    gates_what = f"{G}·H rows for cell '{cell}' ({G} gates), H = hidden size"
    check_dim(op, "w_hh", w_hh, 2)
    check_like(op, "w_hh", w_hh, x_arg, x)
    H = w_hh.shape[1]
    check_value(w_hh.shape[0] == G * H, op, "w_hh", f"shape [{G}·H, H] ({gates_what})",
                f"shape {shape_str(w_hh.shape)}")
    check_dim(op, "w_ih", w_ih, 2)
    check_like(op, "w_ih", w_ih, x_arg, x)
    check_size(op, "w_ih", w_ih, 0, G * H, gates_what + ", from w_hh [G·H, H]")
    check_size(op, x_arg, x, x.dim() - 1, w_ih.shape[1], "input features, from w_ih [G·H, in]")
    for arg, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            check_dim(op, arg, b, 1)
            check_size(op, arg, b, 0, G * H, gates_what + ", from w_hh [G·H, H]")
            check_like(op, arg, b, x_arg, x)
    rows = x.shape[1 if sequence else 0]
    check_state(op, h_arg, h, rows, H, x_arg, x)
    if cell == "lstm":
        check_value(c is not None, op, c_arg, "a tensor [N, H] for cell 'lstm'", "None")
        check_state(op, c_arg, c, rows, H, x_arg, x)
    else:
        check_value(c is None, op, c_arg, f"None for cell '{cell}' (only 'lstm' has a cell state)", "a tensor")
    return rows, H


# --- bottleneck adapters (csrc/include/pypeft/bottleneck_adapter.h) -------------------

ADAPTER_ACTIVATIONS = ("relu", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid", "leaky_relu", "identity")


def check_adapter_activation(op: str, activation: str) -> None:
    check_value(activation in ADAPTER_ACTIVATIONS, op, "activation",
                "one of " + ", ".join(f"'{a}'" for a in ADAPTER_ACTIVATIONS), f"'{activation}'")


def check_bottleneck_core(op: str, z, w_down, w_up, scale, dropout_p, seed) -> None:
    """z [..., d], w_down [m, d], w_up [d, m] (z's dtype, or float32 beside a
    bfloat16 / float16 z), scale, dropout_p, seed."""
    check_defined(op, "z", z)
    check_value(z.dim() >= 1, op, "z", "a tensor of shape [..., d]", "a 0-D tensor")
    check_activation_dtype(op, "z", z)
    check_dim(op, "w_down", w_down, 2)
    m, d = w_down.shape
    check_value(m >= 1, op, "w_down", "shape [m, d], both >= 1", f"shape {shape_str(w_down.shape)}")
    check_value(d >= 1, op, "w_down", "shape [m, d], both >= 1", f"shape {shape_str(w_down.shape)}")
    check_size(op, "z", z, z.dim() - 1, d, "d, from w_down [m, d]")
    check_same_device(op, "w_down", w_down, "z", z)
    check_low_precision_partner(op, "w_down", w_down, "z", z)
    check_dim(op, "w_up", w_up, 2)
    check_size(op, "w_up", w_up, 0, d, "d, from w_down [m, d]")
    check_size(op, "w_up", w_up, 1, m, "m, from w_down [m, d]")
    check_same_device(op, "w_up", w_up, "z", z)
    check_same_dtype(op, "w_up", w_up, "w_down", w_down)
    check_finite(op, "scale", scale)
    check_probability(op, "dropout_p", dropout_p)
    check_seed(op, "seed", seed, dropout_p > 0.0, z)


def check_bottleneck_adapter_args(op: str, z, residual, w_down, b_down, w_up, b_up, scale, activation, dropout_p,
                                  seed) -> None:
    check_adapter_activation(op, activation)
    check_bottleneck_core(op, z, w_down, w_up, scale, dropout_p, seed)
    m, d = w_down.shape
    if residual is not None:
        check_shape(op, "residual", residual, z.shape, " (the shape of 'z')")
        check_like(op, "residual", residual, "z", z)
    for arg, b, size, what in (("b_down", b_down, m, "m"), ("b_up", b_up, d, "d")):
        if b is not None:
            check_dim(op, arg, b, 1)
            check_size(op, arg, b, 0, size, f"{what}, from w_down [m, d]")
            check_same_device(op, arg, b, "z", z)
            check_same_dtype(op, arg, b, "w_down", w_down)


def check_bottleneck_adapter_backward_args(op: str, grad_out, grad_p, z, p, w_down, w_up, scale, activation,
                                           dropout_p, seed) -> None:
    check_adapter_activation(op, activation)
    check_bottleneck_core(op, z, w_down, w_up, scale, dropout_p, seed)
    check_shape(op, "grad_out", grad_out, z.shape, " (the shape of 'z')")
    check_like(op, "grad_out", grad_out, "z", z)
    p_shape = (*z.shape[:-1], w_down.shape[0])
    check_shape(op, "p", p, p_shape)
    check_like(op, "p", p, "z", z)
    if grad_p is not None:
        check_shape(op, "grad_p", grad_p, p_shape)
        check_like(op, "grad_p", grad_p, "z", z)
