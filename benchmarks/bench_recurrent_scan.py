"""pypeft.ops.recurrent_scan (READ's RNN over a frozen backbone's layers)
against a Python loop of torch.nn cells with the same weights, and both against
the forward of a MiniLM-shaped backbone on the same tokens: READ's target is
to cost <= 5% on top of the backbone's forward.

Rows N = batch · seq (each token position is its own sequence), steps L = the
backbone's layer count, inputs xs [L, N, hidden]. Timed: the scan's forward
(no grad), forward + backward with a gradient on every row (dense), and with a
gradient on one row per sequence (a classifier reading one token: the sparse
backward). Also the bytes each saves for backward.

Prints one JSON object. Candidates alternate in one process; medians, ratios.

    python benchmarks/bench_recurrent_scan.py [--cell gru --hidden 128 --batch 8 --seq 256 --rounds 7]
                                              [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, add_device_options, alternate_timings, machine_description, minilm_shaped,  # noqa: E402
                    saved_activation_bytes)

from pypeft.ops import recurrent_scan  # noqa: E402

GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def nn_cell_loop(module, xs, h0, c0):
    """hs [L, N, H] from a loop of module (an nn.RNNCell / GRUCell / LSTMCell)."""
    state, hs = ((h0, c0) if c0 is not None else h0), []
    for t in range(xs.shape[0]):
        state = module(xs[t], state)
        hs.append(state[0] if c0 is not None else state)
    return torch.stack(hs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cell", choices=list(GATES), default="gru")
    p.add_argument("--hidden", type=int, default=128, help="the RNN's hidden size H")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    add_device_options(p, default_device="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]

    backbone = minilm_shaped(0.0, dtype=dtype).to(device).eval()
    cfg = backbone.config
    L, N, n_in, H = cfg.num_hidden_layers, args.batch * args.seq, cfg.hidden_size, args.hidden
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g).to(device)
    xs = torch.randn(L, N, n_in, generator=g).to(device=device, dtype=dtype)
    h0 = torch.zeros(N, H, device=device, dtype=dtype)
    c0 = torch.zeros_like(h0) if args.cell == "lstm" else None
    module = {"rnn": torch.nn.RNNCell, "gru": torch.nn.GRUCell, "lstm": torch.nn.LSTMCell}[args.cell](n_in, H)
    module = module.to(device=device, dtype=dtype)
    params = [module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh]
    # One token per sequence reaches the loss (the last: a classifier's read-out).
    last_rows = torch.arange(args.batch, device=device) * args.seq + args.seq - 1

    def ours():
        return recurrent_scan(xs, h0, *params, cell=args.cell, c0=c0)

    def loop():
        return nn_cell_loop(module, xs, h0, c0)

    def forward_only(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def train(fn, sparse):
        def run():
            hs = fn()
            (hs[:, last_rows] if sparse else hs).float().square().mean().backward()
            module.zero_grad(set_to_none=True)
        return run

    def backbone_forward():
        with torch.no_grad():
            backbone(input_ids=input_ids)

    candidates = {
        "backbone_forward": backbone_forward,
        "scan_forward": forward_only(ours), "nn_loop_forward": forward_only(loop),
        "scan_train_dense": train(ours, False), "nn_loop_train_dense": train(loop, False),
        "scan_train_sparse": train(ours, True), "nn_loop_train_sparse": train(loop, True),
    }
    seconds = alternate_timings(candidates, device, args.rounds)
    back = seconds["backbone_forward"]
    result = {
        "benchmark": "recurrent_scan",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_description(device),
        "shape": {"cell": args.cell, "steps_L": L, "rows_N": N, "in": n_in, "hidden_H": H, "dtype": args.dtype},
        "median_ms": {k: round(v * 1e3, 2) for k, v in seconds.items()},
        "share_of_backbone_forward": {k: round(v / back, 4) for k, v in seconds.items() if k != "backbone_forward"},
        "scan_over_nn_loop": {kind: round(seconds[f"scan_{kind}"] / seconds[f"nn_loop_{kind}"], 3)
                              for kind in ("forward", "train_dense", "train_sparse")},
        "saved_bytes": {"scan": saved_activation_bytes(ours, params), "nn_loop": saved_activation_bytes(loop, params)},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
