"""The op table's entries for the linear layer over an NF4 weight (nf4_linear
and its backward); op_table.py appends them to OPS. Codes and absmax are random
bytes and random positive scales, so nothing here depends on pypeft's quantiser
(tests/test_nf4_ops.py holds that to bitsandbytes)."""

from __future__ import annotations

import torch

import reference as R
from op_table import Bad, OpInfo, SavedSpec, Sample, backward_entry, expanded, like, present, rnd, strided, transposed

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
