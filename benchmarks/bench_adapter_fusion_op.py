"""pypeft.ops.adapter_fusion against the eager composition the `adapters`
library runs (N bottleneck adapters as nn.Sequential, their up-projections
stacked, nn.Linear query / key / value, dropout on the scores, softmax; the
Dynamic fusion config: value applied before the softmax): forward + backward
time and the bytes saved for backward. AdapterFusion training: the adapters
are frozen, the fusion's query / key / value train, the gradient flows on to
the layer input (query is z, as the library passes it).

Prints one JSON object. The candidates alternate in one process; the time
ratio is the median of per-round ratios.

    python benchmarks/bench_adapter_fusion_op.py [--batch 8 --seq 256 --d 384 --m 24 --n 3 --rounds 15]
                                                 [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, add_device_options, alternate_samples, machine_description,  # noqa: E402
                    paired_ratio, saved_activation_bytes)

from pypeft.ops import adapter_fusion  # noqa: E402


class EagerFusion(nn.Module):
    """The library's computation in plain modules: materialises the N
    up-projections [B, T, N, d] and their keys and values."""

    def __init__(self, d, m, n, dropout, activation=nn.ReLU):
        super().__init__()
        self.adapters = nn.ModuleList(nn.Sequential(nn.Linear(d, m), activation(), nn.Linear(m, d)) for _ in range(n))
        self.scales = [1.0] * n
        self.query, self.key = nn.Linear(d, d), nn.Linear(d, d)
        self.value = nn.Linear(d, d, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, z, residual):
        up = torch.stack([s * a(z) for s, a in zip(self.scales, self.adapters)], dim=2)   # [B, T, N, d]
        q, k, v = self.query(z), self.key(up), self.value(up)
        scores = torch.matmul(q.unsqueeze(2), k.transpose(-2, -1)).squeeze(2)
        probs = torch.softmax(self.dropout(scores) / 1.0, dim=-1)
        return torch.matmul(probs.unsqueeze(2), v).squeeze(2) + residual

    def op_weights(self):
        down = [a[0] for a in self.adapters]
        up = [a[2] for a in self.adapters]
        with torch.no_grad():  # the adapters are frozen: stacked once, like the method stacks them
            stacked = dict(w_down=torch.stack([l.weight for l in down]), b_down=torch.stack([l.bias for l in down]),
                           w_up=torch.stack([l.weight for l in up]), b_up=torch.stack([l.bias for l in up]))
        return dict(**stacked, scales=self.scales, activation="relu", w_query=self.query.weight,
                    b_query=self.query.bias, w_key=self.key.weight, b_key=self.key.bias, w_value=self.value.weight)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--m", type=int, default=24, help="bottleneck width")
    p.add_argument("--n", type=int, default=3, help="adapters fused")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=15)
    add_device_options(p)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    torch.manual_seed(0)
    eager = EagerFusion(args.d, args.m, args.n, args.dropout).to(device=device, dtype=dtype).train()
    for a in eager.adapters:
        a.requires_grad_(False)
    weights = eager.op_weights()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(args.batch, args.seq, args.d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    residual = torch.randn(args.batch, args.seq, args.d, generator=g).to(device=device, dtype=dtype)
    grad_out = torch.randn(args.batch, args.seq, args.d, generator=g).to(device=device, dtype=dtype)
    seed = torch.zeros((), dtype=torch.int64)

    def ours_forward():
        seed.random_(0, 2**62)  # a fresh mask each step, as a training module draws it
        return adapter_fusion(z, z, residual, temperature=1.0, dropout_p=args.dropout, seed=seed, **weights)

    def step(forward):
        def run():
            forward().backward(grad_out)
            z.grad = None
            for t in eager.parameters():
                t.grad = None
        return run

    params = list(eager.parameters()) + [v for v in weights.values() if isinstance(v, torch.Tensor)]
    saved = {"pypeft": saved_activation_bytes(ours_forward, params),
             "eager": saved_activation_bytes(lambda: eager(z, residual), params)}
    samples = alternate_samples({"pypeft": step(ours_forward), "eager": step(lambda: eager(z, residual))}, device,
                                args.rounds)
    time_ratio = paired_ratio(samples, "pypeft", "eager")
    rows = args.batch * args.seq
    report = {
        "benchmark": "adapter_fusion_op",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__,
        "config": vars(args),
        "saved_mib": {k: round(v / 2**20, 2) for k, v in saved.items()},
        "saved_bound_mib (z + T·N·m + T·N elements)": round(
            (z.numel() + rows * args.n * (args.m + 1)) * z.element_size() / 2**20, 2),
        "median_ms_forward_backward": {k: round(sorted(v)[len(v) // 2] * 1e3, 2) for k, v in samples.items()},
        "ratios": {"saved_pypeft_vs_eager": round(saved["pypeft"] / saved["eager"], 3),
                   "time_pypeft_vs_eager": round(time_ratio, 3)},
    }
    r = report["ratios"]
    report["targets_met"] = {"saved <= 0.6x eager": r["saved_pypeft_vs_eager"] <= 0.6,
                             "step <= 0.9x eager": r["time_pypeft_vs_eager"] <= 0.9}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
