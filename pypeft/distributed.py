"""Saving an adapter from a data-parallel job (DDP, FSDP2).

    pypeft.distributed.save_adapter(model, "out/")   # on EVERY rank

Under DistributedDataParallel every rank holds the whole adapter, so rank 0
could save alone; under FSDP2 (torch.distributed.fsdp.fully_shard) each rank
holds a shard of every parameter (a DTensor), and gathering the full tensors
is a collective every rank must join. This helper does both the same way:
every rank calls it; FSDP2 modules are unsharded (all-gathered) and the
adapter's tensors gathered on every rank, rank 0 writes the adapter in its method's format (peft's for peft's methods) with
pypeft.save_adapter, the modules are resharded, and every rank waits at a
barrier until the files are there (so a rank may load them right after).

Loading needs no helper: every rank calls pypeft.load_adapter on the same
directory (before fully_shard, or after it for inference: the adapter a
sharded model loads is then a full copy on every rank, outside FSDP's groups).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist
from torch import nn

from pypeft.io import write_atomically, adapter_files, save_adapter as _save_adapter


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2: nothing is sharded by it
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def save_adapter(model: nn.Module, directory: str | os.PathLike, adapter_name: str | None = None,
                 rank: int = 0) -> Path:
    """Every rank calls it; rank `rank` writes (as pypeft.save_adapter), the
    others wait. Without an initialised process group it is pypeft.save_adapter."""
    if not (dist.is_available() and dist.is_initialized()):
        return _save_adapter(model, directory, adapter_name)
    sharded = _fsdp_modules(model)
    for module in sharded:
        module.unshard()  # a collective: every rank gathers the full parameters
    try:
        # every rank: state_dict() of a sharded module gives DTensors, gathered together
        path, files = adapter_files(model, directory, adapter_name, gather=True)
        if dist.get_rank() == rank:
            write_atomically(path, files)
    finally:
        for module in sharded:
            module.reshard()
        dist.barrier()
    return Path(directory)
