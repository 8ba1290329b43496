"""Peak process memory of getting an NF4 model (issue 15: "quantising a model
as it loads, layer by layer, so that the full precision model never sits in
memory at once"). One fresh subprocess per candidate (peak RSS, VmHWM):

- load_then_quantize: AutoModelForCausalLM.from_pretrained, then pypeft.quantize
- streamed: pypeft.quant.from_pretrained (full-precision checkpoint, one tensor at a time)
- transformers_bnb: from_pretrained(quantization_config=BitsAndBytesConfig(nf4)) (if bitsandbytes is installed)
- random: pypeft.quant.from_config (random weights quantised a block at a time, no checkpoint)
- import_only: the interpreter with torch, transformers, pypeft and the Llama modelling code (the floor)

Children run with MALLOC_MMAP_THRESHOLD_=1 MiB (--malloc-mmap-threshold; 0
leaves glibc's default): by default glibc raises its mmap threshold each time
a large block is freed, so the freed full-precision layers of a streamed load
stay in the heap (reusable, but counted in the peak RSS: ~+100 MB at the
default shape), which measures the allocator, not what the loader holds.

The checkpoint is a Llama-shaped model with random weights saved in a
temporary directory (default ~107M parameters, float32: 0.43 GB; a small vocabulary, so
that the linear layers, which the loaders quantise, hold most of it). `--random-1b`
instead builds a TinyLlama-1.1B-shaped model with pypeft.quant.from_config
only (the shape the issue's QLoRA benchmark trains) and reports its peak RSS,
wall time and stored bytes.

    python benchmarks/bench_nf4_loading.py [--hidden 1024 --layers 8 --intermediate 2816 --vocab 8000]
    python benchmarks/bench_nf4_loading.py --random-1b

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

CANDIDATES = ["import_only", "load_then_quantize", "streamed", "transformers_bnb", "random"]
TINYLLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)


def llama_config(args):
    import transformers
    shape = TINYLLAMA_1B if args.random_1b else dict(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
        vocab_size=args.vocab, max_position_embeddings=2048)
    return transformers.LlamaConfig(**shape, tie_word_embeddings=False)


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def child(args) -> None:
    """Build one candidate in this (fresh) process; print its figures as JSON."""
    import torch
    import transformers

    import pypeft
    from common import peak_resident_bytes
    with torch.device("meta"):  # the floor holds the modelling code too
        transformers.LlamaForCausalLM(llama_config(args))
    start = time.perf_counter()
    model = None
    auto = transformers.AutoModelForCausalLM
    if args.child == "load_then_quantize":
        model = pypeft.quantize(auto.from_pretrained(args.checkpoint))
    elif args.child == "streamed":
        model = pypeft.quant.from_pretrained(auto, args.checkpoint)
    elif args.child == "transformers_bnb":
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
        model = auto.from_pretrained(args.checkpoint, quantization_config=config)
    elif args.child == "random":
        torch.manual_seed(0)
        model = pypeft.quant.from_config(transformers.LlamaForCausalLM, llama_config(args))
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_rss_bytes": peak_resident_bytes(), "seconds": seconds,
                      "model_bytes": model_bytes(model) if model is not None else 0}))


def run_child(name: str, args, checkpoint: str | None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--hidden", str(args.hidden), "--layers",
           str(args.layers), "--intermediate", str(args.intermediate), "--vocab", str(args.vocab)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    if args.random_1b:
        cmd.append("--random-1b")
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--random-1b", action="store_true",
                        help="only pypeft.quant.from_config at TinyLlama-1.1B shape")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20,
                        help="MALLOC_MMAP_THRESHOLD_ of the children, bytes (0: glibc's default)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import platform

    import torch
    result = {"benchmark": "nf4_loading", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
              "malloc_mmap_threshold": args.malloc_mmap_threshold or "glibc default"}
    if args.random_1b:
        import transformers
        config = llama_config(args)
        with torch.device("meta"):
            n = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
        result.update(shape=TINYLLAMA_1B, parameters=n, floor=run_child("import_only", args, None),
                      random=run_child("random", args, None))
        print(json.dumps(result, indent=2))
        return
    with tempfile.TemporaryDirectory() as tmp:
        import transformers
        torch.manual_seed(0)
        config = llama_config(args)
        model = transformers.LlamaForCausalLM(config)
        n = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        checkpoint_bytes = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)
                               if f.endswith(".safetensors"))
        runs = {name: run_child(name, args, tmp) for name in CANDIDATES}
    floor = runs["import_only"].get("peak_rss_bytes", 0)
    above = {k: v["peak_rss_bytes"] - floor for k, v in runs.items() if "peak_rss_bytes" in v and k != "import_only"}
    base = above.get("load_then_quantize")
    result.update(parameters=n, checkpoint_bytes=checkpoint_bytes, runs=runs, peak_rss_above_floor_bytes=above,
                  ratios={f"{k}_vs_load_then_quantize": v / base for k, v in above.items()} if base else {})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
