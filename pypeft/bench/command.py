"""`pypeft bench`: run each chosen method (runs.py), then write the report (report.py)."""

from __future__ import annotations

import platform
import shlex
import sys
import time
from pathlib import Path
from typing import TextIO

import torch
from tqdm.auto import tqdm

from pypeft.bench import report
from pypeft.bench.runs import QUICK, chosen, run_one
from pypeft.finetune.common import output_dir

PLOTS = {"accuracy_vs_memory.png": ("peak_rss_mib", "peak resident memory of the run (MiB)",
                                    "Test accuracy against peak memory"),
         "accuracy_vs_time.png": ("train_seconds", "training time (s)", "Test accuracy against training time"),
         "accuracy_vs_saved_activations.png": ("saved_mib", "activations saved for backward in a step (MiB)",
                                               "Test accuracy against saved activations")}


def machine() -> str:
    cpus = f"{torch.get_num_threads()} CPU threads"
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return f"{platform.machine()} {platform.system()}, {cpus}{gpu}, torch {torch.__version__}"


def run(methods: str = "all", model: str | None = None, data: str = "bbc", quick: bool = False,
        output: str | None = None, timeout: float | None = None, progress: bool = True,
        extra: list[str] | None = None, out: TextIO | None = None) -> Path:
    """Run the methods, write the report folder and return it."""
    out = out or sys.stdout
    labels = chosen(methods)
    folder = output_dir(output, "bench")
    model = str(Path(model).resolve()) if model else None
    data = str(Path(data).resolve()) if data != "bbc" else data  # the runs start in the report folder
    common = [*(["--model", model] if model else []), "--data", data, *(QUICK if quick else []), *(extra or [])]
    runs = []
    with tqdm(labels, desc="pypeft bench", unit="run", disable=not progress, file=sys.stderr) as bar:
        for label in bar:
            bar.set_postfix(method=label)
            result = run_one(label, folder, common, timeout)
            runs.append(result)
            print(f"{label}: " + (f"accuracy {result.summary.get('accuracy_after')}, "
                                  f"{result.wall_seconds:.0f} s" if result.ok else f"FAILED ({result.error})"),
                  file=out, flush=True)
    table = report.rows(runs)
    plots = []
    try:
        for name, (key, xlabel, title) in PLOTS.items():
            if report.plot_tradeoff(folder / name, table, key, xlabel, title):
                plots.append(name)
        for row in table:
            name = f"confusion_{row['label'].replace('+', '_')}.png"
            if report.plot_confusion(folder / name, row):
                plots.append(name)
    except ImportError:  # the runs' figures are worth keeping without the pictures
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or pypeft[bench])", file=out)
    context = {"model": model or "the default model (all-MiniLM-L6-v2)", "data": data,
               "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
               "command": "pypeft bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["bench"]
               else f"pypeft.bench.command.run(methods={methods!r}, quick={quick})",
               "settings": "--quick: " + " ".join(QUICK) if quick else "the job's defaults", "plots": plots}
    report.write_json(folder / "report.json", table, context)
    report.write_markdown(folder / "report.md", table, context)
    failed = [r.label for r in runs if not r.ok]
    print(f"report: {folder / 'report.md'} ({len(runs) - len(failed)} of {len(runs)} runs"
          + (f"; failed: {', '.join(failed)}" if failed else "") + ")", file=out, flush=True)
    return folder
