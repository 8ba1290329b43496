"""Measuring helpers shared by the benchmark scripts (DESIGN.md, "Measuring").

Time: candidates alternate in one process, round after round, and we report
medians and ratios; absolute times count only on a GPU. Memory: bytes of the
distinct storages saved for backward during one forward, parameters excluded.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from typing import Callable

import torch


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def add_device_options(parser, default_device: str = "cpu") -> None:
    """--device and --dtype, the same in every benchmark. On CUDA each timed call
    is bracketed by torch.cuda.synchronize(), so a time is the call's wall time
    with its kernels finished."""
    parser.add_argument("--device", default=default_device, help=f"cpu or cuda[:N] (default: {default_device})")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="dtype of the model's weights and activations; adapters follow PEFT "
                             "(float32 on a bfloat16/float16 model). Default: float32; bfloat16 on CUDA is the "
                             "usual training setting")


def minilm_shaped(dropout: float, num_labels: int = 5, dtype: torch.dtype = torch.float32):
    """A BERT classifier shaped as all-MiniLM-L6-v2 (6 layers, hidden 384, 12
    heads, FFN 1536), random weights, seed 0, on the CPU (the same weights
    whatever the device it moves to), cast to dtype."""
    import transformers

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                  intermediate_size=1536, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout, num_labels=num_labels)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).to(dtype)


def classification_batch(batch: int, seq: int, num_labels: int = 5, device: torch.device | str = "cpu") -> dict:
    """Random token ids and labels for minilm_shaped, seed 0 (drawn on the CPU:
    the same batch on every device)."""
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 30522, (batch, seq), generator=g).to(device),
            "labels": torch.randint(0, num_labels, (batch,), generator=g).to(device)}


def reference_models(base) -> dict:
    """Full fine-tuning, and the floor for any adapter: every weight frozen,
    gradients flowing back to the embeddings."""
    import copy

    frozen = copy.deepcopy(base)
    frozen.requires_grad_(False)
    frozen.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    return {"full_finetuning": copy.deepcopy(base), "frozen_floor": frozen}


def train_step(model, batch: dict) -> Callable[[], None]:
    def run():
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate_samples(candidates: dict[str, Callable[[], None]], device: torch.device, rounds: int,
                      warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call of each candidate, the candidates interleaved: sample
    i of every candidate comes from round i."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def alternate_timings(candidates: dict[str, Callable[[], None]], device: torch.device, rounds: int,
                      warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each candidate, the candidates interleaved."""
    samples = alternate_samples(candidates, device, rounds, warmup)
    return {name: statistics.median(s) for name, s in samples.items()}


def paired_ratio(samples: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Median over rounds of numerator / denominator within the same round: a
    slow spell of the machine slows both, so it cancels out of the ratio."""
    return statistics.median(a / b for a, b in zip(samples[numerator], samples[denominator]))


def saved_activation_bytes(forward: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in forward()."""
    return saved_activation_bytes_split(forward, params, [])[0]


def saved_activation_bytes_split(forward: Callable[[], torch.Tensor], params: list[torch.Tensor],
                                 modules: list[torch.nn.Module]) -> tuple[int, int]:
    """(all, modules') bytes of the distinct non-parameter storages autograd
    saves in forward(). A storage counts for `modules` when it was first saved
    while one of them ran: what they add to what the rest keeps anyway (a
    tensor the backbone saved before, saved again inside, is not theirs)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    first_saved: dict[int, tuple[int, bool]] = {}  # storage -> (bytes, first saved inside `modules`)
    depth = [0]

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages and s.data_ptr() not in first_saved:
            first_saved[s.data_ptr()] = (s.nbytes(), depth[0] > 0)
        return t

    hooks = [h for m in modules for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in hooks:
            h.remove()
    return sum(n for n, _ in first_saved.values()), sum(n for n, inside in first_saved.values() if inside)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def peak_resident_bytes() -> int:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries
    ru_maxrss across exec, so a child started from a big parent reports the
    parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
