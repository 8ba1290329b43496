"""What both `pypeft finetune` tasks (the classifier and the causal LM) share:
the device, the output folder, atomic JSON, peak memory, quiet loading and
the training loop."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import torch
from tqdm.auto import tqdm

import pypeft
from pypeft.counter_hash import counter_hash_dropout
from pypeft.finetune.errors import UsageError
from pypeft.finetune.parallel import Ranks

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


class SavedBytes:
    """Bytes of the distinct non-parameter storages autograd saves for
    backward while the context is open: a step's saved activations (what
    TokenTune and READ cut), whatever the method."""

    def __init__(self, model):
        self.known = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.seen: dict[int, int] = {}
        self._hooks = None

    def _pack(self, t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.known:
            self.seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    def __enter__(self) -> "SavedBytes":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def train_loop(model, n_examples: int, batch_loss: Callable[[list[int]], tuple[torch.Tensor, int]], *,
               lr: float, epochs: int, batch_size: int, seed: int, label: str, progress: bool,
               ranks: Ranks | None = None, measured: dict | None = None,
               dropout_masks: str = "torch") -> tuple[int, float]:
    """AdamW on the trainable parameters (weight decay 0.01, gradients clipped
    to norm 1), linear warm-up over 10% of the steps then linear decay, the
    examples shuffled each epoch with `seed`.

    batch_loss(indices) gives the SUM of the per-item losses of those
    examples and the number of items (rows, or learnt tokens); the step
    minimises their mean over the whole batch. With several ranks each
    computes its share of every batch through the DDP-wrapped model, and its
    sum is divided by the whole batch's count (summed over the ranks) times
    the world size, which DDP's gradient average undoes: the gradients are one
    process's over the whole batch. Each epoch drops the last few examples
    that would leave a rank without a share. Returns (steps, the last
    epoch's mean loss). `measured`, when given, receives the bytes the first
    step saved for backward ("saved_bytes", this rank's share of the batch).
    dropout_masks "counter-hash": the model's dropout draws from pypeft's
    counter hash while it trains (pypeft.counter_hash_dropout), restored after."""
    ranks = ranks or Ranks()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(f"method {label!r} left no trainable parameters")
    if batch_size % ranks.world:
        raise UsageError(f"argument --batch-size: expected a multiple of --nproc {ranks.world} (the batch is split "
                         f"evenly over the processes), got {batch_size}")
    usable = n_examples - n_examples % ranks.world
    if usable == 0:
        raise UsageError(f"{n_examples} training example(s) for {ranks.world} processes; give more data or fewer "
                         "processes")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    per_epoch = math.ceil(usable / batch_size)
    total = per_epoch * epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    generator = torch.Generator().manual_seed(seed)  # the same order on every rank
    model.train()
    mean_loss = float("nan")
    masks = counter_hash_dropout(model) if dropout_masks == "counter-hash" else contextlib.nullcontext()
    with masks, tqdm(total=total, unit="step", disable=not (progress and ranks.main), file=sys.stderr,
                     dynamic_ncols=True) as bar:
        for epoch in range(epochs):
            bar.set_description(f"finetune {label} epoch {epoch + 1}/{epochs}", refresh=False)
            order = torch.randperm(n_examples, generator=generator).tolist()[:usable]
            loss_sum, seen = 0.0, 0
            for start in range(0, len(order), batch_size):
                first = measured is not None and "saved_bytes" not in measured
                with SavedBytes(model) if first else contextlib.nullcontext() as saved:
                    summed, count = batch_loss(ranks.share(order[start:start + batch_size]))
                if first:
                    measured["saved_bytes"] = saved.total
                batch_sum, batch_count = ranks.total(float(summed.detach()), count)
                optimizer.zero_grad(set_to_none=True)
                (summed * (ranks.world / max(batch_count, 1))).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                loss_sum += batch_sum
                seen += int(batch_count)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.4f}")
            mean_loss = loss_sum / max(seen, 1)
    return total, mean_loss


# --- one process of the job (of several with --nproc) ---------------------------------

@contextlib.contextmanager
def job_process(options, out: TextIO | None):
    """(ranks, device, out) for this process: the process group joined when
    launched by torchrun (and left on every exit path), this rank's device,
    the seed set, and `out` for rank 0 (the others' reports are dropped)."""
    device = device_named(options.device)
    ranks = Ranks.join(device, options.nproc)
    try:
        device = ranks.device(device)
        if options.threads is not None:
            torch.set_num_threads(options.threads)
        torch.manual_seed(options.seed)   # new heads' and adapters' initial values, dropout masks: alike on every rank
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.cuda.reset_peak_memory_stats(device)
        yield ranks, device, (out or sys.stdout) if ranks.main else io.StringIO()
    finally:
        ranks.leave()


def shared_output_dir(output: str | None, method: str, ranks: Ranks) -> Path:
    """Rank 0's output folder (made there), known to every rank."""
    path = output_dir(output, method) if ranks.main else None
    return Path(ranks.gathered([str(path)] if ranks.main else [])[0])


def save_on_main(model, output: Path, ranks: Ranks) -> str:
    """Rank 0 saves (save_trained); the others wait for the files."""
    saved = save_trained(model, output) if ranks.main else ""
    ranks.barrier()
    return ranks.gathered([saved] if ranks.main else [])[0]


def memory_figures(device: torch.device, ranks: Ranks) -> dict:
    rss = peak_rss_bytes()
    every = ranks.gathered([rss])
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    figures = {"peak_rss_mib": mib(rss), "cuda_peak_allocated_mib": mib(cuda_peak)}
    if ranks.world > 1:
        figures["processes"] = ranks.world
        figures["peak_rss_mib_all_processes"] = None if None in every else mib(sum(every))
    return figures


def print_report_tail(out: TextIO, summary: dict, saved: str) -> None:
    """The lines both tasks end with, then the summary as one JSON line."""
    trainable, total = summary["trainable_params"], summary["total_params"]
    print(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)", file=out)
    print(f"training time: {summary['train_seconds']:.1f} s ({summary['steps']} steps; "
          f"{summary['total_seconds']:.1f} s in all)", file=out)
    rss = summary["peak_rss_mib"]
    memory = f"peak memory: {rss} MiB RSS" if rss is not None else "peak memory: RSS not measurable here"
    if summary.get("processes"):
        memory += (f" (rank 0; {summary['processes']} processes: "
                   f"{summary['peak_rss_mib_all_processes']} MiB together)")
    if summary["cuda_peak_allocated_mib"] is not None:
        memory += f", {summary['cuda_peak_allocated_mib']} MiB CUDA allocated"
    print(memory, file=out)
    print(f"{saved} saved to: {summary['adapter_dir']}", file=out)
    print(json.dumps(summary), file=out, flush=True)
