"""The op table: every native op's contract, declared once (PyTorch's OpInfo
idea). test_op_contract.py runs the whole contract over every entry: opcheck,
the reference in float64, gradcheck, torch.compile, TorchScript, no double
backward, saved bytes, and the bad-input table (on the real kernels, under
FakeTensor, and with one argument on another device).

An entry declares
- samples(device, dtype): the op's arguments by name, in schema order, for
  shapes that have broken kernels before: empty batch, one row, every token
  selected or none, non-contiguous and expanded (stride 0) inputs, r = 1, r
  larger than the dims, no bias, dropout on;
- reference: the op's defining formula from tests/reference.py (never
  pypeft), as a function of the arguments by name;
- bad: inputs the op must reject at once, with the argument its message
  names and words from what it says.
Backward ops are entries of their own (samples with each output mask, bad
inputs); their values are checked through the forward's gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

import pypeft.ops  # noqa: F401  (registers the ops with their fake kernels and autograd formulas)
import reference as R

F32, F64 = torch.float32, torch.float64


# --- the table's vocabulary -----------------------------------------------------------

@dataclass
class Sample:
    name: str
    args: dict                 # argument name -> value, in the schema's order
    grad: tuple = ()           # the arguments that take a gradient (training configuration)
    big: bool = False          # only compared with the reference (too big for opcheck, gradcheck)


@dataclass
class Bad:
    """A bad input: change(args) gives the arguments that differ from the
    basic sample's; the op raises `error` naming `arg`, its message holding `words`."""
    name: str
    change: Callable[[dict], dict]
    error: type
    arg: str
    words: str
    fake: bool = True          # the fake kernel rejects it too (False: only the data tells)
    cpu_only: bool = False     # bad on the CPU only (float16 is a CUDA dtype)


@dataclass
class SavedSpec:
    """What autograd keeps: with `grad` requiring grad, the bytes of the
    distinct storages saved, other than the `params` arguments' (weights, seeds,
    positions: they exist anyway), are nbytes(args)."""
    grad: tuple
    nbytes: Callable[[dict], int]
    sample: str = "basic"


@dataclass(eq=False)
class OpInfo:
    name: str
    samples: Callable[[str, torch.dtype], list]
    reference: Callable[[dict], Any] | None = None
    output: Callable[[Any], Any] = lambda out: out    # the outputs compared and differentiated
    bad: Sequence[Bad] = ()
    tokens: tuple = ()             # token-subset ops: arguments differentiable at the selected tokens only
    token_dim: int = 1             # ... whose tokens are this dim (batch is dim 0)
    double_backward: str | None = "raises"            # "raises", "works", None (no gradient)
    passthrough: tuple = ()        # arguments whose gradient is the output's gradient itself (a residual):
                                   # differentiating it again is exact, so it does not raise
    inference_only: str | None = None                 # what backward raises, for ops without a gradient
    saved: SavedSpec | None = None
    params: tuple = ()             # arguments whose storages saved bytes do not count
    cpu_args: tuple = ("seed",)    # may stay on the CPU beside tensors on another device
    core: tuple | None = ("basic",)  # samples that get the costly checks in full: opcheck's AOT dispatch
                                   # with dynamic shapes, gradcheck's full Jacobian (None: every sample)
    compile: tuple = ("basic",)    # samples run, in order, through one torch.compile'd function
    forms: tuple = ("basic",)      # one sample per form of the arguments (an NF4 base weight): the per-op
                                   # checks (TorchScript, saved bytes, second order, devices) run on each
    inductor: bool = False         # also compiled with inductor (slow)
    tolerance: dict = field(default_factory=lambda: dict(atol=1e-10, rtol=1e-9))

    @property
    def op(self):
        return getattr(torch.ops.pypeft, self.name).default

    @property
    def is_backward(self) -> bool:
        return self.name.endswith("_backward")

    def sample(self, name: str, device="cpu", dtype=F64) -> Sample:
        for s in self.samples(device, dtype):
            if s.name == name:
                return s
        raise KeyError(name)

    def __repr__(self):
        return self.name


def first(out):
    return out[0]


# --- making inputs ----------------------------------------------------------------

def rnd(g, *shape, dtype=F64, device="cpu", scale=1.0):
    return (scale * torch.randn(*shape, generator=g, dtype=F64)).to(dtype).to(device)


def like(t, *shape, dtype=None):
    """A random tensor on t's device, in t's dtype unless given, of `shape`."""
    return torch.randn(shape, dtype=F64).to(dtype or t.dtype).to(t.device)


def ones_like_dev(t, *shape, dtype):
    return torch.ones(*shape, dtype=dtype, device=t.device)


def tensor_on(t, values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype, device=t.device)


def seed_of(a, key="seed") -> int:
    return int(a[key].item()) if a[key] is not None else 0


def transposed(t):
    """The same values with the last two dims' strides swapped (not contiguous)."""
    if t.dim() < 2:
        return strided(t)
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def strided(t):
    """The same values as every other element of a wider last dim."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def strided_rows(t):
    """The same values as every other row (dim 0) of a taller tensor."""
    tall = torch.zeros(2 * t.shape[0], *t.shape[1:], dtype=t.dtype, device=t.device)
    tall[::2] = t
    return tall[::2]


def expanded(t):
    """A tensor of t's shape whose dim 0 is broadcast (stride 0) from its first row."""
    return t[:1].expand(t.shape)


def positions(batch, tokens, k, g, device="cpu"):
    """[batch, k] distinct token indices per row, in random (unsorted) order."""
    rows = [torch.randperm(tokens, generator=g)[:k] for _ in range(batch)]
    return (torch.stack(rows) if rows else torch.empty(0, k, dtype=torch.int64)).to(device)


def present(names, args):
    return tuple(n for n in names if args.get(n) is not None)


# --- LoRA: lora_linear ----------------------------------------------------------------

LORA_GRAD = ("x", "weight", "bias", "lora_a", "lora_b")


def lora_samples(device, dtype):
    def make(name, lead=(3, 4), n_in=8, n_out=6, r=3, bias=True, p=0.0, layout=None, big=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = rnd(g, *lead, n_in, dtype=dtype, device=device)
        args = dict(x=layout(x) if layout else x, weight=rnd(g, n_out, n_in, dtype=dtype, device=device),
                    bias=rnd(g, n_out, dtype=dtype, device=device) if bias else None,
                    lora_a=rnd(g, r, n_in, dtype=dtype, device=device),
                    lora_b=rnd(g, n_out, r, dtype=dtype, device=device), scale=0.75, dropout_p=p,
                    seed=torch.tensor(42 + seed, device=device) if p else None)
        return Sample(name, args, present(LORA_GRAD, args), big)

    return [
        make("basic", p=0.2),
        make("no dropout, no bias", bias=False),
        make("other shape", lead=(5, 2), p=0.2, seed=1),
        make("empty batch", lead=(0,), p=0.2),
        make("empty middle dim", lead=(3, 0)),
        make("one row", lead=(1,), p=0.2),
        make("1-D x", lead=()),
        make("r=1", r=1, p=0.2),
        make("r > in and out", n_in=5, n_out=3, r=9),
        make("transposed x", layout=transposed, p=0.5),
        make("strided x", layout=strided),
        make("strided rows", layout=strided_rows, p=0.5),
        make("expanded x", layout=expanded, p=0.5),
        make("many rows (several blocks per thread)", lead=(4, 700), n_in=300, n_out=40, r=8, p=0.2, big=True),
    ]


def lora_reference(a):
    return R.lora_linear(a["x"], a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["scale"], a["dropout_p"],
                         seed_of(a))


LORA_BAD = [
    Bad("x last dim", lambda a: dict(x=like(a["x"], 3, 4, 7)), ValueError, "x", "[3, 4, 7]"),
    Bad("x 0-D", lambda a: dict(x=like(a["x"])), ValueError, "x", "0-D"),
    Bad("x int", lambda a: dict(x=ones_like_dev(a["x"], 3, 4, 8, dtype=torch.int64)), TypeError, "x", "Long"),
    Bad("x float16 on the CPU", lambda a: dict(x=a["x"].half()), TypeError, "x", "Half", cpu_only=True),
    Bad("weight 1-D", lambda a: dict(weight=like(a["x"], 6)), ValueError, "weight", "1-D"),
    Bad("weight dtype", lambda a: dict(weight=like(a["x"], 6, 8, dtype=F64)), TypeError, "weight", "Double"),
    Bad("bias shape", lambda a: dict(bias=like(a["x"], 5)), ValueError, "bias", "[5]"),
    Bad("bias 2-D", lambda a: dict(bias=like(a["x"], 1, 6)), ValueError, "bias", "2-D"),
    Bad("lora_a in", lambda a: dict(lora_a=like(a["x"], 3, 7)), ValueError, "lora_a", "[3, 7]"),
    Bad("lora_a rank 0", lambda a: dict(lora_a=like(a["x"], 0, 8), lora_b=like(a["x"], 6, 0)), ValueError, "lora_a",
        "r >= 1"),
    Bad("lora_a 1-D", lambda a: dict(lora_a=like(a["x"], 8)), ValueError, "lora_a", "1-D"),
    Bad("lora_b out", lambda a: dict(lora_b=like(a["x"], 5, 3)), ValueError, "lora_b", "[5, 3]"),
    Bad("lora_b rank mismatch", lambda a: dict(lora_b=like(a["x"], 6, 4)), ValueError, "lora_b", "rank r"),
    Bad("lora_b dtype", lambda a: dict(lora_b=like(a["x"], 6, 3, dtype=F64)), TypeError, "lora_b", "Double"),
    Bad("fp32 adapter with fp64 x", lambda a: dict(x=a["x"].double(), weight=a["weight"].double(),
                                                   bias=a["bias"].double()), TypeError, "lora_a", "Float"),
    Bad("p = 1", lambda a: dict(dropout_p=1.0), ValueError, "dropout_p", "[0, 1)"),
    Bad("p < 0", lambda a: dict(dropout_p=-0.1), ValueError, "dropout_p", "-0.1"),
    Bad("seed missing", lambda a: dict(seed=None), ValueError, "seed", "None"),
    Bad("seed float", lambda a: dict(seed=torch.tensor(1.0)), TypeError, "seed", "Float"),
    Bad("seed shape", lambda a: dict(seed=torch.tensor([1, 2])), ValueError, "seed", "[2]"),
    Bad("scale inf", lambda a: dict(scale=float("inf")), ValueError, "scale", "inf"),
    Bad("scale nan", lambda a: dict(scale=float("nan")), ValueError, "scale", "nan"),
]


def lora_backward_samples(device, dtype):
    g = torch.Generator().manual_seed(3)
    lead, n_in, n_out, r = (3, 4), 8, 6, 3
    base = dict(x=rnd(g, *lead, n_in, dtype=dtype, device=device), weight=rnd(g, n_out, n_in, dtype=dtype,
                                                                              device=device),
                lora_a=rnd(g, r, n_in, dtype=dtype, device=device), lora_b=rnd(g, n_out, r, dtype=dtype, device=device))
    grad_out, u = rnd(g, *lead, n_out, dtype=dtype, device=device), rnd(g, *lead, r, dtype=dtype, device=device)
    grad_u = rnd(g, *lead, r, dtype=dtype, device=device)

    def make(name, mask, with_grad_u=False, p=0.25, row_ids=None):
        args = dict(grad_out=grad_out, grad_u=grad_u if with_grad_u else None, **base, u=u, scale=2.0, dropout_p=p,
                    seed=torch.tensor(3, device=device) if p else None, output_mask=mask, row_ids=row_ids)
        return Sample(name, args)

    return [
        make("basic", [True] * 5),
        make("adapter only, grad_u", [False, False, False, True, True], with_grad_u=True),
        make("lora_a only", [False, False, False, True, False]),
        make("frozen adapter, no dropout", [False, True, True, False, False], p=0.0),
        make("row ids", [True, False, False, True, True], row_ids=torch.arange(12, device=device) + 100),
    ]


LORA_BACKWARD_BAD = [
    Bad("grad_out shape", lambda a: dict(grad_out=like(a["x"], 3, 4, 5)), ValueError, "grad_out", "[3, 4, 6]"),
    Bad("grad_out dtype", lambda a: dict(grad_out=like(a["x"], 3, 4, 6, dtype=F64)), TypeError, "grad_out", "Double"),
    Bad("u shape", lambda a: dict(u=like(a["x"], 3, 4, 2)), ValueError, "u", "[3, 4, 2]"),
    Bad("grad_u shape", lambda a: dict(grad_u=like(a["x"], 3, 4, 2)), ValueError, "grad_u", "[3, 4, 2]"),
    Bad("row_ids dtype", lambda a: dict(row_ids=tensor_on(a["x"], list(range(12)), torch.int32)), TypeError,
        "row_ids", "int64"),
    Bad("row_ids count", lambda a: dict(row_ids=tensor_on(a["x"], list(range(11)))), ValueError, "row_ids",
        "one id per row of x (12)"),
    Bad("lora_b out", lambda a: dict(lora_b=like(a["x"], 5, 3)), ValueError, "lora_b", "[5, 3]"),
]


# --- VeRA: vera_linear ------------------------------------------------------------------

VERA_GRAD = ("x", "weight", "bias", "lambda_d", "lambda_b")


def vera_samples(device, dtype):
    def make(name, lead=(3, 4), n_in=8, n_out=6, r=5, extra_in=3, extra_out=2, bias=True, p=0.0, layout=None,
             big=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = rnd(g, *lead, n_in, dtype=dtype, device=device)
        args = dict(x=layout(x) if layout else x, weight=rnd(g, n_out, n_in, dtype=dtype, device=device),
                    bias=rnd(g, n_out, dtype=dtype, device=device) if bias else None,
                    vera_a=rnd(g, r, n_in + extra_in, dtype=dtype, device=device),
                    vera_b=rnd(g, n_out + extra_out, r, dtype=dtype, device=device),
                    lambda_d=rnd(g, r, dtype=dtype, device=device), lambda_b=rnd(g, n_out, dtype=dtype, device=device),
                    dropout_p=p, seed=torch.tensor(7 + seed, device=device) if p else None)
        return Sample(name, args, present(VERA_GRAD, args), big)

    return [
        make("basic", p=0.2),
        make("no dropout, no bias", bias=False),
        make("other shape", lead=(2, 5), p=0.2, seed=1),
        make("empty batch", lead=(0,), p=0.2),
        make("one row", lead=(1,), p=0.2),
        make("1-D x", lead=()),
        make("r=1", r=1),
        make("r > in and out, exact shared size", n_in=5, n_out=3, r=12, extra_in=0, extra_out=0, p=0.4),
        make("transposed x", layout=transposed, p=0.5),
        make("expanded x", layout=expanded, p=0.5),
    ]


def vera_reference(a):
    return R.vera_linear(a["x"], a["weight"], a["bias"], a["vera_a"], a["vera_b"], a["lambda_d"], a["lambda_b"],
                         a["dropout_p"], seed_of(a))


VERA_BAD = [
    Bad("layer wider than shared A", lambda a: dict(vera_a=like(a["x"], 5, 7)), ValueError, "vera_a",
        "max_in >= in_features 8"),
    Bad("layer taller than shared B", lambda a: dict(vera_b=like(a["x"], 5, 5)), ValueError, "vera_b",
        "max_out >= out_features 6"),
    Bad("B rank", lambda a: dict(vera_b=like(a["x"], 8, 4)), ValueError, "vera_b", "rank r"),
    Bad("lambda_d size", lambda a: dict(lambda_d=like(a["x"], 4)), ValueError, "lambda_d", "[4]"),
    Bad("lambda_b size", lambda a: dict(lambda_b=like(a["x"], 7)), ValueError, "lambda_b", "[7]"),
    Bad("lambda dtype", lambda a: dict(lambda_b=like(a["x"], 6, dtype=F64)), TypeError, "lambda_b", "Double"),
    Bad("fp32 shared matrices, fp64 x", lambda a: dict(x=a["x"].double(), weight=a["weight"].double(), bias=None),
        TypeError, "vera_a", "Float"),
    Bad("x last dim", lambda a: dict(x=like(a["x"], 3, 4, 7)), ValueError, "x", "[3, 4, 7]"),
    Bad("p = 1", lambda a: dict(dropout_p=1.0), ValueError, "dropout_p", "[0, 1)"),
    Bad("seed missing", lambda a: dict(seed=None), ValueError, "seed", "None"),
]


def vera_backward_samples(device, dtype):
    g = torch.Generator().manual_seed(4)
    lead, n_in, n_out, r = (3, 4), 8, 6, 5
    base = dict(x=rnd(g, *lead, n_in, dtype=dtype, device=device),
                weight=rnd(g, n_out, n_in, dtype=dtype, device=device),
                vera_a=rnd(g, r, n_in + 3, dtype=dtype, device=device),
                vera_b=rnd(g, n_out + 2, r, dtype=dtype, device=device),
                lambda_d=rnd(g, r, dtype=dtype, device=device), lambda_b=rnd(g, n_out, dtype=dtype, device=device))
    grad_out, u = rnd(g, *lead, n_out, dtype=dtype, device=device), rnd(g, *lead, r, dtype=dtype, device=device)

    def make(name, mask, p=0.3, row_ids=None):
        args = dict(grad_out=grad_out, grad_u=None, **base, u=u, dropout_p=p,
                    seed=torch.tensor(7, device=device) if p else None, output_mask=mask, row_ids=row_ids)
        return Sample(name, args)

    return [
        make("basic", [True] * 5),
        make("vectors only", [True, False, False, True, True], p=0.0),
        make("lambda_b only", [False, False, False, False, True]),
        make("row ids", [True, False, False, True, True], row_ids=torch.arange(12, device=device) * 3),
    ]


VERA_BACKWARD_BAD = [
    Bad("grad_out shape", lambda a: dict(grad_out=like(a["x"], 3, 4, 5)), ValueError, "grad_out", "[3, 4, 6]"),
    Bad("u shape", lambda a: dict(u=like(a["x"], 3, 4, 4)), ValueError, "u", "[3, 4, 4]"),
    Bad("lambda_d size", lambda a: dict(lambda_d=like(a["x"], 4)), ValueError, "lambda_d", "[4]"),
    Bad("row_ids count", lambda a: dict(row_ids=tensor_on(a["x"], list(range(11)))), ValueError, "row_ids",
        "one id per row of x (12)"),
]


# --- counter_dropout ---------------------------------------------------------------------

def counter_dropout_samples(device, dtype):
    def make(name, shape=(3, 4, 9), p=0.3, row_ids=None, layout=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = rnd(g, *shape, dtype=dtype, device=device)
        return Sample(name, dict(x=layout(x) if layout else x, p=p,
                                 seed=torch.tensor(11, device=device) if p else None,
                                 row_ids=None if row_ids is None else torch.tensor(row_ids, device=device)), ("x",))

    return [
        make("basic"),
        make("p=0", p=0.0),
        make("other shape", shape=(5, 6), p=0.3, seed=1),
        make("row ids of gathered rows", shape=(5, 6), p=0.4, row_ids=[3, 17, 0, 39, 21]),
        make("empty", shape=(0, 5)),
        make("one row", shape=(1, 9)),
        make("1-D x", shape=(9,)),
        make("transposed x", layout=transposed),
        make("expanded x", layout=expanded),
    ]


def counter_dropout_reference(a):
    ids = None if a["row_ids"] is None else a["row_ids"].tolist()
    return R.dropout(a["x"], seed_of(a), a["p"], row_ids=ids)


COUNTER_DROPOUT_BAD = [
    Bad("p = 1", lambda a: dict(p=1.0), ValueError, "p", "[0, 1)"),
    Bad("p < 0", lambda a: dict(p=-0.5), ValueError, "p", "-0.5"),
    Bad("seed missing", lambda a: dict(seed=None), ValueError, "seed", "None"),
    Bad("seed float", lambda a: dict(seed=torch.tensor(1.0)), TypeError, "seed", "Float"),
    Bad("row_ids count", lambda a: dict(row_ids=tensor_on(a["x"], [0, 1, 2])), ValueError, "row_ids",
        "one id per row of x (12)"),
    Bad("row_ids float", lambda a: dict(row_ids=like(a["x"], 12)), TypeError, "row_ids", "int64"),
    Bad("x int", lambda a: dict(x=ones_like_dev(a["x"], 3, 4, 9, dtype=torch.int64)), TypeError, "x", "Long"),
]


# --- mixed-adapter batches (inference only) --------------------------------------------------

INTERLEAVED = [1, 0, -1, 1, 2, 2, 0]


def lora_mixed_samples(device, dtype):
    def make(name, row_adapter=INTERLEAVED, middle=(3,), n_in=10, n_out=6, ranks=(2, 5, 1), bias=True,
             layout=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = rnd(g, len(row_adapter), *middle, n_in, dtype=dtype, device=device)
        return Sample(name, dict(
            x=layout(x) if layout else x, weight=rnd(g, n_out, n_in, dtype=dtype, device=device),
            bias=rnd(g, n_out, dtype=dtype, device=device) if bias else None,
            lora_a=[rnd(g, r, n_in, dtype=dtype, device=device) for r in ranks],
            lora_b=[rnd(g, n_out, r, dtype=dtype, device=device) for r in ranks],
            scale=[0.5 + 0.75 * k for k in range(len(ranks))], row_adapter=list(row_adapter)))

    return [
        make("basic"),
        make("contiguous runs", row_adapter=sorted(INTERLEAVED)),
        make("base rows only", row_adapter=[-1] * 7),
        make("one adapter, between base rows", row_adapter=[2 if b % 3 else -1 for b in range(7)]),
        make("no adapters", row_adapter=[-1] * 4, ranks=()),
        make("empty batch", row_adapter=[]),
        make("2-D x, no bias", middle=(), bias=False),
        make("empty middle dim", middle=(0,)),
        make("transposed x", layout=transposed),
        make("expanded x", layout=expanded),
    ]


def lora_mixed_reference(a):
    return R.lora_linear_mixed(*a.values())


def _list_of(a, key, k, t):
    out = list(a[key])
    out[k] = t
    return out


LORA_MIXED_BAD = [
    Bad("row_adapter too short", lambda a: dict(row_adapter=[0] * 6), ValueError, "row_adapter", "6 entries"),
    Bad("row_adapter too long", lambda a: dict(row_adapter=[0] * 8), ValueError, "row_adapter", "8 entries"),
    Bad("row_adapter < -1", lambda a: dict(row_adapter=[0, 1, -2, 0, 0, 0, 0]), ValueError, "row_adapter",
        "row_adapter[2] = -2"),
    Bad("row_adapter >= K", lambda a: dict(row_adapter=[0, 1, 3, 0, 0, 0, 0]), ValueError, "row_adapter", "[-1, 3)"),
    Bad("lora_b count", lambda a: dict(lora_b=a["lora_b"][:2]), ValueError, "lora_b", "2 tensors"),
    Bad("scale count", lambda a: dict(scale=[1.0] * 4), ValueError, "scale", "4 numbers"),
    Bad("scale inf", lambda a: dict(scale=[1.0, float("inf"), 1.0]), ValueError, "scale[1]", "inf"),
    Bad("lora_a in", lambda a: dict(lora_a=_list_of(a, "lora_a", 1, like(a["x"], 5, 9))), ValueError, "lora_a[1]",
        "[5, 9]"),
    Bad("lora_a 1-D", lambda a: dict(lora_a=_list_of(a, "lora_a", 0, like(a["x"], 10))), ValueError, "lora_a[0]",
        "1-D"),
    Bad("lora_a rank 0", lambda a: dict(lora_a=_list_of(a, "lora_a", 2, like(a["x"], 0, 10)),
                                        lora_b=_list_of(a, "lora_b", 2, like(a["x"], 6, 0))), ValueError, "lora_a[2]",
        "r >= 1"),
    Bad("lora_b out", lambda a: dict(lora_b=_list_of(a, "lora_b", 1, like(a["x"], 7, 5))), ValueError, "lora_b[1]",
        "[7, 5]"),
    Bad("lora_b rank", lambda a: dict(lora_b=_list_of(a, "lora_b", 1, like(a["x"], 6, 4))), ValueError, "lora_b[1]",
        "rank r"),
    Bad("lora_a dtype", lambda a: dict(lora_a=_list_of(a, "lora_a", 0, like(a["x"], 2, 10, dtype=F64))), TypeError,
        "lora_a[0]", "Double"),
    Bad("lora_b dtype", lambda a: dict(lora_b=_list_of(a, "lora_b", 1, like(a["x"], 6, 5, dtype=torch.bfloat16))),
        TypeError, "lora_b[1]", "BFloat16"),
    Bad("x 1-D", lambda a: dict(x=like(a["x"], 10), row_adapter=[]), ValueError, "x", "1-D"),
    Bad("x int", lambda a: dict(x=ones_like_dev(a["x"], 7, 3, 10, dtype=torch.int64)), TypeError, "x", "Long"),
    Bad("x last dim", lambda a: dict(x=like(a["x"], 7, 3, 9)), ValueError, "x", "[7, 3, 9]"),
    Bad("weight dtype", lambda a: dict(weight=like(a["x"], 6, 10, dtype=F64)), TypeError, "weight", "Double"),
    Bad("weight 1-D", lambda a: dict(weight=like(a["x"], 6)), ValueError, "weight", "1-D"),
    Bad("bias shape", lambda a: dict(bias=like(a["x"], 5)), ValueError, "bias", "[5]"),
]


def vera_mixed_samples(device, dtype):
    def make(name, row_adapter=INTERLEAVED, middle=(3,), n_in=10, n_out=6, r=4, adapters=3, bias=True,
             layout=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = rnd(g, len(row_adapter), *middle, n_in, dtype=dtype, device=device)
        return Sample(name, dict(
            x=layout(x) if layout else x, weight=rnd(g, n_out, n_in, dtype=dtype, device=device),
            bias=rnd(g, n_out, dtype=dtype, device=device) if bias else None,
            vera_a=rnd(g, r, n_in + 3, dtype=dtype, device=device),
            vera_b=rnd(g, n_out + 2, r, dtype=dtype, device=device),
            lambda_d=rnd(g, adapters, r, dtype=dtype, device=device),
            lambda_b=rnd(g, adapters, n_out, dtype=dtype, device=device), row_adapter=list(row_adapter)))

    return [
        make("basic"),
        make("contiguous runs", row_adapter=sorted(INTERLEAVED)),
        make("base rows only", row_adapter=[-1] * 7),
        make("one adapter", row_adapter=[2] * 7),
        make("empty batch", row_adapter=[]),
        make("2-D x, no bias", middle=(), bias=False),
        make("transposed x", layout=transposed),
        make("expanded x", layout=expanded),
    ]


def vera_mixed_reference(a):
    return R.vera_linear_mixed(*a.values())


VERA_MIXED_BAD = [
    Bad("row_adapter length", lambda a: dict(row_adapter=[0] * 6), ValueError, "row_adapter", "6 entries"),
    Bad("row_adapter >= K", lambda a: dict(row_adapter=[0, 1, 3, 0, 0, 0, 0]), ValueError, "row_adapter",
        "row_adapter[2] = 3"),
    Bad("layer wider than shared A", lambda a: dict(vera_a=like(a["x"], 4, 9)), ValueError, "vera_a",
        "max_in >= in_features 10"),
    Bad("layer taller than shared B", lambda a: dict(vera_b=like(a["x"], 5, 4)), ValueError, "vera_b",
        "max_out >= out_features 6"),
    Bad("vera_a rank 0", lambda a: dict(vera_a=like(a["x"], 0, 13), vera_b=like(a["x"], 8, 0),
                                        lambda_d=like(a["x"], 3, 0)), ValueError, "vera_a", "r >= 1"),
    Bad("vera_b rank", lambda a: dict(vera_b=like(a["x"], 8, 3)), ValueError, "vera_b", "rank r"),
    Bad("lambda_d 1-D", lambda a: dict(lambda_d=like(a["x"], 4)), ValueError, "lambda_d", "1-D"),
    Bad("lambda_d width", lambda a: dict(lambda_d=like(a["x"], 3, 5)), ValueError, "lambda_d", "[3, 5]"),
    Bad("lambda_b rows", lambda a: dict(lambda_b=like(a["x"], 2, 6)), ValueError, "lambda_b", "[2, 6]"),
    Bad("lambda_b width", lambda a: dict(lambda_b=like(a["x"], 3, 7)), ValueError, "lambda_b", "[3, 7]"),
    Bad("lambda_b dtype", lambda a: dict(lambda_b=like(a["x"], 3, 6, dtype=F64)), TypeError, "lambda_b", "Double"),
    Bad("vera_a dtype", lambda a: dict(vera_a=like(a["x"], 4, 13, dtype=F64)), TypeError, "vera_a", "Double"),
    Bad("x 1-D", lambda a: dict(x=like(a["x"], 10), row_adapter=[]), ValueError, "x", "1-D"),
    Bad("bias shape", lambda a: dict(bias=like(a["x"], 7)), ValueError, "bias", "[7]"),
]


# --- TokenTune: positions every token-subset op rejects --------------------------------------

def bad_positions(batch_of: str = "x", tokens: int = 5):
    """Positions for a sample with B = 2 and T = `tokens`; the last three only
    the data tells (the fake kernels cannot see values)."""
    T = tokens

    def pos(values, dtype=torch.int64):
        return lambda a: dict(positions=tensor_on(a[batch_of], values, dtype))

    return [
        Bad("positions float", pos([[0.0, 1.0], [2.0, 3.0]], F32), TypeError, "positions", "int64"),
        Bad("positions int32", pos([[0, 1], [2, 3]], torch.int32), TypeError, "positions", "Int"),
        Bad("positions wrong batch", pos([[0, 1], [2, 3], [1, 4]]), ValueError, "positions",
            f"[B, k] with B = 2 (the batch of '{batch_of}')"),
        Bad("positions 1-D", pos([0, 1]), ValueError, "positions", "2-D"),
        Bad("more than T positions", pos([list(range(T)) + [0]] * 2), ValueError, "positions", f"at most {T}"),
        Bad("positions out of range", pos([[0, T], [1, 2]]), ValueError, "positions", f"[0, {T})", fake=False),
        Bad("positions negative", pos([[0, -1], [1, 2]]), ValueError, "positions", f"[0, {T})", fake=False),
        Bad("positions repeated in a row", pos([[3, 1], [2, 2]]), ValueError, "positions", "distinct", fake=False),
    ]


# --- TokenTune: token_subset_linear, _lora_linear, _vera_linear ---------------------------------

TS_SCALE = 0.75
TS_TRAINED = {"linear": ("x", "weight", "bias"), "lora": ("x", "weight", "bias", "lora_a", "lora_b"),
              "vera": ("x", "weight", "bias", "lambda_d", "lambda_b")}


def ts_linear_case(device, dtype, B=2, T=5, k=3, n_in=8, n_out=5, r=3, bias=True, layout=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = rnd(g, B, T, n_in, dtype=dtype, device=device)
    return dict(x=layout(x) if layout else x, weight=rnd(g, n_out, n_in, dtype=dtype, device=device),
                bias=rnd(g, n_out, dtype=dtype, device=device) if bias else None,
                lora_a=rnd(g, r, n_in, dtype=dtype, device=device), lora_b=rnd(g, n_out, r, dtype=dtype, device=device),
                vera_a=rnd(g, r, n_in + 3, dtype=dtype, device=device),
                vera_b=rnd(g, n_out + 2, r, dtype=dtype, device=device),
                lambda_d=rnd(g, r, dtype=dtype, device=device), lambda_b=rnd(g, n_out, dtype=dtype, device=device),
                positions=positions(B, T, k, g, device))


def ts_linear_args(method, c, p, device):
    seed = torch.tensor(1234, device=device) if p else None
    if method == "linear":
        return dict(x=c["x"], weight=c["weight"], bias=c["bias"], positions=c["positions"])
    if method == "lora":
        return dict(x=c["x"], weight=c["weight"], bias=c["bias"], lora_a=c["lora_a"], lora_b=c["lora_b"],
                    scale=TS_SCALE, dropout_p=p, seed=seed, positions=c["positions"])
    return dict(x=c["x"], weight=c["weight"], bias=c["bias"], vera_a=c["vera_a"], vera_b=c["vera_b"],
                lambda_d=c["lambda_d"], lambda_b=c["lambda_b"], dropout_p=p, seed=seed, positions=c["positions"])


def ts_linear_samples(method):
    adapter = method != "linear"
    p = 0.3 if method != "linear" else 0.0  # dropout on the adapter's input

    def samples(device, dtype):
        def make(name, p=p, big=False, **shape):
            args = ts_linear_args(method, ts_linear_case(device, dtype, **shape), p, device)
            return Sample(name, args, present(TS_TRAINED[method], args), big)

        out = [
            make("basic"),
            make("B=1, k=1", B=1, T=5, k=1, seed=1),
            make("B=3, k=T", B=3, T=4, k=4, seed=2),
            make("no bias, no dropout", bias=False, p=0.0),
            make("empty batch", B=0, T=4, k=2),
            make("no token selected", B=2, T=4, k=0),
            make("transposed x", layout=lambda t: t.permute(2, 1, 0).contiguous().permute(2, 1, 0)),
            make("expanded x", layout=expanded),
            make("many rows (several CPU row blocks)", B=3, T=300, k=200, n_in=64, n_out=16, r=4, big=True),
        ]
        if adapter:
            out += [make("r=1", r=1), make("r > in and out", n_in=3, n_out=2, r=7)]
        return out

    return samples


def ts_linear_reference(method):
    def reference(a):
        if method == "linear":
            fn = lambda x: F.linear(x, a["weight"], a["bias"])  # noqa: E731
        elif method == "lora":
            fn = lambda x: R.lora_linear(x, a["weight"], a["bias"], a["lora_a"], a["lora_b"], a["scale"],  # noqa: E731
                                         a["dropout_p"], seed_of(a))
        else:
            fn = lambda x: R.vera_linear(x, a["weight"], a["bias"], a["vera_a"], a["vera_b"], a["lambda_d"],  # noqa: E731
                                         a["lambda_b"], a["dropout_p"], seed_of(a))
        return R.token_subset(fn, a["positions"], a["x"])

    return reference


def ts_linear_saved(method):
    """What each layer keeps with a frozen base: the selected rows only."""
    def nbytes(a):
        B, k = a["positions"].shape
        es = a["x"].element_size()
        if method == "linear":  # x_rows, for grad_weight (none over a frozen NF4 weight)
            width = a["x"].shape[2] if a["weight"].requires_grad else 0
        elif method == "lora":
            width = a["x"].shape[2] + a["lora_a"].shape[0]     # x_rows, u_rows
        else:
            width = a["vera_a"].shape[0]                       # u_rows
        return B * k * width * es

    grad = {"linear": ("x", "weight", "bias"), "lora": ("x", "lora_a", "lora_b"),
            "vera": ("x", "lambda_d", "lambda_b")}[method]
    return SavedSpec(grad, nbytes)


def ts_linear_bad(method):
    bad = bad_positions(tokens=5) + [
        Bad("x 2-D", lambda a: dict(x=like(a["x"], 10, 8)), ValueError, "x",
            "a 3-D tensor [batch, tokens, in_features]"),
        Bad("x 4-D", lambda a: dict(x=like(a["x"], 2, 5, 1, 8)), ValueError, "x",
            "a 3-D tensor [batch, tokens, in_features]"),
        Bad("bias dtype", lambda a: dict(bias=like(a["x"], 5, dtype=F64)), TypeError, "bias", "Double"),
        Bad("weight in", lambda a: dict(weight=like(a["x"], 5, 7)), ValueError, "x", "[2, 5, 8]"),
    ]
    if method == "lora":
        bad += [Bad("lora_a in", lambda a: dict(lora_a=like(a["x"], 3, 7)), ValueError, "lora_a", "[3, 7]"),
                Bad("seed missing", lambda a: dict(dropout_p=0.1, seed=None), ValueError, "seed", "None")]
    if method == "vera":
        bad += [Bad("lambda_b size", lambda a: dict(lambda_b=like(a["x"], 4)), ValueError, "lambda_b", "[4]")]
    return bad


def ts_linear_backward_samples(method):
    def samples(device, dtype):
        c = ts_linear_case(device, dtype, seed=5)
        B, k = c["positions"].shape
        g = torch.Generator().manual_seed(6)
        grad_y = rnd(g, B, c["x"].shape[1], c["weight"].shape[0], dtype=dtype, device=device)
        x_rows = rnd(g, B * k, c["x"].shape[2], dtype=dtype, device=device)
        u_rows = rnd(g, B * k, c["lora_a"].shape[0], dtype=dtype, device=device)
        seed = torch.tensor(3, device=device)

        def make(name, mask, rows=True):
            xr = x_rows if rows else torch.empty(0, dtype=dtype, device=device)
            if method == "linear":
                args = dict(grad_y=grad_y, x_rows=xr, weight=c["weight"], positions=c["positions"],
                            output_mask=mask[:3])
            elif method == "lora":
                args = dict(grad_y=grad_y, x_rows=xr, weight=c["weight"], lora_a=c["lora_a"], lora_b=c["lora_b"],
                            u_rows=u_rows, scale=TS_SCALE, dropout_p=0.25, seed=seed, positions=c["positions"],
                            output_mask=mask)
            else:
                args = dict(grad_y=grad_y, x_rows=xr, weight=c["weight"], vera_a=c["vera_a"], vera_b=c["vera_b"],
                            lambda_d=c["lambda_d"], lambda_b=c["lambda_b"], u_rows=u_rows, dropout_p=0.25,
                            seed=seed, positions=c["positions"], output_mask=mask)
            return Sample(name, args)

        out = [make("basic", [True] * 5), make("x and the adapter", [True, False, False, True, True]),
               make("weight and bias", [False, True, True, False, False])]
        # x_rows is not saved when no gradient reads its values: the empty [0] stand-in.
        if method == "linear":
            out.append(make("x only, rows not saved", [True, False, True, False, False], rows=False))
        elif method == "lora":
            out.append(make("lora_b only, rows not saved", [True, False, False, False, True], rows=False))
        else:
            out.append(make("vectors only, rows not saved", [True, False, False, True, True], rows=False))
        return out

    return samples


def ts_linear_backward_bad(method):
    u_index = {"lora": "u_rows", "vera": "u_rows"}
    bad = [
        Bad("x_rows stand-in where values are needed",
            lambda a: dict(x_rows=torch.empty(0, dtype=a["grad_y"].dtype, device=a["grad_y"].device)), ValueError,
            "x_rows", "expected shape [6, 8]"),
        Bad("grad_y features", lambda a: dict(grad_y=like(a["grad_y"], 2, 5, 4)), ValueError, "grad_y", "5"),
        Bad("grad_y 2-D", lambda a: dict(grad_y=like(a["grad_y"], 10, 5)), ValueError, "grad_y", "3-D"),
        Bad("x_rows dtype", lambda a: dict(x_rows=like(a["grad_y"], 6, 8, dtype=F64)), TypeError, "x_rows", "Double"),
        Bad("positions batch", lambda a: dict(positions=tensor_on(a["grad_y"], [[0, 1, 2]])), ValueError, "positions",
            "B = 2"),
    ]
    if method in u_index:
        bad.append(Bad("u_rows shape", lambda a: dict(u_rows=like(a["grad_y"], 6, 2)), ValueError, "u_rows",
                       "expected shape [6, 3]"))
    return bad


# --- TokenTune: norms -------------------------------------------------------------------------

EPS = 1e-5


def norm_samples(kind):
    def samples(device, dtype):
        def make(name, B=2, T=5, k=3, features=(6,), weight=True, bias=True, layout=None, seed=0):
            g = torch.Generator().manual_seed(seed)
            x = rnd(g, B, T, *features, dtype=dtype, device=device, scale=3.0) + 1
            d = features[-1]
            args = dict(x=layout(x) if layout else x, weight=rnd(g, d, dtype=dtype, device=device) if weight else None)
            if kind == "layer":
                args["bias"] = rnd(g, d, dtype=dtype, device=device) if bias else None
            args.update(eps=EPS, positions=positions(B, T, k, g, device))
            return Sample(name, args, present(("x", "weight", "bias"), args))

        return [
            make("basic"),
            make("other shape", B=3, T=6, k=2, seed=7),
            make("B=1, k=1, weight only", B=1, T=6, k=1, bias=False, seed=1),
            make("k=T, bias only", B=3, T=4, k=4, weight=False, seed=2),
            make("no affine", weight=False, bias=False, seed=3),
            make("heads dim [B, T, H, D]", features=(3, 4), seed=4),
            make("empty batch", B=0, T=5, k=2),
            make("no token selected", k=0),
            make("transposed x", layout=lambda t: t.permute(2, 0, 1).contiguous().permute(1, 2, 0), seed=5),
            make("expanded x", layout=expanded, seed=6),
        ]

    return samples


def norm_reference(kind):
    def reference(a):
        if kind == "layer":
            fn = lambda t: F.layer_norm(t, t.shape[-1:], a["weight"], a["bias"], a["eps"])  # noqa: E731
        else:
            fn = lambda t: R.rms_norm(t, a["weight"], a["eps"])  # noqa: E731
        return R.token_subset(fn, a["positions"], a["x"])

    return reference


def rows_bytes(a, key="x"):
    B, k = a["positions"].shape
    t = a[key]
    return B * k * t[0, 0].numel() * t.element_size()


def norm_bad(kind):
    bad = bad_positions(tokens=5) + [
        Bad("x 2-D", lambda a: dict(x=like(a["x"], 2, 5)), ValueError, "x", "[B, T, ..., D]"),
        Bad("x int", lambda a: dict(x=ones_like_dev(a["x"], 2, 5, 6, dtype=torch.int64)), TypeError, "x", "Long"),
        Bad("weight size", lambda a: dict(weight=like(a["x"], 5)), ValueError, "weight", "size 6 in dim 0"),
        Bad("weight 2-D", lambda a: dict(weight=like(a["x"], 1, 6)), ValueError, "weight", "1-D"),
        Bad("weight dtype", lambda a: dict(weight=like(a["x"], 6, dtype=F64)), TypeError, "weight", "Double"),
        Bad("fp32 weight beside fp64 x", lambda a: dict(x=a["x"].double(), weight=a["weight"].float(),
                                                        **({"bias": a["bias"].double()} if kind == "layer" else {})),
            TypeError, "weight", "Float"),
        Bad("eps inf", lambda a: dict(eps=float("inf")), ValueError, "eps", "inf"),
    ]
    if kind == "layer":
        bad.append(Bad("bf16 bias beside a float32 weight",
                       lambda a: dict(x=a["x"].bfloat16(), bias=a["bias"].bfloat16()), TypeError, "bias",
                       "dtype Float"))
    return bad


def norm_backward_samples(kind):
    def samples(device, dtype):
        g = torch.Generator().manual_seed(7)
        B, T, k, d = 3, 5, 2, 6
        grad_y = rnd(g, B, T, d, dtype=dtype, device=device)
        x_rows = rnd(g, B * k, d, dtype=dtype, device=device)
        w, b = rnd(g, d, dtype=dtype, device=device), rnd(g, d, dtype=dtype, device=device)
        pos = positions(B, T, k, g, device)
        masks = ([True, True, True], [True, False, False], [False, True, True], [False, False, True])

        def make(name, mask, weight=True, bias=True):
            args = dict(grad_y=grad_y, x_rows=x_rows, weight=w if weight else None)
            if kind == "layer":
                args["bias"] = b if bias else None
            args.update(eps=EPS, positions=pos, output_mask=mask if kind == "layer" else mask[:2])
            return Sample(name, args)

        return [make("basic", masks[0]), make("grad_x only", masks[1]), make("parameters only", masks[2]),
                make("no affine", masks[3], weight=False, bias=False)]

    return samples


NORM_BACKWARD_BAD = [
    Bad("x_rows rows", lambda a: dict(x_rows=like(a["grad_y"], 5, 6)), ValueError, "x_rows", "expected shape [6, 6]"),
    Bad("x_rows features", lambda a: dict(x_rows=like(a["grad_y"], 6, 5)), ValueError, "x_rows",
        "expected shape [6, 6]"),
    Bad("weight size", lambda a: dict(weight=like(a["grad_y"], 5)), ValueError, "weight", "size 6"),
    Bad("grad_y 2-D", lambda a: dict(grad_y=like(a["grad_y"], 3, 6)), ValueError, "grad_y", "[B, T, ..., D]"),
]


# --- TokenTune: activations -------------------------------------------------------------------

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
               "relu": F.relu}


def activation_samples(gated):
    def samples(device, dtype):
        def make(name, kind, B=2, T=5, k=3, features=(6,), layout=None, seed=0):
            g = torch.Generator().manual_seed(seed)
            gate = rnd(g, B, T, *features, dtype=dtype, device=device, scale=3.0)
            gate = layout(gate) if layout else gate
            pos = positions(B, T, k, g, device)
            if gated:
                up = rnd(g, B, T, *features, dtype=dtype, device=device)
                return Sample(name, dict(gate=gate, up=strided(up) if layout else up, kind=kind, positions=pos),
                              ("gate", "up"))
            return Sample(name, dict(x=gate, kind=kind, positions=pos), ("x",))

        return [
            make("basic", "gelu"),
            make("gelu_tanh, B=1, k=1", "gelu_tanh", B=1, T=6, k=1, seed=1),
            make("silu, k=T", "silu", B=3, T=4, k=4, seed=2),
            make("relu", "relu", seed=3),
            make("[B, T]", "silu", features=(), seed=4),
            make("[B, T, 3, 4]", "gelu", features=(3, 4), seed=5),
            make("empty batch", "silu", B=0, k=2),
            make("no token selected", "gelu", k=0),
            make("transposed", "gelu_tanh", layout=lambda t: t.permute(2, 0, 1).contiguous().permute(1, 2, 0), seed=6),
            make("expanded", "silu", layout=expanded, seed=7),
        ]

    return samples


def activation_reference(gated):
    def reference(a):
        act = ACTIVATIONS[a["kind"]]
        if gated:
            return R.token_subset(lambda g, u: act(g) * u, a["positions"], a["gate"], a["up"])
        return R.token_subset(act, a["positions"], a["x"])

    return reference


def bad_kind():
    return Bad("unknown kind", lambda a: dict(kind="swish"), ValueError, "kind",
               "one of 'gelu', 'gelu_tanh', 'silu', 'relu', got 'swish'")


ACTIVATION_BAD = bad_positions(tokens=5) + [
    bad_kind(),
    Bad("x int", lambda a: dict(x=ones_like_dev(a["x"], 2, 5, 6, dtype=torch.int64)), TypeError, "x", "Long"),
    Bad("x 1-D", lambda a: dict(x=like(a["x"], 5)), ValueError, "x", "[5]"),
]

GATED_BAD = bad_positions("gate", tokens=5) + [
    bad_kind(),
    Bad("gate int", lambda a: dict(gate=ones_like_dev(a["gate"], 2, 5, 6, dtype=torch.int64)), TypeError, "gate",
        "Long"),
    Bad("up shape", lambda a: dict(up=like(a["gate"], 2, 5, 3)), ValueError, "up", "[2, 5, 3]"),
    Bad("up dtype", lambda a: dict(up=like(a["gate"], 2, 5, 6, dtype=F64)), TypeError, "up", "Double"),
    Bad("gate 1-D", lambda a: dict(gate=like(a["gate"], 5)), ValueError, "gate", "[5]"),
]


def activation_backward_samples(gated):
    def samples(device, dtype):
        g = torch.Generator().manual_seed(8)
        B, T, k, d = 3, 5, 2, 6
        grad_y = rnd(g, B, T, d, dtype=dtype, device=device)
        rows = [rnd(g, B * k, d, dtype=dtype, device=device) for _ in range(2)]
        pos = positions(B, T, k, g, device)
        if not gated:
            return [Sample(name, dict(grad_y=grad_y, x_rows=rows[0], kind=kind, positions=pos))
                    for name, kind in (("basic", "gelu"), ("relu", "relu"))]
        return [Sample(name, dict(grad_y=grad_y, gate_rows=rows[0], up_rows=rows[1], kind=kind, positions=pos,
                                  output_mask=mask))
                for name, kind, mask in (("basic", "silu", [True, True]), ("gate only", "gelu", [True, False]),
                                         ("up only", "gelu_tanh", [False, True]))]

    return samples


def activation_backward_bad(gated):
    if not gated:
        return [
            bad_kind(),
            Bad("x_rows shape", lambda a: dict(x_rows=like(a["grad_y"], 6, 5)), ValueError, "x_rows",
                "expected shape [6, 6]"),
            Bad("x_rows dtype", lambda a: dict(x_rows=like(a["grad_y"], 6, 6, dtype=F64)), TypeError, "x_rows",
                "Double"),
        ]
    return [
        bad_kind(),
        Bad("up_rows shape", lambda a: dict(up_rows=like(a["grad_y"], 2, 6)), ValueError, "up_rows",
            "expected shape [6, 6]"),
        Bad("gate_rows dtype", lambda a: dict(gate_rows=like(a["grad_y"], 6, 6, dtype=F64)), TypeError, "gate_rows",
            "Double"),
    ]


# --- TokenTune: dropout -------------------------------------------------------------------------

def ts_dropout_samples(device, dtype):
    def make(name, B=2, T=5, k=3, features=(6,), p=0.3, layout=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        x = rnd(g, B, T, *features, dtype=dtype, device=device)
        return Sample(name, dict(x=layout(x) if layout else x, p=p,
                                 seed=torch.tensor(17 + seed, device=device) if p else None,
                                 positions=positions(B, T, k, g, device)), ("x",))

    return [
        make("basic"),
        make("other shape", B=3, T=6, k=2, seed=8),
        make("p=0: a copy", p=0.0, seed=1),
        make("B=1, k=1", B=1, T=6, k=1, seed=2),
        make("k=T", B=3, T=4, k=4, seed=3),
        make("[B, T]", features=(), seed=4),
        make("[B, T, 3, 4]", features=(3, 4), p=0.5, seed=5),
        make("empty batch", B=0, k=2),
        make("transposed x", layout=lambda t: t.permute(2, 0, 1).contiguous().permute(1, 2, 0), seed=6),
        make("expanded x", layout=expanded, seed=7),
    ]


def ts_dropout_reference(a):
    return R.token_subset(lambda t: R.flat_row_dropout(t, seed_of(a), a["p"]), a["positions"], a["x"])


TS_DROPOUT_BAD = bad_positions(tokens=5) + [
    Bad("p = 1", lambda a: dict(p=1.0), ValueError, "p", "a probability in [0, 1)"),
    Bad("p < 0", lambda a: dict(p=-0.1), ValueError, "p", "-0.1"),
    Bad("missing seed", lambda a: dict(seed=None), ValueError, "seed", "None"),
    Bad("float seed", lambda a: dict(seed=torch.tensor(1.0)), TypeError, "seed", "Float"),
    Bad("int x", lambda a: dict(x=ones_like_dev(a["x"], 2, 5, 6, dtype=torch.int64)), TypeError, "x", "Long"),
]


def ts_dropout_backward_samples(device, dtype):
    g = torch.Generator().manual_seed(9)
    grad_y = rnd(g, 3, 5, 6, dtype=dtype, device=device)
    pos = positions(3, 5, 2, g, device)
    return [Sample("basic", dict(grad_y=grad_y, p=0.3, seed=torch.tensor(7, device=device), positions=pos)),
            Sample("p=0", dict(grad_y=grad_y, p=0.0, seed=None, positions=pos))]


TS_DROPOUT_BACKWARD_BAD = [
    Bad("missing seed", lambda a: dict(seed=None), ValueError, "seed", "None"),
    Bad("positions batch", lambda a: dict(positions=tensor_on(a["grad_y"], [[0, 1]])), ValueError, "positions",
        "B = 3"),
]


# --- TokenTune: attention -------------------------------------------------------------------------

def attention_mask(kind, B, T, S, g, dtype, device):
    """(attn_mask, is_causal); every mask leaves each query at least one key."""
    if kind == "causal":
        return None, True
    if kind == "bool padding":  # [B, 1, 1, S]: the last b % 3 keys of row b are padding
        mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
        for b in range(B):
            pad = min(b % 3, S - 1)
            if pad:
                mask[b, ..., S - pad:] = False
        return mask.to(device), False
    if kind == "additive":  # [B, 1, T, S]: a bias, and -inf at random keys
        mask = torch.randn(B, 1, T, S, generator=g, dtype=F64)
        blocked = torch.rand(B, 1, T, S, generator=g) < 0.3
        blocked[..., torch.arange(T), torch.arange(T) % S] = False
        return mask.masked_fill(blocked, -float("inf")).to(dtype).to(device), False
    return None, False


def attention_samples(device, dtype):
    def make(name, B=2, Hq=4, Hkv=2, T=5, S=7, k=3, D=4, Dv=3, mask="none", p=0.0, layout=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, kk, v = (rnd(g, B, Hq, T, D, dtype=dtype, device=device), rnd(g, B, Hkv, S, D, dtype=dtype, device=device),
                    rnd(g, B, Hkv, S, Dv, dtype=dtype, device=device))
        if layout is not None:
            q, kk, v = layout(q), layout(kk), layout(v)
        attn_mask, causal = attention_mask(mask, B, T, S, g, dtype, device)
        return Sample(name, dict(query=q, key=kk, value=v, attn_mask=attn_mask, scale=0.37, is_causal=causal,
                                 dropout_p=p, seed=torch.tensor(5 + seed, device=device) if p else None,
                                 positions=positions(B, T, k, g, device)), ("query", "key", "value"))

    transformers_layout = lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)  # noqa: E731
    return [
        make("basic"),
        make("other shape", B=3, T=6, S=5, k=2, seed=10),
        make("B=1, k=1", B=1, T=6, S=6, k=1, seed=1),
        make("mha, k=T, bool padding mask", Hq=2, Hkv=2, T=5, S=5, k=5, mask="bool padding", seed=2),
        make("additive mask, T > S", Hq=4, Hkv=4, T=7, S=4, k=2, mask="additive", seed=3),
        make("mqa, causal", Hkv=1, T=5, S=8, k=5, mask="causal", seed=4),
        make("dropout", p=0.3, seed=5),
        make("dropout, causal", p=0.4, mask="causal", T=6, S=6, seed=6),
        make("dropout, additive mask", p=0.3, mask="additive", seed=7),
        make("dropout, bool padding mask, mqa", Hkv=1, p=0.3, mask="bool padding", seed=11),
        make("empty batch", B=0, k=0, p=0.2),
        make("no query selected", k=0),
        make("transformers' layout", layout=transformers_layout, p=0.3, seed=8),
        make("expanded", layout=expanded, seed=9),
    ]


def attention_reference(a):
    mask = a["attn_mask"]

    def attend(q):
        return R.attention(q, a["key"], a["value"], mask, a["is_causal"], a["scale"], a["dropout_p"], seed_of(a))

    return R.token_subset(attend, a["positions"], a["query"], token_dim=2)


def attention_saved(a):
    B, Hq, _, D = a["query"].shape
    k = a["positions"].shape[1]
    es = a["query"].element_size()
    return B * Hq * k * D * es + a["key"].untyped_storage().nbytes() + a["value"].untyped_storage().nbytes()


def _q(a, *shape, dtype=None):
    return like(a["query"], *shape, dtype=dtype)


ATTENTION_BAD = bad_positions("query", tokens=5) + [
    Bad("query 3-D", lambda a: dict(query=_q(a, 2, 4, 5)), ValueError, "query", "3-D"),
    Bad("query int", lambda a: dict(query=ones_like_dev(a["query"], 2, 4, 5, 4, dtype=torch.int64)), TypeError,
        "query", "Long"),
    Bad("heads", lambda a: dict(key=_q(a, 2, 3, 7, 4), value=_q(a, 2, 3, 7, 3)), ValueError, "key", "[2, 3, 7, 4]"),
    Bad("head dim", lambda a: dict(key=_q(a, 2, 2, 7, 5)), ValueError, "key", "[2, 2, 7, 5]"),
    Bad("key batch", lambda a: dict(key=_q(a, 1, 2, 7, 4)), ValueError, "key", "[1, 2, 7, 4]"),
    Bad("value tokens", lambda a: dict(value=_q(a, 2, 2, 6, 3)), ValueError, "value", "[2, 2, 6, 3]"),
    Bad("key dtype", lambda a: dict(key=_q(a, 2, 2, 7, 4, dtype=F64)), TypeError, "key", "Double"),
    Bad("value dtype", lambda a: dict(value=_q(a, 2, 2, 7, 3, dtype=torch.bfloat16)), TypeError, "value", "BFloat16"),
    Bad("mask dtype", lambda a: dict(attn_mask=_q(a, 2, 1, 5, 7, dtype=F64)), TypeError, "attn_mask", "Double"),
    Bad("mask shape", lambda a: dict(attn_mask=_q(a, 2, 1, 5, 8)), ValueError, "attn_mask", "[2, 1, 5, 8]"),
    Bad("mask 5-D", lambda a: dict(attn_mask=_q(a, 1, 2, 1, 5, 7)), ValueError, "attn_mask", "[1, 2, 1, 5, 7]"),
    Bad("mask and causal", lambda a: dict(attn_mask=ones_like_dev(a["query"], 5, 7, dtype=torch.bool),
                                          is_causal=True), ValueError, "is_causal", "True together with an attn_mask"),
    Bad("scale 0", lambda a: dict(scale=0.0), ValueError, "scale", "0"),
    Bad("scale inf", lambda a: dict(scale=float("inf")), ValueError, "scale", "inf"),
    Bad("scale nan", lambda a: dict(scale=float("nan")), ValueError, "scale", "nan"),
    Bad("dropout 1", lambda a: dict(dropout_p=1.0, seed=torch.tensor(1)), ValueError, "dropout_p", "1"),
    Bad("no seed", lambda a: dict(dropout_p=0.1), ValueError, "seed", "None"),
]


def attention_backward_samples(device, dtype):
    g = torch.Generator().manual_seed(10)
    B, Hq, Hkv, T, S, k, D, Dv = 2, 4, 2, 5, 7, 2, 4, 3
    grad_out = rnd(g, B, Hq, T, Dv, dtype=dtype, device=device)
    rows = rnd(g, B, Hq, k, D, dtype=dtype, device=device)
    key, value = rnd(g, B, Hkv, S, D, dtype=dtype, device=device), rnd(g, B, Hkv, S, Dv, dtype=dtype, device=device)
    mask, _ = attention_mask("additive", B, T, S, g, dtype, device)
    pos = positions(B, T, k, g, device)

    def make(name, need, attn_mask=None, causal=False, p=0.0):
        return Sample(name, dict(grad_out=grad_out, query_rows=rows, key=key, value=value, attn_mask=attn_mask,
                                 scale=0.3, is_causal=causal, dropout_p=p,
                                 seed=torch.tensor(3, device=device) if p else None, positions=pos, output_mask=need))

    return [make("basic", [True] * 3), make("query only, causal", [True, False, False], causal=True),
            make("key only, mask, dropout", [False, True, False], attn_mask=mask, p=0.2),
            make("value only, dropout", [False, False, True], p=0.3)]


ATTENTION_BACKWARD_BAD = [
    Bad("grad_out heads", lambda a: dict(grad_out=like(a["grad_out"], 2, 3, 5, 3)), ValueError, "grad_out",
        "[2, 3, 5, 3]"),
    Bad("grad_out value dim", lambda a: dict(grad_out=like(a["grad_out"], 2, 4, 5, 4)), ValueError, "grad_out",
        "[2, 4, 5, 4]"),
    Bad("query_rows k", lambda a: dict(query_rows=like(a["grad_out"], 2, 4, 3, 4)), ValueError, "query_rows",
        "[2, 4, 3, 4]"),
    Bad("positions batch", lambda a: dict(positions=tensor_on(a["grad_out"], [[0, 1]])), ValueError, "positions",
        "[1, 2]"),
]


# --- READ: recurrent cells and the scan ----------------------------------------------------------

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def recurrent_tensors(cell, g, dtype, device, N, n_in, H, L=None, bias="both"):
    """xs [L, N, in] (x [N, in] when L is None), h, c, weights."""
    G = GATES[cell]
    x_shape = (N, n_in) if L is None else (L, N, n_in)
    return dict(x=rnd(g, *x_shape, dtype=dtype, device=device), h=rnd(g, N, H, dtype=dtype, device=device),
                c=rnd(g, N, H, dtype=dtype, device=device) if cell == "lstm" else None,
                w_ih=rnd(g, G * H, n_in, dtype=dtype, device=device, scale=0.5),
                w_hh=rnd(g, G * H, H, dtype=dtype, device=device, scale=0.5),
                b_ih=rnd(g, G * H, dtype=dtype, device=device) if bias in ("both", "ih") else None,
                b_hh=rnd(g, G * H, dtype=dtype, device=device) if bias == "both" else None)


def cell_args(cell, t):
    args = dict(x=t["x"], h=t["h"])
    if cell == "lstm":
        args["c"] = t["c"]
    args.update(w_ih=t["w_ih"], w_hh=t["w_hh"], b_ih=t["b_ih"], b_hh=t["b_hh"])
    return args


CELL_GRAD = ("x", "h", "c", "w_ih", "w_hh", "b_ih", "b_hh")


def cell_samples(cell):
    def samples(device, dtype):
        def make(name, N=4, n_in=5, H=3, bias="both", layout=None, seed=0):
            t = recurrent_tensors(cell, torch.Generator().manual_seed(seed), dtype, device, N, n_in, H, bias=bias)
            if layout is not None:
                t = {k: layout(v) if v is not None else None for k, v in t.items()}
            args = cell_args(cell, t)
            return Sample(name, args, present(CELL_GRAD, args))

        return [
            make("basic"),
            make("no bias", bias="none", seed=1),
            make("b_ih only", bias="ih", seed=2),
            make("no rows", N=0),
            make("one row", N=1, seed=3),
            make("transposed", layout=transposed, seed=4),
            make("expanded state", seed=5, layout=lambda v: expanded(v) if v.dim() == 2 and v.shape[1] == 3 else v),
        ]

    return samples


def cell_reference(cell):
    def reference(a):
        return R.recurrent_cell(a["x"], a["h"], a.get("c"), a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], cell)

    return reference


def cell_saved(a):
    return sum(a[k].untyped_storage().nbytes() for k in ("x", "h", "c") if a.get(k) is not None)


def cell_bad(cell):
    G = GATES[cell]
    bad = [
        Bad("x rank", lambda a: dict(x=like(a["x"], 2, 4, 5)), ValueError, "x", "3-D"),
        Bad("x features", lambda a: dict(x=like(a["x"], 4, 6)), ValueError, "x", "[4, 6]"),
        Bad("h rows", lambda a: dict(h=like(a["x"], 3, 3)), ValueError, "h", "[3, 3]"),
        Bad("h hidden", lambda a: dict(h=like(a["x"], 4, 2)), ValueError, "h", "[4, 2]"),
        Bad("w_hh rows", lambda a: dict(w_hh=like(a["x"], G * 3 + 1, 3)), ValueError, "w_hh", f"[{G * 3 + 1}, 3]"),
        Bad("w_ih rows", lambda a: dict(w_ih=like(a["x"], G * 3 + 1, 5)), ValueError, "w_ih", f"[{G * 3 + 1}, 5]"),
        Bad("b_hh size", lambda a: dict(b_hh=like(a["x"], 2)), ValueError, "b_hh", "[2]"),
        Bad("x dtype", lambda a: dict(x=a["x"].double()), TypeError, "w_hh", "Float"),
        Bad("b_ih dtype", lambda a: dict(b_ih=a["b_ih"].double()), TypeError, "b_ih", "Double"),
        Bad("x float16 on the CPU", lambda a: dict(x=a["x"].half()), TypeError, "x", "Half", cpu_only=True),
    ]
    if cell == "lstm":
        bad.append(Bad("c hidden", lambda a: dict(c=like(a["x"], 4, 2)), ValueError, "c", "[4, 2]"))
    return bad


def cell_backward_samples(device, dtype):
    out = []
    for cell in ("gru", "lstm"):
        t = recurrent_tensors(cell, torch.Generator().manual_seed(11), dtype, device, 4, 5, 3)
        g = torch.Generator().manual_seed(12)
        grad_h = rnd(g, 4, 3, dtype=dtype, device=device)
        grad_c = rnd(g, 4, 3, dtype=dtype, device=device) if cell == "lstm" else None
        for name, mask in (("all", [True] * 7), ("some", [False, True, cell == "lstm", False, True, False, True])):
            out.append(Sample(f"{cell}, {name}" if (cell, name) != ("gru", "all") else "basic",
                              dict(grad_h=grad_h, grad_c=grad_c, x=t["x"], h=t["h"], c=t["c"], w_ih=t["w_ih"],
                                   w_hh=t["w_hh"], b_ih=t["b_ih"], b_hh=None if name == "some" else t["b_hh"],
                                   cell=cell, output_mask=mask)))
    return out


CELL_BACKWARD_BAD = [
    Bad("unknown cell", lambda a: dict(cell="lstmx"), ValueError, "cell", "one of 'rnn', 'gru', 'lstm', got 'lstmx'"),
    Bad("grad_c for gru", lambda a: dict(grad_c=like(a["x"], 4, 3)), ValueError, "grad_c", "None for cell 'gru'"),
    Bad("c for gru", lambda a: dict(c=like(a["x"], 4, 3)), ValueError, "c", "None for cell 'gru'"),
    Bad("lstm without c", lambda a: dict(cell="lstm", w_ih=like(a["x"], 12, 5), w_hh=like(a["x"], 12, 3),
                                         b_ih=None, b_hh=None), ValueError, "c", "a tensor [N, H] for cell 'lstm'"),
    Bad("grad_h shape", lambda a: dict(grad_h=like(a["x"], 4, 2)), ValueError, "grad_h", "[4, 2]"),
]

SCAN_GRAD = ("xs", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")


def scan_samples(device, dtype):
    def make(name, cell="gru", L=5, N=4, n_in=5, H=3, bias="both", layout=None, seed=0):
        t = recurrent_tensors(cell, torch.Generator().manual_seed(seed), dtype, device, N, n_in, H, L=L, bias=bias)
        if layout is not None:
            t = layout(t)
        args = dict(xs=t["x"], h0=t["h"], c0=t["c"], w_ih=t["w_ih"], w_hh=t["w_hh"], b_ih=t["b_ih"], b_hh=t["b_hh"],
                    cell=cell)
        return Sample(name, args, present(SCAN_GRAD, args))

    def strides(t):
        return {k: (transposed(v) if v is not None and k != "x" else v) for k, v in t.items()} | {
            "x": t["x"].transpose(0, 1).contiguous().transpose(0, 1)}

    def expand_state(t):
        return t | {"h": expanded(t["h"])}

    return [
        make("basic"),
        make("rnn, no bias", cell="rnn", bias="none", seed=1),
        make("lstm, b_ih only", cell="lstm", bias="ih", seed=2),
        make("lstm", cell="lstm", L=3, seed=3),
        make("no steps", L=0),
        make("no rows", cell="lstm", N=0),
        make("one step, one row", L=1, N=1, seed=4),
        make("non-contiguous", cell="lstm", layout=strides, seed=5),
        make("expanded h0", layout=expand_state, seed=6),
    ]


def scan_reference(a):
    return R.recurrent_scan(a["xs"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], cell=a["cell"], c0=a["c0"])


def scan_saved(a):
    L, N, _ = a["xs"].shape
    H = a["w_hh"].shape[1]
    states = sum(a[k].untyped_storage().nbytes() for k in ("h0", "c0") if a[k] is not None)
    return a["xs"].untyped_storage().nbytes() + L * N * H * a["xs"].element_size() + states


SCAN_BAD = [
    Bad("unknown cell", lambda a: dict(cell="lstmx"), ValueError, "cell", "'rnn', 'gru', 'lstm'"),
    Bad("xs rank", lambda a: dict(xs=like(a["xs"], 4, 5)), ValueError, "xs", "3-D"),
    Bad("xs features", lambda a: dict(xs=like(a["xs"], 5, 4, 6)), ValueError, "xs", "[5, 4, 6]"),
    Bad("h0 rows", lambda a: dict(h0=like(a["xs"], 5, 3)), ValueError, "h0", "[5, 3]"),
    Bad("h0 hidden", lambda a: dict(h0=like(a["xs"], 4, 2)), ValueError, "h0", "[4, 2]"),
    Bad("h0 rank", lambda a: dict(h0=like(a["xs"], 4)), ValueError, "h0", "1-D"),
    Bad("w_hh not G·H rows", lambda a: dict(w_hh=like(a["xs"], 4, 3)), ValueError, "w_hh", "[4, 3]"),
    Bad("w_ih rows", lambda a: dict(w_ih=like(a["xs"], 4, 5)), ValueError, "w_ih", "[4, 5]"),
    Bad("b_ih size", lambda a: dict(b_ih=like(a["xs"], 5)), ValueError, "b_ih", "[5]"),
    Bad("b_hh rank", lambda a: dict(b_hh=like(a["xs"], 9, 1)), ValueError, "b_hh", "2-D"),
    Bad("c0 for gru", lambda a: dict(c0=like(a["xs"], 4, 3)), ValueError, "c0", "a tensor"),
    Bad("c0 missing for lstm", lambda a: dict(cell="lstm", w_ih=like(a["xs"], 12, 5), w_hh=like(a["xs"], 12, 3),
                                              b_ih=None, b_hh=None), ValueError, "c0", "None"),
    Bad("h0 dtype", lambda a: dict(h0=like(a["xs"], 4, 3, dtype=F64)), TypeError, "h0", "Double"),
    Bad("w_hh dtype", lambda a: dict(w_hh=like(a["xs"], 9, 3, dtype=torch.bfloat16)), TypeError, "w_hh", "BFloat16"),
    Bad("integer xs", lambda a: dict(xs=ones_like_dev(a["xs"], 5, 4, 5, dtype=torch.int64)), TypeError, "xs", "Long"),
    Bad("xs float16 on the CPU", lambda a: dict(xs=a["xs"].half()), TypeError, "xs", "Half", cpu_only=True),
]


def scan_backward_samples(device, dtype):
    out = []
    for cell, bias in (("gru", "ih"), ("lstm", "both")):
        t = recurrent_tensors(cell, torch.Generator().manual_seed(13), dtype, device, 4, 5, 3, L=3, bias=bias)
        g = torch.Generator().manual_seed(14)
        hs = rnd(g, 3, 4, 3, dtype=dtype, device=device)
        grad_hs = rnd(g, 3, 4, 3, dtype=dtype, device=device)
        grad_hs[:, 1] = 0  # a row without gradient: the sparse-row path
        for name, mask in (("all", [True] * 7), ("some", [False, True, False, True, False, False, True])):
            out.append(Sample("basic" if (cell, name) == ("gru", "all") else f"{cell}, {name}",
                              dict(grad_hs=grad_hs, xs=t["x"], hs=hs, h0=t["h"], c0=t["c"], w_ih=t["w_ih"],
                                   w_hh=t["w_hh"], b_ih=t["b_ih"], b_hh=t["b_hh"], cell=cell, output_mask=mask)))
    return out


SCAN_BACKWARD_BAD = [
    Bad("grad_hs shape", lambda a: dict(grad_hs=like(a["xs"], 3, 4, 2)), ValueError, "grad_hs",
        "expected shape [3, 4, 3]"),
    Bad("hs shape", lambda a: dict(hs=like(a["xs"], 2, 4, 3)), ValueError, "hs", "expected shape [3, 4, 3]"),
    Bad("unknown cell", lambda a: dict(cell="lstmx"), ValueError, "cell", "'rnn', 'gru', 'lstm'"),
]


# --- bottleneck adapters: bottleneck_adapter ----------------------------------------------------

BOTTLENECK_GRAD = ("z", "residual", "w_down", "b_down", "w_up", "b_up")
ADAPTER_ACTIVATIONS = tuple(R.ADAPTER_ACTIVATIONS)


def bottleneck_samples(device, dtype):
    def make(name, lead=(3, 4), d=8, m=3, act="gelu", p=0.0, bias=True, residual=True, layout=None, res_layout=None,
             big=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        z = rnd(g, *lead, d, dtype=dtype, device=device)
        res = rnd(g, *lead, d, dtype=dtype, device=device)
        args = dict(z=layout(z) if layout else z,
                    residual=(res_layout(res) if res_layout else res) if residual else None,
                    w_down=rnd(g, m, d, dtype=dtype, device=device),
                    b_down=rnd(g, m, dtype=dtype, device=device) if bias else None,
                    w_up=rnd(g, d, m, dtype=dtype, device=device),
                    b_up=rnd(g, d, dtype=dtype, device=device) if bias else None,
                    scale=0.6, activation=act, dropout_p=p, seed=torch.tensor(21 + seed, device=device) if p else None)
        return Sample(name, args, present(BOTTLENECK_GRAD, args), big)

    return [
        make("basic", p=0.2),
        make("no dropout, no biases", bias=False),
        make("residual None", residual=False, p=0.2, seed=1),
        make("other shape", lead=(5, 2), p=0.2, seed=2),
        make("empty batch", lead=(0,), p=0.2),
        make("empty middle dim", lead=(3, 0)),
        make("one row", lead=(1,), p=0.2),
        make("1-D z", lead=()),
        make("m=1", m=1, p=0.2),
        make("m > d", d=5, m=9),
        make("transposed z, strided residual", layout=transposed, res_layout=strided, p=0.5),
        make("strided rows", layout=strided_rows, res_layout=strided_rows, p=0.5),
        make("expanded z and residual", layout=expanded, res_layout=expanded, p=0.5),
        *[make(f"activation {act}", act=act, p=0.1, seed=3 + i) for i, act in enumerate(ADAPTER_ACTIVATIONS)],
        make("many rows (several blocks per thread)", lead=(4, 700), d=300, m=24, p=0.2, big=True),
    ]


def bottleneck_reference(a):
    return R.bottleneck_adapter(a["z"], a["residual"], a["w_down"], a["b_down"], a["w_up"], a["b_up"], a["scale"],
                                a["activation"], a["dropout_p"], seed_of(a))


def bottleneck_saved(a):
    """z (an input, kept anyway where something else keeps it) and p [..., m]: nothing else of z's size."""
    return a["z"].untyped_storage().nbytes() + a["z"][..., :1].numel() * a["w_down"].shape[0] * a["z"].element_size()


BOTTLENECK_BAD = [
    Bad("z last dim", lambda a: dict(z=like(a["z"], 3, 4, 7)), ValueError, "z", "[3, 4, 7]"),
    Bad("z 0-D", lambda a: dict(z=like(a["z"])), ValueError, "z", "0-D"),
    Bad("z int", lambda a: dict(z=ones_like_dev(a["z"], 3, 4, 8, dtype=torch.int64)), TypeError, "z", "Long"),
    Bad("z float16 on the CPU", lambda a: dict(z=a["z"].half()), TypeError, "z", "Half", cpu_only=True),
    Bad("residual broadcast", lambda a: dict(residual=like(a["z"], 4, 8)), ValueError, "residual", "[4, 8]"),
    Bad("residual dtype", lambda a: dict(residual=like(a["z"], 3, 4, 8, dtype=F64)), TypeError, "residual", "Double"),
    Bad("w_down 1-D", lambda a: dict(w_down=like(a["z"], 8)), ValueError, "w_down", "1-D"),
    Bad("w_down m = 0", lambda a: dict(w_down=like(a["z"], 0, 8), w_up=like(a["z"], 8, 0), b_down=None), ValueError,
        "w_down", "both >= 1"),
    Bad("w_up d", lambda a: dict(w_up=like(a["z"], 7, 3)), ValueError, "w_up", "[7, 3]"),
    Bad("w_up m", lambda a: dict(w_up=like(a["z"], 8, 4)), ValueError, "w_up", "m, from w_down"),
    Bad("w_up dtype", lambda a: dict(w_up=like(a["z"], 8, 3, dtype=F64)), TypeError, "w_up", "Double"),
    Bad("b_down size", lambda a: dict(b_down=like(a["z"], 4)), ValueError, "b_down", "[4]"),
    Bad("b_up 2-D", lambda a: dict(b_up=like(a["z"], 1, 8)), ValueError, "b_up", "2-D"),
    Bad("b_up dtype", lambda a: dict(b_up=like(a["z"], 8, dtype=F64)), TypeError, "b_up", "Double"),
    Bad("fp32 weights with fp64 z", lambda a: dict(z=a["z"].double(), residual=a["residual"].double()), TypeError,
        "w_down", "Float"),
    Bad("unknown activation", lambda a: dict(activation="swish"), ValueError, "activation", "'relu', 'silu', 'gelu'"),
    # dropout_p, seed and scale as lora_linear's (the same arguments, the same checks)
    *[bad for bad in LORA_BAD if bad.arg in ("dropout_p", "seed", "scale")],
]


def bottleneck_backward_samples(device, dtype):
    g = torch.Generator().manual_seed(5)
    lead, d, m = (3, 4), 8, 3
    base = dict(z=rnd(g, *lead, d, dtype=dtype, device=device), p=rnd(g, *lead, m, dtype=dtype, device=device),
                w_down=rnd(g, m, d, dtype=dtype, device=device), w_up=rnd(g, d, m, dtype=dtype, device=device))
    grad_out, grad_p = rnd(g, *lead, d, dtype=dtype, device=device), rnd(g, *lead, m, dtype=dtype, device=device)

    def make(name, mask, with_grad_p=False, p=0.25, act="gelu"):
        args = dict(grad_out=grad_out, grad_p=grad_p if with_grad_p else None, **base, scale=1.5, activation=act,
                    dropout_p=p, seed=torch.tensor(5, device=device) if p else None, output_mask=mask)
        return Sample(name, args)

    return [
        make("basic", [True] * 5),
        make("weights only, grad_p", [False, True, True, True, True], with_grad_p=True),
        make("w_up only", [False, False, False, True, False]),
        make("z only, no dropout, silu", [True, False, False, False, False], p=0.0, act="silu"),
        make("biases only, leaky_relu", [False, False, True, False, True], act="leaky_relu"),
    ]


BOTTLENECK_BACKWARD_BAD = [
    Bad("grad_out shape", lambda a: dict(grad_out=like(a["z"], 3, 4, 5)), ValueError, "grad_out", "[3, 4, 5]"),
    Bad("grad_out dtype", lambda a: dict(grad_out=like(a["z"], 3, 4, 8, dtype=F64)), TypeError, "grad_out", "Double"),
    Bad("p shape", lambda a: dict(p=like(a["z"], 3, 4, 2)), ValueError, "p", "[3, 4, 2]"),
    Bad("grad_p shape", lambda a: dict(grad_p=like(a["z"], 3, 4, 2)), ValueError, "grad_p", "[3, 4, 2]"),
    Bad("w_up m", lambda a: dict(w_up=like(a["z"], 8, 4)), ValueError, "w_up", "m, from w_down"),
    Bad("unknown activation", lambda a: dict(activation="swish"), ValueError, "activation", "'identity'"),
]


# --- AdapterFusion: adapter_fusion -------------------------------------------------------------

FUSION_GRAD = ("z", "query", "residual", "w_down", "b_down", "w_up", "b_up", "w_query", "b_query", "w_key", "b_key",
               "w_value")
FUSION_PARAMS = ("w_down", "b_down", "w_up", "b_up", "w_query", "b_query", "w_key", "b_key", "w_value", "seed")


def fusion_samples(device, dtype):
    def make(name, lead=(3, 4), n=3, m=4, d=6, act="gelu", p=0.0, temperature=1.0, residual=True, value=True,
             biases=True, query_is_z=False, layout=None, big=False, seed=0):
        g = torch.Generator().manual_seed(seed)

        def r(*shape):
            return rnd(g, *shape, dtype=dtype, device=device, scale=0.5)

        z = r(*lead, d)
        z = layout(z) if layout else z
        args = dict(z=z, query=z if query_is_z else r(*lead, d), residual=r(*lead, d) if residual else None,
                    w_down=r(n, m, d), b_down=r(n, m), w_up=r(n, d, m), b_up=r(n, d),
                    scales=[0.5 + 0.25 * i for i in range(n)], activation=act,
                    w_query=r(d, d), b_query=r(d) if biases else None, w_key=r(d, d), b_key=r(d) if biases else None,
                    w_value=r(d, d) if value else None, temperature=temperature, dropout_p=p,
                    seed=torch.tensor(5 + seed, device=device) if p else None)
        grad = tuple(k for k in present(FUSION_GRAD, args) if not (query_is_z and k == "query"))
        return Sample(name, args, grad, big)

    return [
        make("basic", p=0.3),                                   # 12 rows < N(m+1) = 15: scores via (q W_k) U
        make("rows >= N(m+1)", lead=(5, 4), n=2, m=3, d=4, act="silu", seed=1),   # scores via q (W_k U)
        make("no biases, no residual", act="relu", biases=False, residual=False, p=0.3, seed=2),
        make("value None", act="tanh", value=False, seed=3),
        make("query is z", act="sigmoid", query_is_z=True, p=0.3, seed=4),
        make("N=1", n=1, act="leaky_relu", p=0.3, seed=5),
        make("m=1, temperature 3", m=1, act="gelu_tanh", temperature=3.0, seed=6),
        make("one row", lead=(1,), p=0.3, seed=7),
        make("1-D z", lead=(), act="identity", seed=8),
        make("empty batch", lead=(0,), p=0.3),
        make("empty middle dim", lead=(3, 0)),
        make("transposed z", layout=transposed, p=0.5, seed=9),
        make("strided rows", layout=strided_rows, act="relu", seed=10),
        make("expanded z", layout=expanded, p=0.5, seed=11),
        make("many rows", lead=(8, 64), n=3, m=24, d=48, p=0.1, big=True),
    ]


def fusion_reference(a):
    return R.adapter_fusion(a["z"], a["query"], a["residual"], a["w_down"], a["b_down"], a["w_up"], a["b_up"],
                            a["scales"], a["activation"], a["w_query"], a["b_query"], a["w_key"], a["b_key"],
                            a["w_value"], a["temperature"], a["dropout_p"], seed_of(a))


def fusion_saved(a):
    """z and query (once when they share storage), the bottleneck
    pre-activations [rows, N, m] and the probabilities [rows, N]: nothing of
    size N·d per row."""
    z, query = a["z"], a["query"]
    inputs = z.untyped_storage().nbytes()
    if query.untyped_storage().data_ptr() != z.untyped_storage().data_ptr():
        inputs += query.untyped_storage().nbytes()
    n, m = a["w_down"].shape[:2]
    return inputs + z[..., :1].numel() * n * (m + 1) * z.element_size()


FUSION_BAD = [
    Bad("z 0-D", lambda a: dict(z=like(a["z"])), ValueError, "z", "0-D"),
    Bad("z int", lambda a: dict(z=ones_like_dev(a["z"], 3, 4, 6, dtype=torch.int64)), TypeError, "z", "Long"),
    Bad("z float16 on the CPU", lambda a: dict(z=a["z"].half()), TypeError, "z", "Half", cpu_only=True),
    Bad("query shape", lambda a: dict(query=like(a["z"], 3, 4, 5)), ValueError, "query", "[3, 4, 5]"),
    Bad("query dtype", lambda a: dict(query=like(a["z"], 3, 4, 6, dtype=F64)), TypeError, "query", "Double"),
    Bad("residual shape", lambda a: dict(residual=like(a["z"], 3, 5, 6)), ValueError, "residual", "[3, 5, 6]"),
    Bad("w_down 2-D", lambda a: dict(w_down=like(a["z"], 4, 6)), ValueError, "w_down", "2-D"),
    Bad("w_down width", lambda a: dict(w_down=like(a["z"], 3, 4, 5)), ValueError, "w_down", "size 6 in dim 2"),
    Bad("no adapters", lambda a: dict(w_down=like(a["z"], 0, 4, 6)), ValueError, "w_down", "N >= 1"),
    Bad("b_down shape", lambda a: dict(b_down=like(a["z"], 3, 5)), ValueError, "b_down", "[3, 4]"),
    Bad("w_up shape", lambda a: dict(w_up=like(a["z"], 3, 4, 6)), ValueError, "w_up", "[3, 6, 4]"),
    Bad("w_up dtype", lambda a: dict(w_up=like(a["z"], 3, 6, 4, dtype=F64)), TypeError, "w_up", "Double"),
    Bad("b_up shape", lambda a: dict(b_up=like(a["z"], 2, 6)), ValueError, "b_up", "[3, 6]"),
    Bad("scales count", lambda a: dict(scales=[1.0, 1.0]), ValueError, "scales", "3 values"),
    Bad("scales nan", lambda a: dict(scales=[1.0, float("nan"), 1.0]), ValueError, "scales", "finite"),
    Bad("unknown activation", lambda a: dict(activation="swish"), ValueError, "activation", "'swish'"),
    Bad("w_query shape", lambda a: dict(w_query=like(a["z"], 6, 5)), ValueError, "w_query", "[6, 6]"),
    Bad("b_query shape", lambda a: dict(b_query=like(a["z"], 5)), ValueError, "b_query", "[6]"),
    Bad("w_key shape", lambda a: dict(w_key=like(a["z"], 5, 6)), ValueError, "w_key", "[6, 6]"),
    Bad("b_key shape", lambda a: dict(b_key=like(a["z"], 1, 6)), ValueError, "b_key", "[6]"),
    Bad("w_value shape", lambda a: dict(w_value=like(a["z"], 6)), ValueError, "w_value", "[6, 6]"),
    Bad("w_value dtype", lambda a: dict(w_value=like(a["z"], 6, 6, dtype=F64)), TypeError, "w_value", "Double"),
    Bad("temperature 0", lambda a: dict(temperature=0.0), ValueError, "temperature", "> 0"),
    Bad("temperature inf", lambda a: dict(temperature=float("inf")), ValueError, "temperature", "inf"),
    Bad("p = 1", lambda a: dict(dropout_p=1.0), ValueError, "dropout_p", "[0, 1)"),
    Bad("seed missing", lambda a: dict(seed=None), ValueError, "seed", "None"),
    Bad("seed float", lambda a: dict(seed=torch.tensor(1.0)), TypeError, "seed", "Float"),
]


def fusion_backward_samples(device, dtype):
    f = fusion_samples(device, dtype)[0].args
    lead, (n, m), d = f["z"].shape[:-1], f["w_down"].shape[:2], f["z"].shape[-1]
    g = torch.Generator().manual_seed(21)
    grad_out = rnd(g, *lead, d, dtype=dtype, device=device)
    pre_act = rnd(g, *lead, n, m, dtype=dtype, device=device)
    probs = torch.softmax(rnd(g, *lead, n, dtype=F64), -1).to(dtype).to(device)
    grad_pre_act, grad_probs = rnd(g, *lead, n, m, dtype=dtype, device=device), rnd(g, *lead, n, dtype=dtype,
                                                                                     device=device)
    forward = {k: v for k, v in f.items() if k not in ("residual", "b_down")}

    def make(name, mask, aux=False, p=0.3):
        args = dict(grad_out=grad_out, grad_pre_act=grad_pre_act if aux else None,
                    grad_probs=grad_probs if aux else None, z=forward["z"], query=forward["query"], pre_act=pre_act,
                    probs=probs, **{k: v for k, v in forward.items() if k not in ("z", "query", "dropout_p", "seed")})
        args.update(dropout_p=p, seed=torch.tensor(5, device=device) if p else None, output_mask=mask)
        return Sample(name, args)

    return [
        make("basic", [True] * 12),
        make("auxiliary gradients", [True] * 12, aux=True),
        make("fusion weights only", [False] * 7 + [True] * 5),
        make("w_value only, no dropout", [False] * 11 + [True], p=0.0),
        make("inputs only", [True, True, True] + [False] * 9),
    ]


FUSION_BACKWARD_BAD = [
    Bad("grad_out shape", lambda a: dict(grad_out=like(a["z"], 3, 4, 5)), ValueError, "grad_out", "[3, 4, 6]"),
    Bad("pre_act shape", lambda a: dict(pre_act=like(a["z"], 3, 4, 3, 5)), ValueError, "pre_act", "[3, 4, 3, 4]"),
    Bad("probs shape", lambda a: dict(probs=like(a["z"], 3, 4, 2)), ValueError, "probs", "[3, 4, 3]"),
    Bad("grad_pre_act shape", lambda a: dict(grad_pre_act=like(a["z"], 3, 4, 4)), ValueError, "grad_pre_act",
        "[3, 4, 3, 4]"),
    Bad("grad_probs dtype", lambda a: dict(grad_probs=like(a["z"], 3, 4, 3, dtype=F64)), TypeError, "grad_probs",
        "Double"),
    Bad("w_up shape", lambda a: dict(w_up=like(a["z"], 3, 4, 6)), ValueError, "w_up", "[3, 6, 4]"),
]


# --- the table -----------------------------------------------------------------------------------

def backward_entry(name, samples, bad):
    """A backward op: every sample (one per output mask, mostly) checked in full."""
    return OpInfo(name, samples, bad=bad, core=None, double_backward=None, compile=())


def _ts_linear_ops():
    names = {"linear": "token_subset_linear", "lora": "token_subset_lora_linear", "vera": "token_subset_vera_linear"}
    out = []
    for method, name in names.items():
        out.append(OpInfo(name, ts_linear_samples(method), ts_linear_reference(method), first, ts_linear_bad(method),
                          tokens=("x",), saved=ts_linear_saved(method),
                          params=("weight", "bias", "lora_a", "lora_b", "vera_a", "vera_b", "lambda_d", "lambda_b",
                                  "seed", "positions"),
                          core=("basic", "no bias, no dropout"), compile=("basic", "B=3, k=T"),
                          inductor=method == "lora"))
        out.append(backward_entry(name + "_backward", ts_linear_backward_samples(method),
                                  ts_linear_backward_bad(method)))
    return out


def lora_saved(a):
    """x (shared with the frozen product) and u = drop(x) Aᵀ: no mask, no dropped copy of x."""
    return a["x"].untyped_storage().nbytes() + a["x"][..., :1].numel() * a["lora_a"].shape[0] * a["x"].element_size()


def vera_saved(a):
    """u = drop(x) A_sᵀ only: nothing of x's or y's size (the base weight is frozen)."""
    return a["x"][..., :1].numel() * a["vera_a"].shape[0] * a["x"].element_size()


def mixed_entry(name, samples, reference, bad):
    return OpInfo(name, samples, reference, bad=bad, double_backward=None,
                  inference_only=f"pypeft.{name}: mixed-adapter batches are for inference",
                  core=("basic", "empty batch", "base rows only"))


OPS = [
    OpInfo("lora_linear", lora_samples, lora_reference, first, LORA_BAD, saved=SavedSpec(LORA_GRAD, lora_saved),
           params=("weight", "bias", "lora_a", "lora_b", "seed"), core=("basic", "no dropout, no bias"),
           compile=("basic", "other shape"), inductor=True),
    backward_entry("lora_linear_backward", lora_backward_samples, LORA_BACKWARD_BAD),
    OpInfo("vera_linear", vera_samples, vera_reference, first, VERA_BAD,
           saved=SavedSpec(("x", "lambda_d", "lambda_b"), vera_saved),
           params=("weight", "bias", "vera_a", "vera_b", "lambda_d", "lambda_b", "seed"),
           core=("basic", "no dropout, no bias"), compile=("basic", "other shape")),
    backward_entry("vera_linear_backward", vera_backward_samples, VERA_BACKWARD_BAD),
    OpInfo("counter_dropout", counter_dropout_samples, counter_dropout_reference, bad=COUNTER_DROPOUT_BAD,
           double_backward="works", saved=SavedSpec(("x",), lambda a: 0), params=("seed", "row_ids"),
           core=("basic", "row ids of gathered rows"), compile=("basic", "other shape")),
    mixed_entry("lora_linear_mixed", lora_mixed_samples, lora_mixed_reference, LORA_MIXED_BAD),
    mixed_entry("vera_linear_mixed", vera_mixed_samples, vera_mixed_reference, VERA_MIXED_BAD),
    *_ts_linear_ops(),
    OpInfo("token_subset_layer_norm", norm_samples("layer"), norm_reference("layer"), first, norm_bad("layer"),
           tokens=("x",), saved=SavedSpec(("x", "weight", "bias"), rows_bytes), params=("weight", "bias", "positions"),
           core=("basic", "no affine"), compile=("basic", "other shape"), inductor=True),
    backward_entry("token_subset_layer_norm_backward", norm_backward_samples("layer"), NORM_BACKWARD_BAD),
    OpInfo("token_subset_rms_norm", norm_samples("rms"), norm_reference("rms"), first, norm_bad("rms"),
           tokens=("x",), saved=SavedSpec(("x", "weight"), rows_bytes), params=("weight", "positions"),
           core=("basic", "no affine"), compile=("basic", "other shape")),
    backward_entry("token_subset_rms_norm_backward", norm_backward_samples("rms"), NORM_BACKWARD_BAD[:3]),
    OpInfo("token_subset_activation", activation_samples(False), activation_reference(False), first, ACTIVATION_BAD,
           tokens=("x",), saved=SavedSpec(("x",), rows_bytes), params=("positions",), core=("basic", "relu"),
           inductor=True),
    backward_entry("token_subset_activation_backward", activation_backward_samples(False),
                   activation_backward_bad(False)),
    OpInfo("token_subset_gated_activation", activation_samples(True), activation_reference(True), first, GATED_BAD,
           tokens=("gate", "up"), saved=SavedSpec(("gate", "up"), lambda a: rows_bytes(a, "gate") + rows_bytes(a, "up")),
           params=("positions",)),
    backward_entry("token_subset_gated_activation_backward", activation_backward_samples(True),
                   activation_backward_bad(True)),
    OpInfo("token_subset_dropout", ts_dropout_samples, ts_dropout_reference, bad=TS_DROPOUT_BAD, tokens=("x",),
           saved=SavedSpec(("x",), lambda a: 0), params=("seed", "positions"), core=("basic", "p=0: a copy"),
           compile=("basic", "other shape"), inductor=True),
    backward_entry("token_subset_dropout_backward", ts_dropout_backward_samples, TS_DROPOUT_BACKWARD_BAD),
    OpInfo("token_subset_attention", attention_samples, attention_reference, first, ATTENTION_BAD, tokens=("query",),
           token_dim=2, saved=SavedSpec(("query", "key", "value"), attention_saved),
           params=("attn_mask", "seed", "positions"),
           core=("basic", "mha, k=T, bool padding mask", "mqa, causal", "dropout, additive mask"),
           compile=("basic", "other shape"), inductor=True),
    backward_entry("token_subset_attention_backward", attention_backward_samples, ATTENTION_BACKWARD_BAD),
    *[OpInfo(f"{cell}_cell", cell_samples(cell), cell_reference(cell), bad=cell_bad(cell),
             saved=SavedSpec(CELL_GRAD, cell_saved), params=("w_ih", "w_hh", "b_ih", "b_hh"),
             compile=("basic", "one row")) for cell in GATES],
    backward_entry("recurrent_cell_backward", cell_backward_samples, CELL_BACKWARD_BAD),
    OpInfo("recurrent_scan", scan_samples, scan_reference, bad=SCAN_BAD, saved=SavedSpec(SCAN_GRAD, scan_saved),
           params=("w_ih", "w_hh", "b_ih", "b_hh"), core=("basic", "rnn, no bias", "lstm"),
           compile=("basic", "one step, one row", "lstm")),
    backward_entry("recurrent_scan_backward", scan_backward_samples, SCAN_BACKWARD_BAD),
    OpInfo("bottleneck_adapter", bottleneck_samples, bottleneck_reference, first, BOTTLENECK_BAD,
           saved=SavedSpec(BOTTLENECK_GRAD, bottleneck_saved), params=("w_down", "b_down", "w_up", "b_up", "seed"),
           core=("basic", "no dropout, no biases", "residual None"), compile=("basic", "other shape"), inductor=True,
           passthrough=("residual",)),
    backward_entry("bottleneck_adapter_backward", bottleneck_backward_samples, BOTTLENECK_BACKWARD_BAD),
    OpInfo("adapter_fusion", fusion_samples, fusion_reference, bad=FUSION_BAD,
           saved=SavedSpec(FUSION_GRAD, fusion_saved), params=FUSION_PARAMS,
           core=("basic", "rows >= N(m+1)", "query is z"), compile=("basic", "rows >= N(m+1)"), inductor=True),
    backward_entry("adapter_fusion_backward", fusion_backward_samples, FUSION_BACKWARD_BAD),
]

BY_NAME = {info.name: info for info in OPS}

# The NF4 entries live in their own module (it imports this one's vocabulary),
# as do the NF4-base samples and bad inputs of the adapter ops above.
from op_table_nf4 import nf4_ops, with_nf4_base  # noqa: E402

OPS = with_nf4_base(OPS) + nf4_ops()
BY_NAME = {info.name: info for info in OPS}
