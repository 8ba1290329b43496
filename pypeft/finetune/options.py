"""The settings of `pypeft finetune`, for both tasks, and their checks.

Some defaults depend on the task (a short-text classifier and a causal LM
want different lengths, batches and epochs): those fields default to None
and `resolved()` fills them from TASK_DEFAULTS."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

from pypeft.finetune.errors import UsageError

CLASSIFY = "classify"
CAUSAL_LM = "causal-lm"
TASKS = (CLASSIFY, CAUSAL_LM)
LOSS_ON = ("response", "all")   # --loss-on: which tokens of a causal-LM example the loss covers

# Every seed torch.manual_seed takes (negative ones are mapped to 2**64 + seed);
# random.Random, which splits the data, takes any integer.
SEED_RANGE = (-2**63, 2**64 - 1)
# --dropout-masks: how the model's dropout draws its masks while training (pypeft.counter_hash_dropout): the same
# law either way; the counter hash is the cheaper draw and keeps no mask for backward.
DROPOUT_MASKS = ("counter-hash", "torch")
QUANTIZE_METHODS = ("nf4",)  # what --quantize takes (pypeft.quantize's methods)

# What a field left at None means for each task. The causal-LM figures fit
# the BBC-as-instruction demo on SmolLM2-135M into 10 minutes on 2 CPU cores
# (benchmarks/RESULTS.md: 0.00 -> 0.94 exact match in 6 min 47 s): 128 tokens
# keep an article's headline and first sentence, which name its category; one
# epoch over 400 articles teaches LoRA the answer format and the categories;
# 200 held-out articles measure it.
TASK_DEFAULTS: dict[str, dict] = {
    CLASSIFY: {"epochs": 2, "batch_size": 16, "max_length": 64},
    CAUSAL_LM: {"epochs": 1, "batch_size": 8, "max_length": 128},
}
# Applied only to the bundled BBC data (the demo), where the whole split would take an hour on a CPU.
CAUSAL_BBC_SAMPLES = {"max_train_samples": 400, "max_test_samples": 200}


def max_threads() -> int:
    """The most CPU threads --threads may ask for: more than the CPUs only
    oversubscribes them, and far more makes thread creation fail (a crash)."""
    return os.cpu_count() or 1


@dataclass
class FinetuneOptions:
    method: str = "lora"                  # a method, 'full', or a composition such as 'lora+tokentune'
    task: str = CLASSIFY                  # "classify" or "causal-lm"
    model: str | None = None              # a local model directory; None: the task's bundled model
    data: str = "bbc"                     # "bbc" or a data file
    text_column: str = "text"             # classify: the columns of a CSV/JSONL file
    label_column: str = "label"
    test_fraction: float = 0.2
    test_data: str | None = None          # a file to test on instead of a held-out fraction of `data`
    max_train_samples: int | None = None  # train on at most this many (a stratified subset of the train split)
    max_test_samples: int | None = None   # evaluate on at most this many (a stratified subset of the test split)
    epochs: int | None = None             # None: the task's default (TASK_DEFAULTS)
    lr: float | None = None               # None: the method's default (methods.METHOD_LR, else DEFAULT_LR)
    batch_size: int | None = None         # None: the task's default
    max_length: int | None = None         # tokens per example (longer ones are shortened); None: the task's default
    seed: int = 0
    output: str | None = None             # None: ./pypeft-output/<method>-<timestamp>
    device: str = "auto"                  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    threads: int | None = None            # CPU threads for torch; None: torch's default
    progress: bool = True
    quantize: str | None = None           # "nf4": the frozen linear layers in NF4 before patching (QLoRA)
    loss_on: str = "response"             # causal-lm: "response" (the answer's tokens) or "all" tokens
    max_new_tokens: int | None = None     # causal-lm: greedy answer length; None: the longest test answer + 4
    dropout_masks: str = "counter-hash"   # the model's dropout while training: pypeft's counter hash, or torch's RNG
    nproc: int = 1                        # data-parallel processes (parallel.py); under torchrun: its WORLD_SIZE
    method_options: dict = field(default_factory=dict)   # r, alpha, dropout, ...: passed to pypeft.patch


def resolved(options: FinetuneOptions) -> FinetuneOptions:
    """A copy with every None that has a task default filled in."""
    check(options)
    filled = {k: v for k, v in TASK_DEFAULTS[options.task].items() if getattr(options, k) is None}
    if options.task == CAUSAL_LM and options.data == "bbc":
        filled.update({k: v for k, v in CAUSAL_BBC_SAMPLES.items() if getattr(options, k) is None})
    return dataclasses.replace(options, **filled)


def check(options: FinetuneOptions) -> None:
    def need(ok: bool, flag: str, expected: str, got) -> None:
        if not ok:
            raise UsageError(f"argument {flag}: expected {expected}, got {got!r}")

    def at_least(value, low: int) -> bool:
        return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= low)

    need(isinstance(options.method, str) and options.method != "", "--method", "a method name", options.method)
    need(options.task in TASKS, "--task", f"one of {list(TASKS)}", options.task)
    need(at_least(options.epochs, 1), "--epochs", "an integer >= 1", options.epochs)
    need(options.lr is None or (math.isfinite(options.lr) and options.lr > 0), "--lr", "a number > 0", options.lr)
    need(at_least(options.batch_size, 1), "--batch-size", "an integer >= 1", options.batch_size)
    need(at_least(options.max_length, 2), "--max-length", "an integer >= 2", options.max_length)
    need(0.0 < options.test_fraction < 1.0, "--test-fraction", "a number in (0, 1)", options.test_fraction)
    for flag, value in (("--max-train-samples", options.max_train_samples),
                        ("--max-test-samples", options.max_test_samples)):
        need(at_least(value, 1), flag, "an integer >= 1", value)
    need(options.threads is None or 1 <= options.threads <= max_threads(), "--threads",
         f"an integer in [1, {max_threads()}]", options.threads)
    need(isinstance(options.seed, int) and SEED_RANGE[0] <= options.seed <= SEED_RANGE[1], "--seed",
         "an integer in [-2**63, 2**64 - 1]", options.seed)
    need(options.quantize in (None,) + QUANTIZE_METHODS, "--quantize", f"one of {list(QUANTIZE_METHODS)}",
         options.quantize)
    need(options.loss_on in LOSS_ON, "--loss-on", f"one of {list(LOSS_ON)}", options.loss_on)
    need(options.dropout_masks in DROPOUT_MASKS, "--dropout-masks", f"one of {list(DROPOUT_MASKS)}",
         options.dropout_masks)
    need(at_least(options.nproc, 1), "--nproc", "an integer >= 1", options.nproc)
    need(at_least(options.max_new_tokens, 1), "--max-new-tokens", "an integer >= 1", options.max_new_tokens)
    from pypeft.finetune.methods import FULL_FINETUNING, parts

    need(options.quantize is None or FULL_FINETUNING not in parts(options.method), "--quantize",
         f"no quantisation with --method {FULL_FINETUNING} (quantised weights are frozen; train an adapter over "
         "them)", options.quantize)
