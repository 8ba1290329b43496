"""Fused LoRA linear (pypeft.ops.lora_linear) against the eager composition PEFT
uses, base(x) + B(A(dropout(x))) · s, and against the frozen linear alone.

Prints one JSON object: forward+backward medians and ratios (candidates
alternated in one process), saved-for-backward bytes, and the issue's targets.

    python benchmarks/bench_lora_linear.py                       # CPU, fp32, in=out=1024
    python benchmarks/bench_lora_linear.py --device cuda --dtype bfloat16 --features 4096
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, add_device_options, alternate_timings, machine_description,  # noqa: E402
                    saved_activation_bytes)

import pypeft  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(p)
    p.add_argument("--features", type=int, default=1024, help="in = out features")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=15)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    base = nn.Linear(args.features, args.features).to(device, dtype).requires_grad_(False)
    ours = pypeft.LoraLinear(base, r=args.r, alpha=2 * args.r, dropout=args.dropout).to(device)
    ours_a, ours_b = ours.lora_A["default"], ours.lora_B["default"]
    nn.init.normal_(ours_b, std=0.02)  # a trained-looking adapter; zeros would be a special case

    # PEFT's eager composition, with the same (fp32-for-low-precision) adapter dtype PEFT uses.
    lora_a = nn.Linear(args.features, args.r, bias=False).to(device, ours_a.dtype)
    lora_b = nn.Linear(args.r, args.features, bias=False).to(device, ours_b.dtype)
    with torch.no_grad():
        lora_a.weight.copy_(ours_a)
        lora_b.weight.copy_(ours_b)
    drop = nn.Dropout(args.dropout)
    scale = ours.scaling["default"]

    def eager(x):
        result = base(x)
        xa = drop(x).to(lora_a.weight.dtype)  # PEFT casts the input to the adapter's dtype
        return result + (lora_b(lora_a(xa)) * scale).to(result.dtype)

    x = torch.randn(args.tokens, args.features, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.tokens, args.features, device=device, dtype=dtype)
    forwards = {"pypeft": lambda: ours(x), "eager_peft_composition": lambda: eager(x), "frozen_linear": lambda: base(x)}

    def step(forward):
        def run():
            forward().backward(grad_y)
        return run

    times = alternate_timings({name: step(f) for name, f in forwards.items()}, device, args.rounds)
    params = [p for m in (base, ours, lora_a, lora_b) for p in m.parameters()]
    saved = {name: saved_activation_bytes(f, params) for name, f in forwards.items()}

    flop_floor = 1 + args.r * 2 * args.features / (args.features * args.features)
    t = times
    report = {
        "benchmark": "lora_linear",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "config": {"device": args.device, "dtype": args.dtype, "in": args.features, "out": args.features,
                   "tokens": args.tokens, "r": args.r, "dropout": args.dropout, "rounds": args.rounds},
        "median_ms_forward_backward": {k: round(v * 1e3, 3) for k, v in t.items()},
        "ratios": {
            "pypeft_vs_eager": round(t["pypeft"] / t["eager_peft_composition"], 3),
            "pypeft_vs_frozen_linear": round(t["pypeft"] / t["frozen_linear"], 3),
            "eager_vs_frozen_linear": round(t["eager_peft_composition"] / t["frozen_linear"], 3),
            "flop_floor_vs_frozen_linear": round(flop_floor, 3),
        },
        "saved_bytes": saved,
        "saved_ratio_pypeft_vs_eager": round(saved["pypeft"] / saved["eager_peft_composition"], 3),
    }
    report["targets_met"] = {
        "time <= 0.9x eager": report["ratios"]["pypeft_vs_eager"] <= 0.9,
        "saved <= 0.8x eager": report["saved_ratio_pypeft_vs_eager"] <= 0.8,
        "time <= 1.10x frozen linear": report["ratios"]["pypeft_vs_frozen_linear"] <= 1.10,
    }
    assert math.isfinite(t["pypeft"])
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
