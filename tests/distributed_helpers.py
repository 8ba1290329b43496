"""Run a worker in 2 real processes (gloo on 127.0.0.1, a free port), as
torch.distributed jobs do, and the cases the DDP / FSDP2 tests share.

    results = run_ranks(worker, tmp_path, arg1, ...)   # [rank 0's return, rank 1's]

`worker(rank, world_size, tmp_path, *args)` runs in each process after
init_process_group; what it returns is torch.save'd per rank and loaded here
(tensors, dicts of tensors, strings). A worker that raises fails the test
with its traceback (torch.multiprocessing's ProcessRaisedException); one
that outlives `timeout` is killed and the test fails saying so. Workers
must be module-level functions (spawn pickles them by name).

Each process runs with one thread: the machines these tests run on are small
and shared.
"""

from __future__ import annotations

import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tiny_models

WORLD = 2
PER_RANK = 2  # batch rows per rank; the one-process reference runs WORLD * PER_RANK rows
TOL = dict(atol=1e-6, rtol=1e-5)  # fp32: the union batch sums the same terms in another order


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, worker, world_size, port, out, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = worker(rank, world_size, Path(out), *args)
        torch.save(result, Path(out) / f"rank{rank}.result.pt")
    finally:
        dist.destroy_process_group()


def run_ranks(worker, tmp_path, *args, world_size: int = WORLD, timeout: float = 120.0) -> list:
    """worker's return value on each rank, in rank order."""
    context = mp.start_processes(_entry, args=(worker, world_size, free_port(), str(tmp_path), args),
                                 nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"run_ranks: {worker.__name__} did not finish within {timeout:.0f} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(Path(tmp_path) / f"rank{r}.result.pt", weights_only=False) for r in range(world_size)]


# --- the cases ---------------------------------------------------------------------------

FAMILY = "bert"  # a sequence classifier: its loss is a mean over rows, so DDP's mean of means is the union's mean
# The decoder and encoder-decoder families users fine-tune most, with the model's own LM loss: a mean over
# label tokens, so every rank must hold as many as the others (no -100 in the labels; the same length on
# each rank) for DDP's mean of the ranks' means to be the union's mean (test_distributed_families checks it).
LM_FAMILIES = ("llama", "t5")
BATCH_SEED = 5


def run_cases(cases, step, rank) -> dict:
    """{case: step(case, rank)} on this rank, a failing case recorded as its
    traceback (a rank that stopped early would hang the other's collectives),
    the ranks meeting at a barrier after each."""
    import traceback

    out = {}
    for case in cases:
        try:
            out[case] = step(case, rank)
        except Exception:
            out[case] = traceback.format_exc()
        dist.barrier()
    return out


def union_batch(family: str = FAMILY) -> dict:
    """WORLD * PER_RANK rows with labels; rank r runs rows [r * PER_RANK, (r + 1) * PER_RANK).
    A classifier gets class labels; a causal LM its input ids (every position, padded ones
    too: the ranks' label-token counts stay equal); T5 its decoder ids as labels."""
    batch = tiny_models.inputs(family, batch=WORLD * PER_RANK, length=7, seed=BATCH_SEED)
    if family == FAMILY:
        batch["labels"] = torch.arange(WORLD * PER_RANK) % 3
        return batch
    return tiny_models.labels_for(family, batch)


def rank_batch(rank: int, family: str = FAMILY) -> dict:
    return {k: v[rank * PER_RANK:(rank + 1) * PER_RANK] for k, v in union_batch(family).items()}


def no_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        # Attention dropout some families keep as a float they pass to the attention function in
        # training mode (T5Attention.dropout, LlamaAttention.attention_dropout), not as a module.
        for attr in ("dropout", "attention_dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return model


def randomise_trainable(model, seed: int = 3) -> None:
    """Trained-looking adapters (LoRA's B, READ's output start at zero, which would hide gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad and p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


TOKENTUNE_SEED = 11
# name -> what build() does: "nf4" quantises the base first; then each (method, options) patch in turn.
CASES = {
    "lora": [("lora", dict(r=4, alpha=8, dropout=0.0))],
    "vera": [("vera", dict(r=8))],
    "tokentune": [("tokentune", dict(k=3, seed=TOKENTUNE_SEED))],
    "lora+tokentune": [("lora", dict(r=4, alpha=8, dropout=0.0)), ("tokentune", dict(k=3, seed=TOKENTUNE_SEED))],
    "read": [("read", {})],
    "bitfit": [("bitfit", {})],
    "bottleneck": [("bottleneck", dict(preset="pfeiffer"))],
    "fusion": [("bottleneck", dict(preset="pfeiffer", adapter_name="a")),
               ("bottleneck", dict(preset="pfeiffer", adapter_name="b")),
               ("fusion", dict(adapters=["a", "b"], dropout_prob=0.0))],
    "prompt_tuning": [("prompt_tuning", dict(num_virtual_tokens=3))],
    "p_tuning": [("p_tuning", dict(num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8))],
    "prefix_tuning": [("prefix_tuning", dict(num_virtual_tokens=3))],
    "nf4+lora": ["nf4", ("lora", dict(r=4, alpha=8, dropout=0.0))],
}
# Llama and T5 have no biases: BitFit adds them (zeros, then randomised like any trainable tensor).
_BITFIT_ADDED = {"bitfit": [("bitfit", dict(add_missing_biases=True))]}
# What pypeft refuses on T5 at patch (test_distributed_families checks that it says so): TokenTune
# runs one sequence's tokens, T5 has two; bottleneck adapters (and so fusion) sit in one stack of layers.
T5_REFUSED = ("tokentune", "lora+tokentune", "bottleneck", "fusion")
FAMILY_CASES = {
    "bert": CASES,
    "llama": {**CASES, **_BITFIT_ADDED},
    "t5": {k: v for k, v in {**CASES, **_BITFIT_ADDED}.items() if k not in T5_REFUSED},
}
# (family, case) for the tests' parametrize: ids read "llama-lora".
FAMILY_CASE_PAIRS = [(family, case) for family, cases in FAMILY_CASES.items() for case in cases]
# The default test run (CI) starts one pair of processes per test file: the BERT classifier's, which runs every
# method; the decoder and encoder-decoder families' pairs run with -m slow.
FAMILY_CASE_PARAMS = [pytest.param(family, case, marks=() if family == FAMILY else pytest.mark.slow)
                      for family, case in FAMILY_CASE_PAIRS]


def build(case: str, tokentune_seed: int | None = None, randomise_seed: int = 3, family: str = FAMILY):
    """The family's tiny model patched as FAMILY_CASES[family][case] says,
    dropout off, in training mode, trainable tensors randomised; the same in
    every process."""
    import pypeft

    model = no_dropout(tiny_models.make(family, seed=0))
    for step in FAMILY_CASES[family][case]:
        if step == "nf4":
            pypeft.quantize(model)
            continue
        method, options = step
        if method == "tokentune" and tokentune_seed is not None:
            options = {**options, "seed": tokentune_seed}
        pypeft.patch(model, method=method, **options)
    model.train()
    randomise_trainable(model, randomise_seed)
    return model


def reference_grads(case: str, family: str = FAMILY) -> dict[str, torch.Tensor]:
    """One process, the union batch, mean loss: the gradients DDP must give.
    TokenTune draws rank r's selection from seed + r: the reference runs each
    rank's rows on a model seeded so and averages (the mean over the union
    when every rank has as many rows)."""
    if not any(step[0] == "tokentune" for step in FAMILY_CASES[family][case] if step != "nf4"):
        model = build(case, family=family)
        model(**union_batch(family)).loss.backward()
        return trainable_grads(model)
    total = None
    for rank in range(WORLD):
        model = build(case, tokentune_seed=TOKENTUNE_SEED + rank, family=family)
        (model(**rank_batch(rank, family)).loss / WORLD).backward()
        grads = trainable_grads(model)
        total = grads if total is None else {k: total[k] + grads[k] for k in total}
    return total


def two_lora_adapters():
    """LoRA adapters "a" (r=2) and "b" (r=4) on the tiny model, "b" active, dropout off, training mode."""
    import pypeft

    model = no_dropout(tiny_models.make(FAMILY, seed=0))
    pypeft.patch(model, method="lora", r=2, alpha=4, dropout=0.0, adapter_name="a")
    pypeft.patch(model, method="lora", r=4, alpha=8, dropout=0.0, adapter_name="b")
    randomise_trainable(model)  # "b" only: "a" is frozen while "b" is active
    pypeft.set_adapter(model, "a")
    randomise_trainable(model, seed=4)
    pypeft.set_adapter(model, "b")
    return model.train()


def sgd_step(model, batch, lr: float = 0.5) -> None:
    """One plain SGD step on the trainable parameters (the model may be DDP-wrapped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    model(**batch).loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


MIXED_ROWS = ["a", "base", "b", "a"]  # union batch's rows; rank r takes its PER_RANK
