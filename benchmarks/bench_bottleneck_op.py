"""Fused bottleneck adapter (pypeft.ops.bottleneck_adapter) against the eager
composition of the `adapters` library's Adapter block:
Linear(d, m) → activation → Linear(m, d) → · scale → Dropout → + residual.

Prints one JSON object: forward+backward medians (the two alternated in one
process), the median of the per-round time ratios, and the bytes each saves
for backward (parameters excluded).

    python benchmarks/bench_bottleneck_op.py                        # CPU, fp32, N = 8·256, d = 384, m = 24
    python benchmarks/bench_bottleneck_op.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, add_device_options, alternate_samples, machine_description, paired_ratio,  # noqa: E402
                    saved_activation_bytes)

from pypeft.ops import bottleneck_adapter  # noqa: E402

NN_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(p)
    p.add_argument("--tokens", type=int, default=8 * 256, help="N, rows of z (batch · sequence)")
    p.add_argument("--d", type=int, default=384, help="hidden size")
    p.add_argument("--m", type=int, default=24, help="bottleneck width (reduction factor 16 of d = 384)")
    p.add_argument("--activation", default="relu", choices=list(NN_ACTIVATIONS))
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=30)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    down = nn.Linear(args.d, args.m).to(device, dtype)
    act = NN_ACTIVATIONS[args.activation]()
    up = nn.Linear(args.m, args.d).to(device, dtype)
    nn.init.normal_(up.weight, std=0.02)  # a trained-looking adapter; adapters' zero init would be a special case
    drop = nn.Dropout(args.dropout)
    scale = 1.0

    def eager(z, residual):
        return drop(up(act(down(z))) * scale) + residual

    def fused(z, residual):
        # A fresh seed per call, drawn as a module would draw it.
        seed = torch.randint(-(2**63), 2**63 - 1, (), device=device) if args.dropout > 0 else None
        return bottleneck_adapter(z, residual, down.weight, down.bias, up.weight, up.bias, scale, args.activation,
                                  args.dropout, seed)

    z = torch.randn(args.tokens, args.d, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn(args.tokens, args.d, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(args.tokens, args.d, device=device, dtype=dtype)
    forwards = {"pypeft": lambda: fused(z, residual), "eager_adapters_composition": lambda: eager(z, residual)}

    def step(forward):
        def run():
            forward().backward(grad_out)
        return run

    samples = alternate_samples({name: step(f) for name, f in forwards.items()}, device, args.rounds)
    params = [*down.parameters(), *up.parameters()]
    saved = {name: saved_activation_bytes(f, params) for name, f in forwards.items()}
    medians = {name: statistics.median(s) for name, s in samples.items()}
    z_bytes = z.numel() * z.element_size()

    report = {
        "benchmark": "bottleneck_adapter",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "config": {"device": args.device, "dtype": args.dtype, "tokens": args.tokens, "d": args.d, "m": args.m,
                   "activation": args.activation, "dropout": args.dropout, "rounds": args.rounds},
        "median_ms_forward_backward": {k: round(v * 1e3, 3) for k, v in medians.items()},
        "ratio_pypeft_vs_eager": round(paired_ratio(samples, "pypeft", "eager_adapters_composition"), 3),
        "saved_bytes": saved,
        "saved_ratio_pypeft_vs_eager": round(saved["pypeft"] / saved["eager_adapters_composition"], 3),
        # What the op is meant to keep: z (an input, often kept anyway) and p [N, m].
        "saved_bytes_z_plus_p": z_bytes + args.tokens * args.m * z.element_size(),
    }
    assert math.isfinite(medians["pypeft"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
