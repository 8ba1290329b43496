"""pypeft.patch against the `peft` package on a MiniLM-shaped BERT classifier
(6 layers, hidden 384, 12 heads, FFN 1536, random weights): train-step time
and saved-activation bytes, LoRA on query/value and on all linear layers, with
full fine-tuning and the frozen network as references.

Prints one JSON object. Candidates alternate in one process; medians, ratios.

    python benchmarks/bench_patch_vs_peft.py [--seq 256 --batch 8 --r 8 --rounds 7] [--device cuda --dtype bfloat16]
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--r", type=int, default=8)
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
    head_only = copy.deepcopy(base)  # no adapter at all: what any adapter's step costs at least
    head_only.requires_grad_(False)
    head_only.classifier.requires_grad_(True)
    head_only.bert.embeddings.register_forward_hook(lambda m, i, out: out.requires_grad_())
    models["head_only"] = head_only
    for targets, name in ((["query", "value"], "qv"), ("all-linear", "all_linear")):
        models[f"pypeft_{name}"] = pypeft.patch(copy.deepcopy(base), method="lora", r=args.r, alpha=2 * args.r,
                                                dropout=args.dropout, target_modules=targets)
        cfg = peft.LoraConfig(task_type="SEQ_CLS", r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                              target_modules=targets)
        models[f"peft_{name}"] = peft.get_peft_model(copy.deepcopy(base), cfg)
    for m in models.values():
        m.train().to(device)

    times = ({k: float("nan") for k in models} if args.memory_only else
             alternate_timings({k: train_step(m, batch) for k, m in models.items()}, device, args.rounds, warmup=1))
    saved = {}
    for k, m in models.items():
        params = list(m.parameters())
        saved[k] = saved_activation_bytes(lambda m=m: m(**batch).loss, params)
    trainable = {k: pypeft.trainable_parameters(m)[0] if k.startswith("pypeft") else
                 sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}

    def ratio(a, b, table):
        return round(table[a] / table[b], 3)

    report = {
        "benchmark": "patch_vs_peft",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__, "peft": peft.__version__,
        "config": vars(args),
        "median_ms_train_step": {k: round(v * 1e3, 1) for k, v in times.items()},
        "saved_mib": {k: round(v / 2**20, 1) for k, v in saved.items()},
        "trainable_parameters": trainable,
        "ratios": {
            "time_pypeft_vs_peft_qv": ratio("pypeft_qv", "peft_qv", times),
            "time_pypeft_vs_peft_all_linear": ratio("pypeft_all_linear", "peft_all_linear", times),
            "saved_pypeft_vs_peft_qv": ratio("pypeft_qv", "peft_qv", saved),
            "saved_pypeft_vs_peft_all_linear": ratio("pypeft_all_linear", "peft_all_linear", saved),
            "time_peft_all_linear_vs_full": ratio("peft_all_linear", "full_finetuning", times),
            "saved_peft_all_linear_vs_full": ratio("peft_all_linear", "full_finetuning", saved),
        },
    }
    r = report["ratios"]
    report["targets_met"] = {
        "all-linear saved <= 0.8x peft": r["saved_pypeft_vs_peft_all_linear"] <= 0.8,
        "all-linear step <= 0.8x peft": r["time_pypeft_vs_peft_all_linear"] <= 0.8,
        "qv step <= 0.9x peft": r["time_pypeft_vs_peft_qv"] <= 0.9,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
