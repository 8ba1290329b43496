"""The `pypeft finetune` job: fine-tune a model with a PEFT method and report.

    from pypeft.finetune import FinetuneOptions, run
    summary = run(FinetuneOptions(method="lora", data="bbc", epochs=2))
    summary = run(FinetuneOptions(task="causal-lm", method="lora+tokentune"))

Two tasks: "classify" (train.py: a sequence classifier on labelled texts,
data.py) and "causal-lm" (causal_lm.py: a causal LM on conversations,
chat_data.py and chat_encoding.py). options.py holds the settings, methods.py
what --method means (compositions, defaults), common.py the shared loop and
report pieces.
"""

from typing import TextIO

from pypeft.finetune.errors import UsageError
from pypeft.finetune.options import CAUSAL_LM, CLASSIFY, FinetuneOptions


def run(options: FinetuneOptions, out: TextIO | None = None) -> dict:
    """Run the job options.task names; returns its summary."""
    if options.task == CAUSAL_LM:
        from pypeft.finetune import causal_lm
        return causal_lm.run(options, out)
    from pypeft.finetune import train
    return train.run(options, out)


__all__ = ["CAUSAL_LM", "CLASSIFY", "FinetuneOptions", "UsageError", "run"]
