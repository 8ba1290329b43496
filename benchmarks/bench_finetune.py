"""The main job, `pypeft finetune`, end to end: its figures and the issue's target.

Runs the job in a fresh subprocess per repetition (so the peak RSS is the job's
own, DESIGN.md "Measuring"), with the defaults unless arguments are given, and
prints one JSON object: the job's summary per run, wall time of the whole
process (interpreter start and imports included), the load average around each
run (the machines are shared: a loaded machine explains a slow run), and the
target: default LoRA reaches >= 0.90 test accuracy on BBC News within 3 minutes.

    python benchmarks/bench_finetune.py                  # the default job (LoRA, MiniLM, BBC News)
    python benchmarks/bench_finetune.py --repeat 3 -- --epochs 1 --max-length 128
    python benchmarks/bench_finetune.py --device cuda    # the job's --device (default: the job's own, auto)

The job trains in its model's dtype (float32 for the bundled MiniLM): `pypeft
finetune` has no dtype option, so neither has this script.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

TARGET_ACCURACY = 0.90
TARGET_SECONDS = 180.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=1, help="runs, one fresh process each (default: 1)")
    p.add_argument("--device", default=None,
                   help="passed to the job as --device (auto, cpu, cuda[:N]); default: not passed (auto)")
    p.add_argument("job_args", nargs="*", help="arguments for `pypeft finetune` (after --)")
    return p.parse_args(argv)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def run_once(job_args: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="pypeft-bench-") as out:
        command = [sys.executable, "-m", "pypeft", "finetune", "--no-progress", "--output", out, *job_args]
        load_before = load_average()
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"bench_finetune: `{' '.join(command)}` failed ({done.returncode}):\n{done.stderr}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary.pop("adapter_dir", None)
    return {"wall_seconds": round(wall, 1), "load_average_before": load_before,
            "load_average_after": load_average(), **summary}


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch  # only for the machine's description

    device_args = ["--device", args.device] if args.device else []
    runs = [run_once(device_args + args.job_args) for _ in range(args.repeat)]
    default_job = not args.job_args  # the device does not change the job
    result = {
        "benchmark": "pypeft finetune (main job)",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                                                   else ""),
        "job_args": device_args + args.job_args,
        "runs": runs,
        "target": {
            "what": f"default LoRA: test accuracy >= {TARGET_ACCURACY} on BBC News within {TARGET_SECONDS:.0f} s "
                    "(whole process)",
            "applies": default_job,
            "met": [r["accuracy_after"] >= TARGET_ACCURACY and r["wall_seconds"] <= TARGET_SECONDS for r in runs]
            if default_job else None,
        },
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
