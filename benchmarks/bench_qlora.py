"""QLoRA's memory and time on a real small causal LM: LoRA (r=16 on every linear
layer but the head) over an NF4 base against the same LoRA over the float32
base, and with TokenTune added; each configuration a train step (forward,
backward, AdamW step) in a fresh subprocess, the configurations alternated,
medians over rounds.

Peak RSS is the train steps' own: after loading (and quantising) the model the
child returns freed memory to the system (malloc_trim) and resets the kernel's
peak (/proc/self/clear_refs 5), so what is reported is the high-water mark of
the steps (weights, activations, gradients, optimizer state), not of the load.

    python benchmarks/bench_qlora.py                           # SmolLM2-135M, seq 256, batch 4
    python benchmarks/bench_qlora.py --model llama-1b --batch 1 --steps 1   # ~1.1 B, random, quantised as built
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine_description, peak_resident_bytes  # noqa: E402

CONFIGS = ("fp32", "nf4", "fp32+tokentune", "nf4+tokentune")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "llama-1b"), default="smollm2")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="train steps per child (the first is a warm-up when > 1)")
    p.add_argument("--rounds", type=int, default=2, help="children per configuration, alternated")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--k", type=int, default=32, help="TokenTune's selected tokens per sequence")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- the child: one configuration, one process --------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _release_and_reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _llama_1b_config():
    from transformers import LlamaConfig

    # TinyLlama-1.1B's shape.
    return LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                       num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                       tie_word_embeddings=False)


def _load(model_name: str, nf4: bool):
    import torch

    import pypeft

    if model_name == "smollm2":
        from pypeft.finetune.smollm2 import load_smollm2

        _, model = load_smollm2(torch.float32)
        if nf4:
            pypeft.quantize(model, "nf4", compute_dtype=torch.float32)
        return model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if nf4:
        from pypeft.quant import from_config  # random weights, quantised a block at a time

        return from_config(LlamaForCausalLM, _llama_1b_config(), compute_dtype=torch.float32)
    return LlamaForCausalLM(_llama_1b_config())


def child(args) -> dict:
    import torch

    import pypeft

    torch.manual_seed(0)
    nf4 = args.child.startswith("nf4")
    t0 = time.perf_counter()
    model = _load(args.model, nf4)
    load_s = time.perf_counter() - t0
    pypeft.patch(model, method="lora", r=args.r, alpha=2 * args.r, target_modules="all-linear")
    if args.child.endswith("+tokentune"):
        pypeft.patch(model, method="tokentune", k=args.k)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    rss_loaded = _rss_bytes()
    _release_and_reset_peak()
    rss_before = _rss_bytes()
    times, losses = [], []
    for _ in range(args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    timed = times[1:] if len(times) > 1 else times
    return {"config": args.child, "peak_rss_steps": peak_resident_bytes(), "rss_before_steps": rss_before,
            "rss_after_load": rss_loaded, "step_s": statistics.median(timed), "load_s": load_s,
            "first_loss": losses[0], "trainable": sum(p.numel() for p in params),
            "total_params": sum(p.numel() for p in model.parameters())}


# --- the parent: alternate children, report medians and ratios ---------------------------------

def _run_child(args, config: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", config, "--model", args.model, "--seq",
           str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), "--r", str(args.r), "--k",
           str(args.k)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {config} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    configs = [c for c in args.configs.split(",") if c]
    runs: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c in configs:
            runs[c].append(_run_child(args, c))

    def med(c, key):
        return statistics.median(r[key] for r in runs[c])

    mib = 1 << 20
    table = {c: {"peak_rss_steps_mib": round(med(c, "peak_rss_steps") / mib, 1),
                 "rss_before_steps_mib": round(med(c, "rss_before_steps") / mib, 1),
                 "step_s": round(med(c, "step_s"), 3), "load_s": round(med(c, "load_s"), 1),
                 "trainable": runs[c][0]["trainable"], "first_loss": round(runs[c][0]["first_loss"], 4)}
             for c in configs}
    ratios = {}
    for base, other in (("fp32", "nf4"), ("fp32", "nf4+tokentune"), ("fp32+tokentune", "nf4+tokentune")):
        if base in table and other in table:
            ratios[f"{other}_vs_{base}"] = {
                "peak_rss": round(table[other]["peak_rss_steps_mib"] / table[base]["peak_rss_steps_mib"], 3),
                "step": round(table[other]["step_s"] / table[base]["step_s"], 3)}
    report = {"benchmark": "qlora", "date": datetime.date.today().isoformat(), "machine": machine_description(torch.device("cpu")),
              "config": {"model": args.model, "seq": args.seq, "batch": args.batch, "steps": args.steps,
                         "rounds": args.rounds, "lora_r": args.r, "tokentune_k": args.k},
              "results": table, "ratios": ratios}
    if "nf4_vs_fp32" in ratios:
        report["targets_met"] = {"peak RSS <= 0.45x": ratios["nf4_vs_fp32"]["peak_rss"] <= 0.45,
                                 "step <= 1.2x": ratios["nf4_vs_fp32"]["step"] <= 1.2}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
