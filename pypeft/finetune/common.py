"""What both `pypeft finetune` tasks (the classifier and the causal LM) share:
the device, the output folder, atomic JSON, peak memory, quiet loading and
the training loop."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

import pypeft
from pypeft.finetune.errors import UsageError

DEFAULT_OUTPUT_ROOT = "pypeft-output"
RECORD_FILE = "finetune.json"     # the run's settings and results


def device_named(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"argument --device: expected auto, cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("argument --device: cuda was asked for, but torch sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"argument --device: expected auto, cpu or cuda[:N], got {name!r}")
    return device


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def quiet_transformers():
    """Hide transformers' load-time chatter (the "newly initialized: classifier"
    notice, weight-loading bars); the job reports what matters itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (None where the platform has no getrusage)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


def output_dir(output: str | None, method: str) -> Path:
    """The folder to save into (created): `output`, or ./pypeft-output/<method>-<timestamp>."""
    if output is not None:
        path = Path(output)
    else:
        path = Path(DEFAULT_OUTPUT_ROOT) / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise UsageError(f"argument --output: expected a directory to save into, got a file: {path}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"argument --output: expected a directory that can be created, got {path}: "
                         f"cannot create it ({exc.strerror or exc})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"argument --output: expected a writable directory, got {path}: not writable")
    return path.resolve()


def write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def save_trained(model, output: Path) -> str:
    """The adapter (PEFT's format), or the whole model when every weight
    trained (full fine-tuning, TokenTune alone); says which."""
    state = getattr(model, "pypeft", None)
    if state is not None and state.adapters:
        pypeft.save_adapter(model, output)
        return "adapter"
    if state is not None:
        pypeft.unpatch(model)  # the plain model, with its trained weights
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, output / f.name)
    tmp.rmdir()
    return "model"


def train_loop(model, n_examples: int, batch_loss: Callable[[list[int]], tuple[torch.Tensor, int]], *,
               lr: float, epochs: int, batch_size: int, seed: int, label: str, progress: bool
               ) -> tuple[int, float]:
    """AdamW on the trainable parameters (weight decay 0.01, gradients clipped
    to norm 1), linear warm-up over 10% of the steps then linear decay, the
    examples shuffled each epoch with `seed`. batch_loss(indices) gives the
    batch's mean loss and how many items it averages over (examples or
    tokens), so the reported loss is the mean over items. Returns (steps, the
    last epoch's mean loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(f"method {label!r} left no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    per_epoch = math.ceil(n_examples / batch_size)
    total = per_epoch * epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    mean_loss = float("nan")
    with tqdm(total=total, unit="step", disable=not progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            bar.set_description(f"finetune {label} epoch {epoch + 1}/{epochs}", refresh=False)
            order = torch.randperm(n_examples, generator=generator).tolist()
            loss_sum, seen = 0.0, 0
            for start in range(0, len(order), batch_size):
                loss, count = batch_loss(order[start:start + batch_size])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * count
                seen += count
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}")
            mean_loss = loss_sum / max(seen, 1)
    return total, mean_loss
