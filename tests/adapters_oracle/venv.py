"""A virtual environment of its own for the `adapters` library (AdapterHub), the
oracle for bottleneck adapters and AdapterFusion.

adapters 1.3 pins transformers ~=4.57.6, and pypeft needs transformers 5, so the
oracle cannot share pypeft's venv: the tests make (or reuse) this one and drive
it through a subprocess (driver.py). It is made once per set of pins, under a
cache directory, atomically (built in a temporary directory beside it, renamed
into place) and under a file lock, so that concurrent pytest workers neither
race nor see a half-made venv.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Exact pins. adapters 1.3.0 is the latest 1.3.x and requires transformers
# ~=4.57.6; torch 2.13.0 is the CPU build the README installs (it works with
# both); safetensors is the version transformers 4.57 resolves to here.
PINS = {
    "adapters": "1.3.0",
    "transformers": "4.57.6",
    "torch": "2.13.0",
    "safetensors": "0.8.0",
}

# The whole venv path (made there if missing, reused if it holds these pins).
VENV_ENV = "PYPEFT_ADAPTERS_VENV"
# The cache directory that holds one venv per set of pins.
CACHE_ENV = "PYPEFT_CACHE_DIR"
# Written last, after the venv imported the oracle with the pinned versions.
MARKER = "pypeft-adapters-oracle.json"
# Generous: a cold pip cache downloads transformers and its dependencies.
MAKE_TIMEOUT_S = 1800


class OracleUnavailable(RuntimeError):
    """The oracle venv could not be made here; the message is the reason."""


def _key() -> str:
    pins = json.dumps({"pins": PINS, "python": list(sys.version_info[:2])}, sort_keys=True)
    return hashlib.sha256(pins.encode()).hexdigest()[:12]


def venv_path() -> Path:
    """Where the oracle venv lives: $PYPEFT_ADAPTERS_VENV, else a directory
    named by the pins under $PYPEFT_CACHE_DIR (default ~/.cache/pypeft)."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV]).expanduser().absolute()
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pypeft").expanduser()
    return cache.absolute() / f"adapters-oracle-py{sys.version_info[0]}{sys.version_info[1]}-{_key()}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _ready(venv: Path) -> bool:
    try:
        marker = json.loads((venv / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("pins") == PINS and _python(venv).exists()


# Run by the new venv's python: the installed versions of the pinned packages,
# after importing the oracle the way the driver does.
_VERIFY = """
import importlib.metadata as md, json, sys
import torch, transformers, adapters, safetensors
print(json.dumps({name: md.version(name) for name in sys.argv[1:]}))
"""


def _run(cmd: list, what: str, deadline: float) -> str:
    left = deadline - time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(left, 1),
                              env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    except subprocess.TimeoutExpired:
        raise OracleUnavailable(f"{what} did not finish within {MAKE_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise OracleUnavailable(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def _installed(python: Path, what: str, deadline: float) -> dict:
    """Imports the oracle with `python`; the installed versions of the pins, or
    OracleUnavailable naming those that differ."""
    out = _run([str(python), "-c", _VERIFY, *PINS], what, deadline)
    got = json.loads(out.strip().splitlines()[-1])
    # torch reports "2.13.0+cpu" for "2.13.0".
    wrong = {n: got[n] for n in PINS if got[n].split("+")[0] != PINS[n]}
    if wrong:
        raise OracleUnavailable(f"{python} has other versions than pinned: {wrong} (pins {PINS})")
    return got


def _make(venv: Path) -> None:
    deadline = time.monotonic() + MAKE_TIMEOUT_S
    for stale in venv.parent.glob(f".{venv.name}.tmp-*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.tmp-", dir=venv.parent))
    try:
        _run([sys.executable, "-m", "venv", str(tmp)], "python -m venv", deadline)
        pins = [f"{name}=={version}" for name, version in PINS.items()]
        _run([str(_python(tmp)), "-m", "pip", "install", "-q", *pins], f"pip install {' '.join(pins)}", deadline)
        got = _installed(_python(tmp), "importing adapters in the new venv", deadline)
        (tmp / MARKER).write_text(json.dumps({"pins": PINS, "installed": got}, indent=1))
        # A venv's interpreter finds its site-packages relative to pyvenv.cfg, so
        # the renamed venv works (only pip's own entry-point scripts name the
        # temporary path, and we always run `python -m pip`).
        if venv.exists():  # ours (it has a marker), made for other pins
            shutil.rmtree(venv)
        os.rename(tmp, venv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _adopt(venv: Path) -> None:
    """A venv at $PYPEFT_ADAPTERS_VENV that these tests did not make (no
    marker): used as it is if it holds the pins, never changed or removed."""
    # A wrong venv named on purpose is a mistake to show, not a reason to skip.
    hint = f"{VENV_ENV}={venv} was not made by these tests; fix it, or name a path that does not exist yet"
    if not _python(venv).exists():
        raise RuntimeError(f"{hint}: it has no bin/python")
    try:
        _installed(_python(venv), f"importing adapters with {_python(venv)}", time.monotonic() + 300)
    except OracleUnavailable as exc:
        raise RuntimeError(f"{hint}: {exc}") from None


_failure: str | None = None  # one failed attempt per process, not one per test module
_made_s: float | None = None  # how long this process took to make the venv (None: reused)
_used: Path | None = None


def summary() -> str | None:
    """One line for the end of a test run: whether the oracle venv was made
    (and in how many seconds), reused, or could not be made. None if unused."""
    if _failure is not None:
        return f"adapters oracle: NOT AVAILABLE, its tests skipped: {_failure.splitlines()[0]}"
    if _used is None:
        return None
    if _made_s is None:
        return f"adapters oracle: reused the venv at {_used}"
    return f"adapters oracle: made the venv at {_used} in {_made_s:.0f} s"


def oracle_python() -> Path:
    """The oracle venv's python, making the venv first if needed.

    Raises OracleUnavailable with the reason when it cannot be made (no
    registry, a pin that cannot be installed, a disk error)."""
    global _failure, _made_s, _used
    if _failure is not None:
        raise OracleUnavailable(_failure)
    venv = venv_path()
    if venv == _used or _ready(venv):
        _used = venv
        return _python(venv)
    # Ours appear whole, marker included (made aside, then renamed), so a venv
    # without one was made by someone else: no lock needed to look at it.
    if venv.exists() and not (venv / MARKER).exists():
        _adopt(venv)
        _used = venv
        return _python(venv)
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        with open(venv.parent / f".{venv.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making it: wait, then reuse
            if not _ready(venv):
                t0 = time.monotonic()
                print(f"\nmaking the adapters oracle venv at {venv} ...", file=sys.stderr, flush=True)
                _make(venv)
                _made_s = time.monotonic() - t0
                print(f"made the adapters oracle venv in {_made_s:.0f} s", file=sys.stderr, flush=True)
    except OracleUnavailable as exc:
        _failure = f"the adapters oracle venv ({venv}) cannot be made: {exc}"
        raise OracleUnavailable(_failure) from None
    except OSError as exc:
        _failure = f"the adapters oracle venv ({venv}) cannot be made: {type(exc).__name__}: {exc}"
        raise OracleUnavailable(_failure) from None
    _used = venv
    return _python(venv)


if __name__ == "__main__":  # make it ahead of a test run: python tests/adapters_oracle/venv.py
    print(oracle_python())
