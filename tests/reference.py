"""Plain-PyTorch references for pypeft's native ops. Never imports pypeft.

Each function here is written from the op's definition (docstrings in
pypeft/ops/ and csrc/), so that the tests compare two independent
implementations.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


# --- the counter-based dropout mask (csrc/include/pypeft/dropout_mask.h) -----

def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for int64 tensors holding uint32 values, without
    overflowing int64: multiply the two 16-bit halves of x separately."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0xD35A2D97)
    return x ^ (x >> 15)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, row_ids=None) -> torch.Tensor:
    """[rows, cols] bool: True where drop() keeps element (row, col); with
    row_ids (a sequence of ints), row i is masked as global row row_ids[i]."""
    if p <= 0.0:
        return torch.ones(rows, cols, dtype=torch.bool)
    threshold = min(int(p * 4294967296.0), 0xFFFFFFFF)
    seed &= _M64
    ids = range(rows) if row_ids is None else [int(r) for r in row_ids]
    keys = [_splitmix64(seed ^ _splitmix64(r & _M64)) for r in ids]
    lo = torch.tensor([k & _M32 for k in keys], dtype=torch.int64).unsqueeze(1)
    hi = torch.tensor([k >> 32 for k in keys], dtype=torch.int64).unsqueeze(1)
    col = torch.arange(cols, dtype=torch.int64).unsqueeze(0)
    bits = _mix32((_mix32(col ^ lo) + hi) & _M32)
    return bits >= threshold


def dropout(x: torch.Tensor, seed: int, p: float, row_ids=None) -> torch.Tensor:
    """drop(x) for x of shape [..., cols], rows counted over the leading dims
    (or named by row_ids, one per row)."""
    if p <= 0.0:
        return x
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    keep = dropout_keep_mask(seed, rows, cols, p, row_ids).reshape(x.shape).to(x.device)
    return x * keep.to(x.dtype) / (1.0 - p)


# --- LoRA ------------------------------------------------------------------

def lora_linear(x, weight, bias, lora_a, lora_b, scale, dropout_p=0.0, seed=0):
    """y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ, differentiable by autograd."""
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    u = dropout(x, seed, dropout_p) @ lora_a.t()
    return y + scale * (u @ lora_b.t())


# --- VeRA ------------------------------------------------------------------

def vera_linear(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, dropout_p=0.0, seed=0):
    """y = x Wᵀ + b + λ_b ⊙ ((λ_d ⊙ (drop(x) A_sᵀ)) B_sᵀ), A_s = A[:, :in], B_s = B[:out, :]."""
    n_out, n_in = weight.shape
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    u = dropout(x, seed, dropout_p) @ vera_a[:, :n_in].t()
    return y + lambda_b * ((lambda_d * u) @ vera_b[:n_out].t())


# --- mixed-adapter batches (inference) ---------------------------------------

def _rows_or_empty(rows, x, n_out):
    return torch.stack(rows) if rows else x.new_empty((*x.shape[:-1], n_out))


def lora_linear_mixed(x, weight, bias, lora_a, lora_b, scale, row_adapter):
    """Row by row: y[b] = x[b] Wᵀ + b, plus scale[k] · (x[b] A_kᵀ) B_kᵀ when
    k = row_adapter[b] >= 0, the adapter part in the adapter's dtype."""
    rows = []
    for b, k in enumerate(row_adapter):
        y = torch.nn.functional.linear(x[b], weight, bias)
        if k >= 0:
            a, bb = lora_a[k], lora_b[k]
            y = y + (scale[k] * ((x[b].to(a.dtype) @ a.t()) @ bb.t())).to(y.dtype)
        rows.append(y)
    return _rows_or_empty(rows, x, weight.shape[0])


def vera_linear_mixed(x, weight, bias, vera_a, vera_b, lambda_d, lambda_b, row_adapter):
    """Row by row: y[b] = x[b] Wᵀ + b, plus λ_b[k] ⊙ ((λ_d[k] ⊙ (x[b] A_sᵀ)) B_sᵀ)
    when k = row_adapter[b] >= 0, A_s = A[:, :in], B_s = B[:out, :]."""
    n_out, n_in = weight.shape
    a_s, b_s = vera_a[:, :n_in], vera_b[:n_out]
    rows = []
    for b, k in enumerate(row_adapter):
        y = torch.nn.functional.linear(x[b], weight, bias)
        if k >= 0:
            u = x[b].to(a_s.dtype) @ a_s.t()
            y = y + (lambda_b[k] * ((lambda_d[k] * u) @ b_s.t())).to(y.dtype)
        rows.append(y)
    return _rows_or_empty(rows, x, n_out)


# --- TokenTune: token-subset semantics ---------------------------------------------

def token_mask(positions: torch.Tensor, tokens: int) -> torch.Tensor:
    """[B, T] bool, True at the selected tokens."""
    mask = torch.zeros(positions.shape[0], tokens, dtype=torch.bool, device=positions.device)
    return mask.scatter_(1, positions, True)


def keep_grad_at(t: torch.Tensor, positions: torch.Tensor, token_dim: int = 1) -> torch.Tensor:
    """t with the same values, whose unselected tokens are constants (detached):
    the definition of TokenTune's gradients. Batch is dim 0; tokens token_dim."""
    mask = token_mask(positions, t.shape[token_dim])
    shape = [1] * t.dim()
    shape[0], shape[token_dim] = t.shape[0], t.shape[token_dim]
    mask = mask.view(shape)
    return torch.where(mask, t, t.detach())


def token_subset(fn, positions: torch.Tensor, *tensors: torch.Tensor, token_dim: int = 1):
    """fn(*tensors) where every token outside `positions` is computed as a
    constant: inputs and output keep gradients only at the selected tokens."""
    out = fn(*(keep_grad_at(t, positions, token_dim) for t in tensors))
    return keep_grad_at(out, positions, token_dim)


def flat_row_dropout(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    """drop(x) with x [B, T, ...] viewed as [B * T, F]: element (b, t, f) masked
    as row b * T + t (TokenTune's dropout)."""
    features = 1
    for size in x.shape[2:]:
        features *= size
    return dropout(x.reshape(x.shape[0] * x.shape[1], features), seed, p).reshape(x.shape)


def rms_norm(x: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm as a function: normalised in float32, cast
    back to x's dtype, times weight; except that float64 stays float64 (the
    op's documented choice, so that float64 comparisons are exact)."""
    h = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return h.to(x.dtype) if weight is None else weight * h.to(x.dtype)


def attention(q, k, v, mask, is_causal: bool, scale: float, p: float = 0.0, seed: int = 0):
    """softmax(q kᵀ · scale + mask) v per query head (K/V heads grouped),
    q [B, Hq, T, D], k [B, Hkv, S, D], v [B, Hkv, S, Dv]: torch's
    scaled_dot_product_attention without dropout; with dropout, written out
    with dropout()'s mask on the probabilities viewed as rows (b * Hq + h) * T + t."""
    if mask is not None and mask.dim() < 4:  # SDPA's CPU kernels reject a 1-D mask; same broadcast
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    if p == 0:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, is_causal=is_causal, scale=scale,
                                                                enable_gqa=True)
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ kk.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, -float("inf")) if mask.dtype == torch.bool else scores + mask
    if is_causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), -float("inf"))
    return dropout(torch.softmax(scores, -1), seed, p) @ vv


# --- READ -----------------------------------------------------------------------------

def read_correction(layer_outputs, cell: torch.nn.Module, joiner: torch.nn.Linear, aggregate: str = "mean"):
    """READ's correction from the backbone's layer outputs ([B, T, d] each), with
    a torch.nn.RNNCell / GRUCell / LSTMCell run over the layers, every token
    its own sequence from a zero state; each input normalised by a layer norm
    without parameters; the states averaged (or the last one) through the
    joiner."""
    first = layer_outputs[0]
    B, T, d = first.shape
    h = torch.zeros(B * T, cell.hidden_size, dtype=cell.weight_ih.dtype)
    c = torch.zeros_like(h)
    states = []
    for out in layer_outputs:
        x = torch.nn.functional.layer_norm(out.detach().to(h.dtype), (d,)).reshape(B * T, d)
        if isinstance(cell, torch.nn.LSTMCell):
            h, c = cell(x, (h, c))
        else:
            h = cell(x, h)
        states.append(h)
    summary = torch.stack(states).mean(0) if aggregate == "mean" else states[-1]
    return joiner(summary).view(B, T, d)


# --- READ: recurrent cells over a sequence -------------------------------------

_NN_CELLS = {"rnn": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}


def recurrent_cell(x, h, c, w_ih, w_hh, b_ih=None, b_hh=None, cell="gru"):
    """One step of torch.nn.RNNCell (tanh) / GRUCell / LSTMCell run with the
    given weights (differentiable in all of them): h' for rnn and gru, (h', c')
    for lstm. A missing bias of the two is zero."""
    module_cls = _NN_CELLS[cell]
    has_bias = b_ih is not None or b_hh is not None
    module = module_cls(w_ih.shape[1], w_hh.shape[1], bias=has_bias, device="meta", dtype=w_ih.dtype)
    params = {"weight_ih": w_ih, "weight_hh": w_hh}
    if has_bias:
        params["bias_ih"] = b_ih if b_ih is not None else torch.zeros_like(w_ih[:, 0])
        params["bias_hh"] = b_hh if b_hh is not None else torch.zeros_like(w_hh[:, 0])
    return torch.func.functional_call(module, params, (x, (h, c) if cell == "lstm" else h))


def recurrent_scan(xs, h0, w_ih, w_hh, b_ih=None, b_hh=None, cell="gru", c0=None):
    """hs [L, N, H]: recurrent_cell run over xs [L, N, in] from h0 (and c0 for
    lstm), differentiable in every input."""
    h, c = h0, c0
    hs = []
    for t in range(xs.shape[0]):
        state = recurrent_cell(xs[t], h, c, w_ih, w_hh, b_ih, b_hh, cell)
        h, c = state if cell == "lstm" else (state, None)
        hs.append(h)
    return torch.stack(hs) if hs else xs.new_empty((0, xs.shape[1], w_hh.shape[1]))


# --- bottleneck adapters ------------------------------------------------------------

ADAPTER_ACTIVATIONS = {
    "relu": torch.nn.functional.relu,
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "leaky_relu": torch.nn.functional.leaky_relu,
    "identity": lambda x: x,
}


def bottleneck_adapter(z, residual, w_down, b_down, w_up, b_up, scale, activation, dropout_p=0.0, seed=0):
    """The `adapters` library's Adapter block: up = up_proj(act(down_proj(z))) ·
    scale (b_up scaled too), dropout() on that d-wide output (rows over z's
    leading dims), plus the residual (None: zero)."""
    p = torch.nn.functional.linear(z, w_down, b_down)
    up = torch.nn.functional.linear(ADAPTER_ACTIVATIONS[activation](p), w_up, b_up) * scale
    out = dropout(up, seed, dropout_p)
    return out if residual is None else out + residual
# --- AdapterFusion ----------------------------------------------------------------------

FUSION_ACTIVATIONS = ADAPTER_ACTIVATIONS  # the same names as the bottleneck op's


def adapter_fusion(z, query, residual, w_down, b_down, w_up, b_up, scales, activation, w_query, b_query, w_key,
                   b_key, w_value, temperature, dropout_p=0.0, seed=0):
    """AdapterFusion as the `adapters` library computes it (BertFusion over a
    stack of the N adapters' up-projections), returning (out, pre_act, probs):
    pre_act [..., N, m] the adapters' bottleneck pre-activations, probs [..., N]
    the fusion weights. Dropout on the scores (row = token, column = adapter)
    before the division by the temperature; w_value None: no value projection."""
    pre = torch.einsum("...d,nmd->...nm", z, w_down) + b_down
    a = FUSION_ACTIVATIONS[activation](pre)
    scale = torch.tensor(scales, dtype=z.dtype, device=z.device).unsqueeze(-1)
    up = (torch.einsum("...nm,ndm->...nd", a, w_up) + b_up) * scale             # [..., N, d]
    q = torch.nn.functional.linear(query, w_query, b_query)
    k = torch.nn.functional.linear(up, w_key, b_key)
    v = up if w_value is None else torch.nn.functional.linear(up, w_value)
    scores = torch.matmul(q.unsqueeze(-2), k.transpose(-2, -1)).squeeze(-2)       # [..., N]
    probs = torch.softmax(dropout(scores, seed, dropout_p) / temperature, dim=-1)
    out = torch.matmul(probs.unsqueeze(-2), v).squeeze(-2)
    if residual is not None:
        out = out + residual
    return out, pre, probs


# --- NF4 (QLoRA's 4-bit NormalFloat; pypeft/ops/nf4.py) -------------------------------------------

# NF4's 16 values (QLoRA, Dettmers et al. 2023, appendix E: quantiles of N(0, 1)
# normalised to [-1, 1], with an exact zero), as float32 literals;
# test_nf4_ops.py checks them against bitsandbytes' own table.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0]


def nf4_table(dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(_NF4, dtype=torch.float32).to(dtype)


def nf4_dequantize(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype=torch.float64):
    """Unpack two codes per byte (the first in the high nibble), look each up in
    the NF4 table and scale it by its block's absmax: a float32 product (the
    format's definition, bitsandbytes'), then cast to dtype."""
    n = 1
    for s in shape:
        n *= s
    b = codes.reshape(-1).to(torch.int64).cpu()
    idx = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n]
    scale = absmax.to(torch.float32).cpu().repeat_interleave(blocksize)[:n]
    return (nf4_table(torch.float32)[idx] * scale).reshape(shape).to(dtype).to(codes.device)


def nf4_linear(x, weight, absmax, blocksize, bias=None):
    """x · deq(W)ᵀ + b with W [out, in] from codes [out, in / 2], in x's dtype."""
    out, n_in = weight.shape[0], weight.shape[1] * 2
    w = nf4_dequantize(weight, absmax, blocksize, (out, n_in), dtype=x.dtype)
    return torch.nn.functional.linear(x, w, bias)
