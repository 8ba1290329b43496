"""pypeft TokenTune against full fine-tuning and against TokenTune written the
paper's way in eager PyTorch (two streams: benchmarks/two_stream_bert.py), on
a MiniLM-shaped BERT classifier; and TokenTune + LoRA(all-linear) against
LoRA(all-linear) alone.

Figures: saved-activation bytes per forward, train-step time (candidates
alternated in one process; medians, and ratios as the median of the ratio
within each round, which a shared machine's slow spells do not move), peak process memory (one fresh
subprocess per configuration: build, then train `--steps` steps), and a sweep
of the fraction of tokens (1/16 ... 1) for TokenTune alone and with LoRA,
plotted to benchmarks/tokentune_fraction.png.

    python benchmarks/bench_tokentune.py [--seq 256 --batch 8 --k 32 --rounds 5] [--device cuda --dtype bfloat16]
                                         [--no-sweep] [--no-rss] [--rss-only]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import (DTYPES, add_device_options, alternate_samples, classification_batch,  # noqa: E402
                    machine_description, minilm_shaped, paired_ratio, peak_resident_bytes, saved_activation_bytes,
                    train_step)
from two_stream_bert import two_stream_loss  # noqa: E402

import pypeft  # noqa: E402

FRACTIONS = [1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0]


def first_and_random(seq: int, k: int, seed: int = 0):
    """A selector as pypeft's default for encoders (token 0 plus k - 1 at
    random), drawn from its own generator so that both implementations see
    the same positions."""
    g = torch.Generator().manual_seed(seed)

    def select(input_ids, attention_mask, k_):
        B = input_ids.shape[0]
        rest = torch.stack([torch.randperm(seq - 1, generator=g)[: k_ - 1] + 1 for _ in range(B)])
        return torch.cat([torch.zeros(B, 1, dtype=torch.long), rest], 1).sort(1).values.to(input_ids.device)
    return select


def build(name: str, dropout: float, seq: int, k: int, lora_r: int, dtype: torch.dtype = torch.float32):
    """The model of one configuration, patched on the CPU (adapters follow PEFT:
    float32 on a bfloat16 model)."""
    base = minilm_shaped(dropout, dtype=dtype)
    base.train()
    if name.startswith("lora") or name.startswith("tokentune+lora"):
        pypeft.patch(base, method="lora", r=lora_r, alpha=2 * lora_r, target_modules="all-linear")
    if "tokentune" in name and name != "two_stream":
        pypeft.patch(base, method="tokentune", k=k, selector=first_and_random(seq, k))
    return base


def two_stream_step(model, batch, seq, k):
    select = first_and_random(seq, k)

    def loss():
        positions = select(batch["input_ids"], None, k).to(batch["input_ids"].device)
        return two_stream_loss(model, batch["input_ids"], batch["labels"], positions)

    def step():
        loss().backward()
        model.zero_grad(set_to_none=True)
    return step, loss


def measure(names, args, k, rounds):
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    batch = classification_batch(args.batch, args.seq, device=device)
    models, steps, forwards = {}, {}, {}
    for name in names:
        if name == "two_stream":
            model = minilm_shaped(args.dropout, dtype=dtype).train().to(device)
            steps[name], forwards[name] = two_stream_step(model, batch, args.seq, k)
        else:
            model = build(name, args.dropout, args.seq, k, args.lora_r, dtype).to(device)
            steps[name] = train_step(model, batch)
            forwards[name] = (lambda m: (lambda: m(**batch).loss))(model)
        models[name] = model
    saved = {n: saved_activation_bytes(forwards[n], list(models[n].parameters())) for n in names}
    samples = alternate_samples(steps, device, rounds) if rounds else {}
    return saved, samples


def medians(samples: dict) -> dict:
    return {n: statistics.median(s) for n, s in samples.items()}


def peak_rss(name: str, args) -> int:
    """Peak resident bytes of a fresh process that builds `name` and trains it."""
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-of", name, "--seq", str(args.seq), "--batch",
           str(args.batch), "--k", str(args.k), "--lora-r", str(args.lora_r), "--dropout", str(args.dropout),
           "--dtype", args.dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def rss_child(args) -> None:
    batch = classification_batch(args.batch, args.seq)
    dtype = DTYPES[args.dtype]
    if args.rss_of == "two_stream":
        model = minilm_shaped(args.dropout, dtype=dtype).train()
        step, _ = two_stream_step(model, batch, args.seq, args.k)
    else:
        step = train_step(build(args.rss_of, args.dropout, args.seq, args.k, args.lora_r, dtype), batch)
    for _ in range(args.steps):
        step()
    print(peak_resident_bytes())


def check_same_gradients(args) -> float:
    """Largest gradient difference between native TokenTune and the two-stream
    baseline on one batch without dropout, on the CPU in float32: both must
    compute the same thing."""
    batch = classification_batch(2, 32)
    ours = build("tokentune", 0.0, 32, 8, args.lora_r)
    theirs = minilm_shaped(0.0).train()
    ours(**batch).loss.backward()
    positions = first_and_random(32, 8)(batch["input_ids"], None, 8)
    two_stream_loss(theirs, batch["input_ids"], batch["labels"], positions).backward()
    return max((a.grad - b.grad).abs().max().item() for a, b in zip(ours.parameters(), theirs.parameters())
               if b.grad is not None)


def sweep(args):
    rows = []
    for f in FRACTIONS:
        k = max(1, round(f * args.seq))
        saved, samples = measure(["tokentune", "tokentune+lora"], args, k, args.sweep_rounds)
        rows.append({"fraction": f, "k": k, "saved_bytes": saved, "step_s": medians(samples)})
    return rows


def plot(rows, full, lora, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    fr = [r["fraction"] for r in rows]
    for name, label in (("tokentune", "TokenTune"), ("tokentune+lora", "TokenTune + LoRA (all-linear)")):
        ax1.plot(fr, [r["saved_bytes"][name] / 2**20 for r in rows], "o-", label=label)
        ax2.plot(fr, [r["step_s"][name] for r in rows], "o-", label=label)
    ax1.axhline(full["saved"] / 2**20, color="gray", ls="--", label="full fine-tuning")
    ax1.axhline(lora["saved"] / 2**20, color="gray", ls=":", label="LoRA (all-linear)")
    ax2.axhline(full["step"], color="gray", ls="--", label="full fine-tuning")
    ax2.axhline(lora["step"], color="gray", ls=":", label="LoRA (all-linear)")
    for ax, title in ((ax1, "saved activations (MiB)"), (ax2, "train step (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("fraction of tokens with gradients")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sweep-rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2, help="train steps in each peak-memory subprocess")
    add_device_options(p)  # peak RSS is measured on cpu only
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--plot", default=os.path.join(HERE, "tokentune_fraction.png"))
    p.add_argument("--rss-only", action="store_true", help="only the peak-memory subprocesses")
    p.add_argument("--rss-of", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rss_of:
        return rss_child(args)
    if args.rss_only:
        rss = {n: peak_rss(n, args) for n in ["full_finetuning", "two_stream", "tokentune"]}
        print(json.dumps({"peak_rss_bytes": rss, "rss_tokentune_vs_full": rss["tokentune"] / rss["full_finetuning"],
                          "rss_two_stream_vs_full": rss["two_stream"] / rss["full_finetuning"]}, indent=2))
        return None

    names = ["full_finetuning", "two_stream", "tokentune", "lora", "tokentune+lora"]
    saved, samples = measure(names, args, args.k, args.rounds)
    times = medians(samples)

    def ratio(a, b):  # the median of the per-round ratios: slow spells of a shared machine cancel out
        return paired_ratio(samples, a, b)

    result = {
        "benchmark": "tokentune", "date": datetime.date.today().isoformat(),
        "machine": machine_description(torch.device(args.device)), "torch": torch.__version__,
        "shape": {"seq": args.seq, "batch": args.batch, "k": args.k, "dropout": args.dropout,
                  "lora_r": args.lora_r, "dtype": args.dtype},
        "max_grad_difference_vs_two_stream": check_same_gradients(args),
        "saved_bytes": saved, "step_s": times,
        "ratios": {
            "saved_tokentune_vs_full": saved["tokentune"] / saved["full_finetuning"],
            "saved_two_stream_vs_full": saved["two_stream"] / saved["full_finetuning"],
            "saved_tokentune_vs_two_stream": saved["tokentune"] / saved["two_stream"],
            "saved_tokentune_lora_vs_lora": saved["tokentune+lora"] / saved["lora"],
            "step_tokentune_vs_full": ratio("tokentune", "full_finetuning"),
            "step_two_stream_vs_full": ratio("two_stream", "full_finetuning"),
            "step_tokentune_vs_two_stream": ratio("tokentune", "two_stream"),
            "step_tokentune_lora_vs_lora": ratio("tokentune+lora", "lora"),
        },
    }
    if not args.no_rss and args.device == "cpu":  # peak RSS means something on the CPU only
        rss = {n: peak_rss(n, args) for n in ["full_finetuning", "two_stream", "tokentune"]}
        result["peak_rss_bytes"] = rss
        result["ratios"]["rss_tokentune_vs_full"] = rss["tokentune"] / rss["full_finetuning"]
    if not args.no_sweep:
        rows = sweep(args)
        result["fraction_sweep"] = rows
        try:
            plot(rows, {"saved": saved["full_finetuning"], "step": times["full_finetuning"]},
                 {"saved": saved["lora"], "step": times["lora"]}, args.plot)
            result["plot"] = os.path.relpath(args.plot, os.path.dirname(HERE))
        except ImportError as exc:  # the figures above are the result; the picture is a view of them
            result["plot"] = f"not drawn: {exc}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
