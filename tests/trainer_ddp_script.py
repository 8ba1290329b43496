"""Run by tests/test_trainer.py under torchrun on two CPU processes (gloo):
PypeftTrainer trains LoRA on a tiny Llama for two steps, rank 0 saves the
adapter to <dir>/out, and every rank writes <dir>/rank-<r>.json (its rank,
the world size, the steps run, and per key the sum of its adapter tensors)."""

import json
import os
import sys

import torch
import transformers

import pypeft
from pypeft.io import adapter_state_dict

sys.path.insert(0, os.path.dirname(__file__))
import tiny_models as T  # noqa: E402


def main(directory: str) -> None:
    model = pypeft.patch(T.make("llama"), method="lora", r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, T.VOCAB, (8, 8), generator=g)
    data = [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long), "labels": i} for i in ids]
    args = transformers.TrainingArguments(os.path.join(directory, "run"), per_device_train_batch_size=2, max_steps=2,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          ddp_backend="gloo", seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = pypeft.PypeftTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(os.path.join(directory, "out"))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sums = {k: v.double().sum().item() for k, v in adapter_state_dict(model, "default").items()}
    with open(os.path.join(directory, f"rank-{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world_size": world, "steps": trainer.state.global_step, "adapter": sums}, f)


if __name__ == "__main__":
    main(sys.argv[1])
