"""pypeft VeRA against the `peft` package's VeRA and against pypeft LoRA on a
MiniLM-shaped BERT classifier (query/value targets): train-step time, saved
activation bytes and trainable parameters, with full fine-tuning and the
frozen network (gradients flowing back to the embeddings: the floor for any
adapter) as references.

Prints one JSON object. Candidates alternate in one process; medians, ratios.

    python benchmarks/bench_vera.py [--seq 256 --batch 8 --r 256 --lora-r 8 --rounds 7]
                                    [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DTYPES, add_device_options, alternate_timings, classification_batch,  # noqa: E402
                    machine_description, minilm_shaped, reference_models, saved_activation_bytes, train_step)

import pypeft  # noqa: E402

TARGETS = ["query", "value"]


def measure(models, batch, device, args):
    """Step times (alternated) and saved-activation bytes of every candidate."""
    times = ({k: float("nan") for k in models} if args.memory_only else
             alternate_timings({k: train_step(m, batch) for k, m in models.items()}, device, args.rounds, warmup=1))
    saved = {}
    for k, m in models.items():
        constants = list(m.parameters()) + list(m.buffers())  # VeRA's shared matrices are buffers, not activations
        saved[k] = saved_activation_bytes(lambda m=m: m(**batch).loss, constants)
    return times, saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=256, help="VeRA rank")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--memory-only", action="store_true", help="skip the timings")
    add_device_options(p)
    args = p.parse_args(argv)
    import peft

    device = torch.device(args.device)
    # Every candidate is built on the CPU from the same weights, then moved.
    base = minilm_shaped(args.dropout, dtype=DTYPES[args.dtype])
    batch = classification_batch(args.batch, args.seq, device=device)
    models = reference_models(base)
    models["pypeft_vera"] = pypeft.patch(copy.deepcopy(base), method="vera", r=args.r, dropout=args.dropout,
                                         target_modules=TARGETS)
    cfg = peft.VeraConfig(task_type="SEQ_CLS", r=args.r, vera_dropout=args.dropout, target_modules=TARGETS)
    models["peft_vera"] = peft.get_peft_model(copy.deepcopy(base), cfg)
    models["pypeft_lora"] = pypeft.patch(copy.deepcopy(base), method="lora", r=args.lora_r, alpha=2 * args.lora_r,
                                         dropout=args.dropout, target_modules=TARGETS)
    # The same VeRA model with the whole model's dropout from pypeft's counter hash (pypeft.counter_hash_dropout,
    # entered for the whole run: every timing and the saved-bytes pass of this candidate are inside it).
    models["pypeft_vera_counter_hash"] = pypeft.patch(copy.deepcopy(base), method="vera", r=args.r,
                                                      dropout=args.dropout, target_modules=TARGETS)
    for m in models.values():
        m.train().to(device)
    with pypeft.counter_hash_dropout(models["pypeft_vera_counter_hash"]):
        times, saved = measure(models, batch, device, args)
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    # Without the classifier head, which every candidate trains alike.
    head = sum(p.numel() for p in base.classifier.parameters())
    adapter_only = {k: trainable[k] - head for k in ("pypeft_vera", "peft_vera", "pypeft_lora")}

    def ratio(a, b, table):
        return round(table[a] / table[b], 3)

    report = {
        "benchmark": "vera",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__, "peft": peft.__version__,
        "config": vars(args),
        "median_ms_train_step": {k: round(v * 1e3, 1) for k, v in times.items()},
        "saved_mib": {k: round(v / 2**20, 1) for k, v in saved.items()},
        "trainable_parameters": trainable,
        "adapter_parameters_without_head": adapter_only,
        "ratios": {
            "adapter_params_vera_vs_lora": round(adapter_only["pypeft_vera"] / adapter_only["pypeft_lora"], 4),
            "saved_vera_vs_floor": ratio("pypeft_vera", "frozen_floor", saved),
            "saved_vera_vs_peft_vera": ratio("pypeft_vera", "peft_vera", saved),
            "saved_peft_vera_vs_full": ratio("peft_vera", "full_finetuning", saved),
            "time_vera_vs_peft_vera": ratio("pypeft_vera", "peft_vera", times),
            "time_vera_vs_pypeft_lora": ratio("pypeft_vera", "pypeft_lora", times),
            "time_peft_vera_vs_full": ratio("peft_vera", "full_finetuning", times),
            "time_vera_counter_hash_vs_peft_vera": ratio("pypeft_vera_counter_hash", "peft_vera", times),
            "time_vera_counter_hash_vs_vera": ratio("pypeft_vera_counter_hash", "pypeft_vera", times),
        },
    }
    r = report["ratios"]
    report["targets_met"] = {
        "trainable <= 1/7 of LoRA r=8's": r["adapter_params_vera_vs_lora"] <= 1 / 7,
        "saved within 5% of the floor": r["saved_vera_vs_floor"] <= 1.05,
        "step <= 0.85x peft VeRA": r["time_vera_vs_peft_vera"] <= 0.85,
        "step <= 0.85x peft VeRA, with pypeft.counter_hash_dropout": r["time_vera_counter_hash_vs_peft_vera"] <= 0.85,
        "step <= 1.1x pypeft LoRA": r["time_vera_vs_pypeft_lora"] <= 1.1,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
