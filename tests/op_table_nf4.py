"""The op table's entries for the linear layer over an NF4 weight (nf4_linear
and its backward), and the NF4-base form of the adapter ops (lora_linear,
vera_linear, the token-subset and mixed-batch linear ops: weight_absmax given,
weight holds NF4 codes); op_table.py applies both to OPS. Codes and absmax are
random bytes and random positive scales, so nothing here depends on pypeft's
quantiser (tests/test_nf4_ops.py holds that to bitsandbytes)."""

from __future__ import annotations

import dataclasses

import torch

import reference as R
from op_table import (Bad, OpInfo, SavedSpec, Sample, backward_entry, expanded, like, lora_samples, present, rnd,
                      strided, transposed)

NF4_GRAD = ("x", "bias")


def nf4_weight(g, n_out, n_in, blocksize, device):
    """Random NF4 codes [out, in / 2] and absmax, as nf4_quantize would store them."""
    codes = torch.randint(0, 256, (n_out, n_in // 2), generator=g, dtype=torch.uint8).to(device)
    blocks = -(-n_out * n_in // blocksize)
    absmax = (torch.rand(blocks, generator=g, dtype=torch.float32) + 0.05).to(device)
    return codes, absmax


def nf4_linear_samples(device, dtype):
    def make(name, lead=(3, 4), n_in=8, n_out=6, blocksize=4, bias=True, layout=None, big=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = rnd(g, *lead, n_in, dtype=dtype, device=device)
        codes, absmax = nf4_weight(g, n_out, n_in, blocksize, device)
        args = dict(x=layout(x) if layout else x, weight=codes, absmax=absmax, blocksize=blocksize,
                    bias=rnd(g, n_out, dtype=dtype, device=device) if bias else None)
        return Sample(name, args, present(NF4_GRAD, args), big)

    return [
        make("basic"),
        make("no bias", bias=False),
        make("other shape", lead=(5, 2), n_in=12, n_out=5, seed=1),
        make("blocks across rows", n_in=6, n_out=7, blocksize=4, seed=2),
        make("empty batch", lead=(0,)),
        make("one row", lead=(1,)),
        make("1-D x", lead=()),
        make("transposed x", layout=transposed),
        make("strided x", layout=strided),
        make("expanded x", layout=expanded),
        # Several tiles of W's rows (csrc/nf4_linear.cpp: about 2^22 values a
        # tile on the CPU, here 1024 rows of 4002), blocks of 64 crossing rows.
        make("several tiles, blocks across rows", lead=(5,), n_in=4002, n_out=2100, blocksize=64, big=True, seed=3),
    ]


def nf4_linear_reference(a):
    return R.nf4_linear(a["x"], a["weight"], a["absmax"], a["blocksize"], a["bias"])


NF4_LINEAR_BAD = [
    Bad("x last dim", lambda a: dict(x=like(a["x"], 3, 4, 7)), ValueError, "x", "[3, 4, 7]"),
    Bad("x 0-D", lambda a: dict(x=like(a["x"])), ValueError, "x", "0-D"),
    Bad("x int", lambda a: dict(x=torch.ones(3, 4, 8, dtype=torch.int64, device=a["x"].device)), TypeError, "x",
        "Long"),
    Bad("x float16 on the CPU", lambda a: dict(x=a["x"].half()), TypeError, "x", "Half", cpu_only=True),
    Bad("weight not codes", lambda a: dict(weight=like(a["x"], 6, 4)), TypeError, "weight", "uint8"),
    Bad("weight 1-D", lambda a: dict(weight=a["weight"].reshape(-1)), ValueError, "weight", "1-D"),
    Bad("absmax count", lambda a: dict(absmax=a["absmax"][1:]), ValueError, "absmax", "one per block"),
    Bad("absmax dtype", lambda a: dict(absmax=a["absmax"].double()), TypeError, "absmax", "float32"),
    Bad("odd blocksize", lambda a: dict(blocksize=3), ValueError, "blocksize", "even"),
    Bad("bias shape", lambda a: dict(bias=like(a["x"], 5)), ValueError, "bias", "[5]"),
    Bad("bias dtype", lambda a: dict(bias=a["bias"].float() if a["x"].dtype != torch.float32 else a["bias"].double()),
        TypeError, "bias", "dtype"),
]


def nf4_linear_backward_samples(device, dtype):
    g = torch.Generator().manual_seed(4)
    codes, absmax = nf4_weight(g, 6, 8, 4, device)
    grad_y = rnd(g, 3, 4, 6, dtype=dtype, device=device)

    def make(name, mask):
        return Sample(name, dict(grad_y=grad_y, weight=codes, absmax=absmax, blocksize=4, output_mask=mask))

    return [make("basic", [True, True]), make("x only", [True, False]), make("bias only", [False, True])]


NF4_LINEAR_BACKWARD_BAD = [
    Bad("grad_y last dim", lambda a: dict(grad_y=like(a["grad_y"], 3, 4, 5)), ValueError, "grad_y", "[3, 4, 5]"),
    Bad("weight not codes", lambda a: dict(weight=like(a["grad_y"], 6, 4)), TypeError, "weight", "uint8"),
    Bad("absmax count", lambda a: dict(absmax=a["absmax"][1:]), ValueError, "absmax", "one per block"),
]


def nf4_ops():
    return [
        OpInfo("nf4_linear", nf4_linear_samples, nf4_linear_reference, bad=NF4_LINEAR_BAD,
               # Nothing of x is kept: grad_x needs only W (a parameter) and grad_y.
               saved=SavedSpec(NF4_GRAD, lambda a: 0), params=("weight", "absmax", "bias"),
               core=("basic", "no bias", "blocks across rows"), compile=("basic", "other shape")),
        backward_entry("nf4_linear_backward", nf4_linear_backward_samples, NF4_LINEAR_BACKWARD_BAD),
    ]


# --- the adapter ops over an NF4 base ----------------------------------------------------------
#
# An NF4 sample is a dense sample of the op with its weight [out, in] swapped
# for random NF4 codes [out, in / 2] and absmax (weight_absmax,
# weight_blocksize appended: the schemas' last arguments); the weight leaves
# the trained arguments and backward samples' output masks (it is frozen).
# The reference is the op's own, with the dequantised weight in x's dtype.

NF4_KEYS = ("weight_absmax", "weight_blocksize")


def nf4_args(weight, blocksize=4, seed=0) -> dict:
    """Random NF4 codes and absmax for a dense weight's [out, in], on its device."""
    g = torch.Generator().manual_seed(100 + seed)
    codes, absmax = nf4_weight(g, weight.shape[0], weight.shape[1], blocksize, weight.device)
    return dict(weight=codes, weight_absmax=absmax, weight_blocksize=blocksize)


def nf4_form(sample: Sample, blocksize=4, seed=0) -> Sample:
    args = {**sample.args, **nf4_args(sample.args["weight"], blocksize, seed)}
    if "output_mask" in args:
        args["output_mask"] = [m and i != 1 for i, m in enumerate(args["output_mask"])]
    return Sample(f"nf4: {sample.name}", args, tuple(k for k in sample.grad if k != "weight"), sample.big)


def dense(a: dict) -> dict:
    """The arguments with the NF4 weight dequantised (reference.nf4_dequantize) in x's dtype."""
    if a.get("weight_absmax") is None:
        return {k: v for k, v in a.items() if k not in NF4_KEYS}
    codes = a["weight"]
    w = R.nf4_dequantize(codes, a["weight_absmax"], a["weight_blocksize"], (codes.shape[0], 2 * codes.shape[1]),
                         dtype=a["x"].dtype)
    return {**{k: v for k, v in a.items() if k not in NF4_KEYS}, "weight": w}


def lora_several_tiles(device, dtype):
    """Several tiles of W's rows (csrc/nf4_linear.cpp: about 2^22 values a tile
    on the CPU, here 2096 rows of 2000), blocks of 64 crossing rows, so that
    grad_x sums the frozen path over tiles onto the adapter's part."""
    base = next(s for s in lora_samples(device, dtype) if s.name == "basic")
    g = torch.Generator().manual_seed(9)
    n_in, n_out, r = 2000, 2200, 4
    args = dict(base.args, x=rnd(g, 3, n_in, dtype=dtype, device=device),
                weight=rnd(g, n_out, n_in, dtype=dtype, device=device), bias=rnd(g, n_out, dtype=dtype, device=device),
                lora_a=rnd(g, r, n_in, dtype=dtype, device=device), lora_b=rnd(g, n_out, r, dtype=dtype, device=device))
    return nf4_form(Sample("several tiles, blocks across rows", args, base.grad, big=True), blocksize=64)


# The dense samples of each op that get an NF4 twin (in_features even), the
# twin's block size (6: blocks cross rows of 8 values), and the ones given
# the costly checks and compiled.
NF4_SAMPLES = {
    "lora_linear": ("basic", "no dropout, no bias", "other shape", "empty batch", "1-D x", "r=1", "transposed x",
                    "expanded x"),
    "lora_linear_backward": ("basic", "adapter only, grad_u", "row ids"),
    "vera_linear": ("basic", "no dropout, no bias", "other shape", "empty batch", "1-D x", "expanded x"),
    "vera_linear_backward": ("basic", "vectors only", "row ids"),
    "lora_linear_mixed": ("basic", "contiguous runs", "base rows only", "empty batch", "2-D x, no bias",
                          "transposed x"),
    "vera_linear_mixed": ("basic", "contiguous runs", "base rows only", "empty batch", "2-D x, no bias"),
    **{name: ("basic", "B=1, k=1", "no bias, no dropout", "empty batch", "no token selected", "transposed x")
       for name in ("token_subset_linear", "token_subset_lora_linear", "token_subset_vera_linear")},
    "token_subset_linear_backward": ("basic", "weight and bias", "x only, rows not saved"),
    "token_subset_lora_linear_backward": ("basic", "x and the adapter", "lora_b only, rows not saved"),
    "token_subset_vera_linear_backward": ("basic", "x and the adapter", "vectors only, rows not saved"),
}
NF4_BLOCKSIZES = {"other shape": 6, "B=1, k=1": 6, "contiguous runs": 6}


def _nf4_samples(name, samples):
    def all_samples(device, dtype):
        dense_samples = samples(device, dtype)
        twins = [nf4_form(s, NF4_BLOCKSIZES.get(s.name, 4), seed=i) for i, s in enumerate(dense_samples)
                 if s.name in NF4_SAMPLES[name]]
        if name == "lora_linear":
            twins.append(lora_several_tiles(device, dtype))
        return dense_samples + twins

    return all_samples


def _nf4_reference(reference):
    return None if reference is None else (lambda a: reference(dense(a)))


def _change_nf4(**changes):
    """A bad input over the basic sample made NF4 (codes for its weight's shape), with `changes`."""
    def change(a):
        out = nf4_args(a["weight"])
        for k, fn in changes.items():
            out[k] = fn(a, out)
        return out

    return change


def _x_narrower(a, _):
    x = a["x"]
    return like(x, *x.shape[:-1], x.shape[-1] - 1)


NF4_BAD = [
    Bad("weight float with weight_absmax", lambda a: {k: v for k, v in nf4_args(a["weight"]).items() if k != "weight"},
        TypeError, "weight", "uint8 NF4 codes"),
    Bad("weight codes without weight_absmax", lambda a: dict(weight=nf4_args(a["weight"])["weight"]), TypeError,
        "weight", "uint8 NF4 codes need weight_absmax"),
    Bad("weight_absmax count", _change_nf4(weight_absmax=lambda a, n: n["weight_absmax"][1:]), ValueError,
        "weight_absmax", "(one per block)"),
    Bad("weight_absmax dtype", _change_nf4(weight_absmax=lambda a, n: n["weight_absmax"].double()), TypeError,
        "weight_absmax", "float32"),
    Bad("weight_blocksize odd", _change_nf4(weight_blocksize=lambda a, n: 3), ValueError, "weight_blocksize", "even"),
    Bad("x last dim, NF4 weight", _change_nf4(x=_x_narrower), ValueError, "x", "twice weight's"),
]

NF4_BACKWARD_BAD = [
    Bad("gradient asked for an NF4 weight", _change_nf4(), ValueError, "output_mask", "an NF4 weight is frozen"),
    Bad("weight float with weight_absmax", lambda a: {k: v for k, v in nf4_args(a["weight"]).items() if k != "weight"},
        TypeError, "weight", "uint8 NF4 codes"),
    Bad("weight_absmax count", _change_nf4(weight_absmax=lambda a, n: n["weight_absmax"][:-1]), ValueError,
        "weight_absmax", "(one per block)"),
]


def with_nf4_base(ops):
    """The adapter ops' entries with their NF4-base samples, forms and bad inputs added."""
    out = []
    for info in ops:
        if info.name not in NF4_SAMPLES:
            out.append(info)
            continue
        changes = dict(samples=_nf4_samples(info.name, info.samples), reference=_nf4_reference(info.reference),
                       params=info.params + ("weight_absmax",))
        if info.is_backward:
            changes["bad"] = (*info.bad, *NF4_BACKWARD_BAD)
        else:
            changes.update(bad=(*info.bad, *NF4_BAD), forms=info.forms + ("nf4: basic",),
                           compile=info.compile + ("nf4: basic",))
            if info.core is not None:
                changes["core"] = info.core + ("nf4: basic",)
        out.append(dataclasses.replace(info, **changes))
    return out
