"""The `pypeft finetune` job: fine-tune a sequence classifier with a PEFT method.

    from pypeft.finetune import FinetuneOptions, run
    summary = run(FinetuneOptions(method="lora", data="bbc", epochs=2))

data.py loads and splits the text-classification data (the bundled BBC News
corpus, or a CSV / JSONL file); train.py loads the model, patches it with
pypeft.patch, trains, evaluates and reports.
"""

from pypeft.finetune.errors import UsageError
from pypeft.finetune.train import FinetuneOptions, run

__all__ = ["FinetuneOptions", "UsageError", "run"]
