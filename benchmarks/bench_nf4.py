"""NF4 storage and the linear layer over it (pypeft.ops.nf4_linear) against the
plain linear layer and bitsandbytes' Linear4bit, forward + backward (grad x;
the weight is frozen), candidates alternated in one process.

Prints one JSON object: medians and ratios, saved-for-backward bytes, bits per
quantised weight (codes + absmax state, with and without double quantisation),
and the issue's targets.

    python benchmarks/bench_nf4.py                                   # CPU, fp32, in = out = 4096, 4096 tokens
    python benchmarks/bench_nf4.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DTYPES, add_device_options, alternate_timings, machine_description, saved_activation_bytes  # noqa: E402

import pypeft.ops as P  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(p)
    p.add_argument("--features", type=int, default=4096, help="in = out features")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--r", type=int, default=16, help="LoRA rank of the LoRA-over-NF4 candidate")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-bnb", action="store_true", help="leave bitsandbytes out")
    return p.parse_args(argv)


def bits_per_weight(numel: int, tensors) -> float:
    return 8 * sum(t.numel() * t.element_size() for t in tensors) / numel


def bnb_linear(base: nn.Linear, dtype, device):
    """bitsandbytes' Linear4bit (NF4, double quantisation) of base's weights, or None without bitsandbytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes as bnb
    except ImportError:
        return None
    layer = bnb.nn.Linear4bit(base.in_features, base.out_features, bias=base.bias is not None, compute_dtype=dtype,
                              compress_statistics=True, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(base.weight.detach().to(dtype).cpu().clone(), requires_grad=False,
                                     compress_statistics=True, quant_type="nf4")
    if base.bias is not None:
        layer.bias = nn.Parameter(base.bias.detach().to(dtype).cpu().clone(), requires_grad=False)
    return layer.to(device)


def main(argv=None):
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    torch.manual_seed(0)
    n = args.features
    base = nn.Linear(n, n).to(device, dtype).requires_grad_(False)
    codes, absmax = P.nf4_quantize(base.weight)
    nested_codes, nested_absmax, offset = P.nf4_double_quantize(absmax)
    weight = codes.view(n, n // 2)
    bias = base.bias

    def nf4(x):
        # As a double-quantised layer runs: the absmax is decoded every call.
        return P.nf4_linear(x, weight, P.nf4_double_dequantize(nested_codes, nested_absmax, offset), 64, bias)

    forwards = {"pypeft_nf4_linear": nf4, "plain_linear": base}
    lora_a = (torch.randn(args.r, n, device=device) / n ** 0.5).to(dtype)
    lora_b = (torch.randn(n, args.r, device=device) * 0.02).to(dtype)
    if "weight_absmax" in str(torch.ops.pypeft.lora_linear.default._schema):
        def nf4_lora(x):
            return P.lora_linear(x, weight, bias, lora_a, lora_b, 2.0, 0.0, None,
                                 weight_absmax=P.nf4_double_dequantize(nested_codes, nested_absmax, offset),
                                 weight_blocksize=64)
        forwards["pypeft_lora_over_nf4"] = nf4_lora
    theirs = None if args.no_bnb else bnb_linear(base, dtype, device)
    if theirs is not None:
        forwards["bitsandbytes_linear4bit"] = theirs

    x = torch.randn(args.tokens, n, device=device, dtype=dtype, requires_grad=True)
    grad_y = torch.randn(args.tokens, n, device=device, dtype=dtype)
    with torch.no_grad():
        y_ref = base(x)
        errors = {k: float((f(x) - y_ref).abs().max() / y_ref.abs().max()) for k, f in forwards.items()}

    def step(forward):
        def run():
            forward(x).backward(grad_y)
            x.grad = None
        return run

    times = alternate_timings({k: step(f) for k, f in forwards.items()}, device, args.rounds)
    params = [base.weight, base.bias, weight, nested_codes, nested_absmax, lora_a, lora_b]
    if theirs is not None:
        params += list(theirs.parameters())
    saved = {k: saved_activation_bytes(lambda f=f: f(x), params) for k, f in forwards.items()}
    t = times
    report = {
        "benchmark": "nf4",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "config": {"device": args.device, "dtype": args.dtype, "in": n, "out": n, "tokens": args.tokens,
                   "rounds": args.rounds, "lora_r": args.r, "blocksize": 64, "double_quant": True},
        "median_ms_forward_backward": {k: round(v * 1e3, 2) for k, v in t.items()},
        "ratios": {"nf4_linear_vs_plain": round(t["pypeft_nf4_linear"] / t["plain_linear"], 3)},
        "max_rel_error_vs_plain": {k: f"{v:.3g}" for k, v in errors.items()},
        "saved_bytes": saved,
        "bits_per_weight": {
            "double_quant": round(bits_per_weight(n * n, [codes, nested_codes, nested_absmax, offset]), 4),
            "absmax_float32": round(bits_per_weight(n * n, [codes, absmax]), 4),
        },
    }
    ratios = report["ratios"]
    if theirs is not None:
        ratios["nf4_linear_vs_bitsandbytes"] = round(t["pypeft_nf4_linear"] / t["bitsandbytes_linear4bit"], 3)
        ratios["bitsandbytes_vs_plain"] = round(t["bitsandbytes_linear4bit"] / t["plain_linear"], 3)
    if "pypeft_lora_over_nf4" in t:
        ratios["lora_over_nf4_vs_plain"] = round(t["pypeft_lora_over_nf4"] / t["plain_linear"], 3)
    targets = {"bits per weight <= 4.13 (double quant)": report["bits_per_weight"]["double_quant"] <= 4.13,
               "nf4_linear <= 1.15x plain": ratios["nf4_linear_vs_plain"] <= 1.15}
    if "nf4_linear_vs_bitsandbytes" in ratios:
        targets["nf4_linear <= 0.7x bitsandbytes"] = ratios["nf4_linear_vs_bitsandbytes"] <= 0.7
    if "lora_over_nf4_vs_plain" in ratios:
        targets["lora over nf4 <= 1.25x plain"] = ratios["lora_over_nf4_vs_plain"] <= 1.25
    report["targets_met"] = targets
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
