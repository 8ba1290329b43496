"""Mixed-adapter batches (serving): a MiniLM-shaped BERT classifier with 8
adapters on query/value, inference on 32 rows spread round-robin over the 8
adapters, at 4 and at 128 tokens per row. Candidates, per method (LoRA r=8,
VeRA r=256):
  single: the 32 rows with one adapter active (what a mixed batch should cost)
  mixed:  pypeft.mixed_batch (one op call per layer)
  loop:   a Python loop over the adapters, one forward per adapter's rows
  peft_single / peft_mixed (`adapter_names=`) / peft_loop: the same with the
          `peft` package (peft has no mixed batch for VeRA: LoRA only)

Prints one JSON object. Candidates alternate in one process; medians, ratios.

    python benchmarks/bench_mixed_batch.py [--rows 32 --adapters 8 --tokens 4 128 --rounds 15]
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
from common import DTYPES, add_device_options, alternate_timings, machine_description, minilm_shaped  # noqa: E402

import pypeft  # noqa: E402

TARGETS = ["query", "value"]


def randomize_adapters(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("lora_", "vera_lambda")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def pypeft_model(base, method, names, args):
    model = copy.deepcopy(base)
    for name in names:
        options = dict(r=args.lora_r, alpha=2 * args.lora_r) if method == "lora" else dict(r=args.vera_r)
        pypeft.patch(model, method=method, adapter_name=name, target_modules=TARGETS, **options)
    randomize_adapters(model, 0)
    return model.eval()


def peft_model(base, method, names, args):
    import peft

    def config():
        if method == "lora":
            return peft.LoraConfig(task_type="SEQ_CLS", r=args.lora_r, lora_alpha=2 * args.lora_r,
                                   target_modules=TARGETS)
        return peft.VeraConfig(task_type="SEQ_CLS", r=args.vera_r, target_modules=TARGETS)

    model = peft.get_peft_model(copy.deepcopy(base), config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    randomize_adapters(model, 0)
    return model.eval()


def candidates(method, ours, theirs, batch, row_names, adapters, device):
    rows_of = {a: torch.tensor([i for i, n in enumerate(row_names) if n == a], device=device) for a in adapters}

    def sub(b, a):
        return {k: v.index_select(0, rows_of[a]) for k, v in b.items()}

    def single():
        ours(**batch)

    def mixed():
        with pypeft.mixed_batch(ours, row_names):
            ours(**batch)

    def loop():
        for a in adapters:
            pypeft.set_adapter(ours, a)
            ours(**sub(batch, a))
        pypeft.set_adapter(ours, adapters[0])

    def peft_single():
        theirs(**batch)

    def peft_mixed():
        theirs(**batch, adapter_names=row_names)

    def peft_loop():
        for a in adapters:
            theirs.set_adapter(a)
            theirs(**sub(batch, a))
        theirs.set_adapter(adapters[0])

    out = {"single": single, "mixed": mixed, "loop": loop, "peft_single": peft_single, "peft_loop": peft_loop}
    if method == "lora":
        out["peft_mixed"] = peft_mixed
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[4, 128])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--vera-r", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=["lora", "vera"])
    p.add_argument("--rounds", type=int, default=15)
    add_device_options(p)
    args = p.parse_args(argv)
    import peft

    device = torch.device(args.device)
    # Both libraries' models are built on the CPU from the same weights, then moved.
    base = minilm_shaped(0.0, dtype=DTYPES[args.dtype])
    # How closely a mixed batch must match row-by-row calls: float32 rounding, or the model's.
    tolerance = 1e-4 if args.dtype in ("float32", "float64") else 5e-2
    adapters = [f"user{i}" for i in range(args.adapters)]
    row_names = [adapters[i % len(adapters)] for i in range(args.rows)]
    results = {}
    for method in args.methods:
        ours = pypeft_model(base, method, adapters, args).to(device)
        theirs = peft_model(base, method, adapters, args).to(device)
        pypeft.set_adapter(ours, adapters[0])
        theirs.set_adapter(adapters[0])
        for tokens in args.tokens:
            g = torch.Generator().manual_seed(tokens)
            batch = {"input_ids": torch.randint(0, 30522, (args.rows, tokens), generator=g).to(device),
                     "attention_mask": torch.ones(args.rows, tokens, dtype=torch.long, device=device)}
            with torch.inference_mode():
                # The candidates must agree before they are timed.
                with pypeft.mixed_batch(ours, row_names):
                    got = ours(**batch).logits
                want = torch.cat([ours_row(ours, batch, i, a) for i, a in enumerate(row_names)])
                torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)
                pypeft.set_adapter(ours, adapters[0])
                times = alternate_timings(candidates(method, ours, theirs, batch, row_names, adapters, device),
                                          device, args.rounds, warmup=2)
            ms = {k: round(v * 1e3, 2) for k, v in times.items()}
            ratios = {f"{k}_vs_single": round(times[k] / times["single"], 3) for k in ("mixed", "loop")}
            ratios.update({f"{k}_vs_peft_single": round(times[k] / times["peft_single"], 3)
                           for k in ("peft_mixed", "peft_loop") if k in times})
            if "peft_mixed" in times:
                ratios["mixed_vs_peft_mixed"] = round(times["mixed"] / times["peft_mixed"], 3)
            target = 1.15 if tokens <= 4 else 1.03
            results[f"{method}_tokens{tokens}"] = {"median_ms": ms, "ratios": ratios,
                                                   f"mixed <= {target}x single": ratios["mixed_vs_single"] <= target}
    print(json.dumps({
        "benchmark": "mixed_batch",
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(device),
        "torch": torch.__version__, "peft": peft.__version__,
        "config": vars(args),
        "results": results,
    }, indent=2))


def ours_row(model, batch, i, adapter):
    pypeft.set_adapter(model, adapter)
    return model(**{k: v[i:i + 1] for k, v in batch.items()}).logits


if __name__ == "__main__":
    main()
