"""The runs of `pypeft bench`: one `pypeft finetune` process each (a fresh
process: its peak RSS is its own), its JSON summary read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pypeft.finetune.errors import UsageError

# label -> (--method, --quantize). Full fine-tuning first: the ratios are to it.
RUNS: dict[str, tuple[str, str | None]] = {
    "full": ("full", None),
    "lora": ("lora", None),
    "vera": ("vera", None),
    "tokentune": ("tokentune", None),
    "read": ("read", None),
    "bitfit": ("bitfit", None),
    "bottleneck": ("bottleneck", None),
    "prompt_tuning": ("prompt_tuning", None),
    "p_tuning": ("p_tuning", None),
    "prefix_tuning": ("prefix_tuning", None),
    "lora+tokentune": ("lora+tokentune", None),
    "qlora": ("lora", "nf4"),
    "qlora+tokentune": ("lora+tokentune", "nf4"),
}
BASELINE = "full"
# --quick: a stratified part of the data, one epoch, short texts (a few minutes for every run on 2 CPU cores).
QUICK = ["--max-train-samples", "200", "--max-test-samples", "100", "--epochs", "1", "--max-length", "32"]
NOT_FILES = {"finetune.json", "labels.json"}  # the job's record, not the trained artefact


@dataclass
class Run:
    label: str
    method: str
    quantize: str | None
    summary: dict = field(default_factory=dict)   # the job's JSON summary
    error: str | None = None                      # why it failed (its last line on stderr)
    wall_seconds: float = 0.0
    disk_bytes: int | None = None                 # the adapter (or the whole model) on disk

    @property
    def ok(self) -> bool:
        return self.error is None


def chosen(methods: str) -> list[str]:
    """'all' or a comma-separated list of RUNS' labels."""
    if methods == "all":
        return list(RUNS)
    labels = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in labels if m not in RUNS]
    if unknown or not labels:
        raise UsageError(f"argument --methods: expected 'all' or some of {', '.join(RUNS)} (comma-separated), "
                         f"got {methods!r}")
    return labels


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.name not in NOT_FILES)


def run_one(label: str, out_dir: Path, common: list[str], timeout: float | None) -> Run:
    """`pypeft finetune` for one label in a fresh process; a failure is kept in the Run."""
    method, quantize = RUNS[label]
    run = Run(label, method, quantize)
    target = out_dir / "runs" / label.replace("+", "_")
    argv = [sys.executable, "-m", "pypeft", "finetune", "--no-progress", "--method", method, "--output", str(target),
            *(["--quantize", quantize] if quantize else []), *common]
    started = time.perf_counter()
    try:
        # From the output folder, not the caller's directory: a source checkout there would shadow the installed
        # pypeft (and its built ops) in `python -m pypeft`. The caller's paths are made absolute (command.py).
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=dict(os.environ),
                              cwd=out_dir)
    except subprocess.TimeoutExpired:
        run.error = f"did not finish within {timeout:.0f} s"
        return run
    finally:
        run.wall_seconds = time.perf_counter() - started
    (target.parent / f"{target.name}.log").write_text(done.stdout + done.stderr)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        run.error = f"exit {done.returncode}: {tail}"
        return run
    try:
        run.summary = json.loads(lines[-1])
    except json.JSONDecodeError:
        run.error = f"no JSON summary (last line: {lines[-1][:120]})"
        return run
    run.disk_bytes = _disk_bytes(target)
    return run
