"""The `adapters` library (AdapterHub) as a test oracle, run in a venv of its own.

    from adapters_oracle import run_oracle, write_inputs, read_output

    write_inputs(tmp / "in.safetensors", batch)
    res = run_oracle([{"id": "a", "model_dir": str(tmp / "bert"), "add_adapters": [...],
                       "active": "a", "inputs": str(tmp / "in.safetensors"),
                       "output": str(tmp / "out.safetensors")}], tmp)
    expected = read_output(tmp / "out.safetensors")

driver.py's docstring lists what a case may ask for, and FORMAT.md what the
library writes. run_oracle skips the calling test (with the reason) only when
the oracle venv cannot be made here; a driver that fails, or a case that raises
inside the library, fails the test.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .venv import OracleUnavailable, oracle_python, venv_path

DRIVER = Path(__file__).with_name("driver.py")
# A job's cases share one interpreter; the slowest seen here is well under a minute.
TIMEOUT_S = 600

__all__ = ["OracleError", "OracleUnavailable", "oracle_python", "venv_path", "run_oracle", "write_inputs",
           "read_output"]


class OracleError(AssertionError):
    """The driver, or a case inside it, failed: a test failure, not a skip."""


def python_or_skip() -> Path:
    """The oracle venv's python; skips the calling test when it cannot be made."""
    try:
        return oracle_python()
    except OracleUnavailable as exc:
        import pytest

        pytest.skip(str(exc))


def run_oracle(cases: list[dict], workdir, *, check: bool = True, timeout: float = TIMEOUT_S) -> dict:
    """Runs every case in one driver process and returns {"versions": ...,
    "cases": {id: result}}. With check (default) a case that raised is an
    OracleError naming it and its traceback; with check=False its result holds
    "error" (for tests in which the library is expected to refuse)."""
    ids = [c.get("id") for c in cases]
    if any(not isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"cases: expected a unique str 'id' in every case, got {ids}")
    python = python_or_skip()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    job, out = workdir / "oracle-job.json", workdir / "oracle-results.json"
    job.write_text(json.dumps({"cases": cases}, indent=1))
    out.unlink(missing_ok=True)
    try:
        proc = subprocess.run([str(python), str(DRIVER), str(job), str(out)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise OracleError(f"the adapters oracle driver ran past {timeout} s on {job}:\n{exc.stderr}") from None
    if proc.returncode != 0 or not out.exists():
        raise OracleError(f"the adapters oracle driver failed (exit {proc.returncode}) on {job}:\n"
                          f"{proc.stdout}\n{proc.stderr}")
    results = json.loads(out.read_text())
    failed = {i: r["error"] for i, r in results["cases"].items() if "error" in r}
    if check and failed:
        raise OracleError("the adapters library raised in case(s) " + ", ".join(failed) + ":\n"
                          + "\n".join(f"--- {i}:\n{tb}" for i, tb in failed.items()))
    return results


def write_inputs(path, batch: dict) -> Path:
    """Saves a model's input tensors (input_ids, attention_mask, ...) for a case's "inputs"."""
    path = Path(path)
    save_file({k: v.contiguous() for k, v in batch.items() if isinstance(v, torch.Tensor)}, str(path))
    return path


def read_output(path) -> torch.Tensor:
    """The tensor a case saved as its "output" (last_hidden_state or logits)."""
    return load_file(str(path))["output"]
