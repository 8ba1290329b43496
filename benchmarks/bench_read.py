"""pypeft READ against full fine-tuning, against the backbone's forward alone
(READ's floor: it must run the backbone once) and against READ written the
plain way in eager PyTorch (benchmarks/plain_read.py), on a MiniLM-shaped
BERT classifier.

Figures: saved-activation bytes per forward and train-step time (candidates
alternated in one process; medians, and ratios as the median of the ratio
within each round, which the machine's slow spells do not move: on 2 CPU
cores the backbone's dropout alone — bernoulli_ on every attention
probability — swings its forward by ±20% from round to round). The joiner starts from small random
values, not zero, in both READs: at zero the RNN's gradient is exactly zero,
which only the first step sees, and pypeft's backward would skip all of it.

    python benchmarks/bench_read.py [--seq 256 --batch 8 --rnn gru --hidden 128 --dropout 0.1 --rounds 25]
                                   [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (DTYPES, add_device_options, alternate_samples, classification_batch,  # noqa: E402
                    machine_description, minilm_shaped, paired_ratio, saved_activation_bytes, train_step)
from plain_read import PlainRead  # noqa: E402

import pypeft  # noqa: E402


def pypeft_read(args):
    """On the CPU, in args.dtype (pypeft keeps READ's network in float32 on a
    bfloat16/float16 model)."""
    model = minilm_shaped(args.dropout, dtype=DTYPES[args.dtype]).train()
    pypeft.patch(model, method="read", rnn=args.rnn, hidden=args.hidden)
    network = model.bert.encoder.pypeft_read.networks["default"]
    with torch.no_grad():  # as after some training (see the module docstring)
        network.joiner.weight.normal_(0.0, 1e-2, generator=torch.Generator().manual_seed(1))
    return model, network


def plain_read(args, network):
    plain = PlainRead(minilm_shaped(args.dropout, dtype=DTYPES[args.dtype]).train(), args.hidden).train()
    plain.load_from_pypeft(network)
    return plain


def candidates(args, device, batch):
    """name -> (module, step, forward returning the loss)."""
    dtype = DTYPES[args.dtype]
    full = minilm_shaped(args.dropout, dtype=dtype).train().to(device)
    frozen = minilm_shaped(args.dropout, dtype=dtype).train().requires_grad_(False).to(device)
    ours, network = pypeft_read(args)
    ours.to(device)
    plain = plain_read(args, network).to(device)

    def backbone_forward():
        with torch.no_grad():
            frozen(**batch)

    def plain_step():
        plain(**batch).backward()
        plain.zero_grad(set_to_none=True)

    return {
        "full_finetuning": (full, train_step(full, batch), lambda: full(**batch).loss),
        "backbone_forward_no_grad": (frozen, backbone_forward, None),
        "plain_read": (plain, plain_step, lambda: plain(**batch)),
        "pypeft_read": (ours, train_step(ours, batch), lambda: ours(**batch).loss),
    }


def check_same_gradients(args) -> float:
    """Largest difference between pypeft's and the plain READ's RNN and joiner
    gradients on one batch without dropout, on the CPU in float32: both must
    compute the same thing."""
    batch = classification_batch(2, 32)
    args0 = argparse.Namespace(**{**vars(args), "dropout": 0.0, "dtype": "float32"})
    ours, network = pypeft_read(args0)
    plain = plain_read(args0, network)
    ours(**batch).loss.backward()
    plain(**batch).backward()
    pairs = [(getattr(network, n).grad, getattr(plain.rnn, f"{n}_l0").grad)
             for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    pairs += [(network.joiner.weight.grad, plain.joiner.weight.grad)]
    return max((a - b).abs().max().item() for a, b in pairs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rnn", default="gru", choices=["gru"], help="the plain READ baseline is written for nn.GRU")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=25)
    add_device_options(p)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    batch = classification_batch(args.batch, args.seq, device=device)
    built = candidates(args, device, batch)
    saved = {n: saved_activation_bytes(fwd, list(m.parameters())) for n, (m, _, fwd) in built.items() if fwd}
    samples = alternate_samples({n: step for n, (_, step, _) in built.items()}, device, args.rounds)
    times = {n: statistics.median(s) for n, s in samples.items()}
    ratio = functools.partial(paired_ratio, samples)
    result = {
        "benchmark": "read", "date": datetime.date.today().isoformat(),
        "machine": machine_description(device), "torch": torch.__version__,
        "shape": {"seq": args.seq, "batch": args.batch, "rnn": args.rnn, "hidden": args.hidden,
                  "dropout": args.dropout, "dtype": args.dtype},
        "max_grad_difference_vs_plain": check_same_gradients(args),
        "trainable_parameters": pypeft.trainable_parameters(built["pypeft_read"][0])[0],
        "saved_bytes": saved, "step_s": times,
        "ratios": {
            "saved_pypeft_vs_full": saved["pypeft_read"] / saved["full_finetuning"],
            "saved_plain_vs_full": saved["plain_read"] / saved["full_finetuning"],
            "step_pypeft_vs_backbone_forward": ratio("pypeft_read", "backbone_forward_no_grad"),
            "step_plain_vs_backbone_forward": ratio("plain_read", "backbone_forward_no_grad"),
            "step_pypeft_vs_plain": ratio("pypeft_read", "plain_read"),
            "step_pypeft_vs_full": ratio("pypeft_read", "full_finetuning"),
            "backbone_forward_vs_full": ratio("backbone_forward_no_grad", "full_finetuning"),
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
