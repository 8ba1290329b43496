"""Modules trained in full beside an adapter (PEFT's modules_to_save), such as
the freshly initialised head of a sequence classifier.

Each adapter gets its own trainable copy; the original stays untouched, so the
base model (pypeft.disabled, pypeft.unpatch) is exactly what it was, and
switching adapters switches heads too.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed: nothing is sharded (isinstance(x, ()) is False)
    DTensor = ()

from pypeft.layer import BASE, PypeftLayer


def _gather_shards(module: nn.Module) -> None:
    """A copy of a module FSDP2 has sharded (an adapter added to a sharded
    model: pypeft.load_adapter after fully_shard) would hold DTensor shards
    that no FSDP group gathers, and fail in forward; give it full tensors.
    Gathering is a collective: every rank patches alike (as every rank loads).
    The copy is then whole on every rank, outside FSDP's groups."""
    for sub in module.modules():
        for key, p in list(sub._parameters.items()):
            if isinstance(p, DTensor):
                sub._parameters[key] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)


class TrainableCopies(PypeftLayer):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        for p in original.parameters():
            p.requires_grad_(False)
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None

    def add_adapter(self, name: str) -> None:
        if name in self.copies:
            raise ValueError(f"modules_to_save: adapter {name!r} exists already")
        trainable = copy.deepcopy(self.original_module)
        _gather_shards(trainable)
        for p in trainable.parameters():
            p.requires_grad_(True)
        trainable.train(self.training)
        self.copies[name] = trainable

    def adapter_names(self) -> list[str]:
        return list(self.copies)

    def activate(self, name: str | None) -> None:
        self.active_adapter = name
        for adapter, trainable in self.copies.items():
            trainable.requires_grad_(adapter == name)

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        if self.is_disabled():
            return self.original_module(*args, **kwargs)
        names = self.mixed_rows()
        if names is not None:
            return self._mixed_forward(names, *args, **kwargs)
        name = self.active_adapter
        if name is None or name not in self.copies:
            return self.original_module(*args, **kwargs)
        return self.copies[name](*args, **kwargs)

    def _mixed_forward(self, names: list[str], x: torch.Tensor, *args, **kwargs):
        """Each batch row through its adapter's copy. A loop over the adapters
        in the batch, in Python: these are whole modules of any kind (a task
        head, once per model), not the per-layer hot path."""
        if x.dim() < 1 or x.shape[0] != len(names):
            raise ValueError(f"pypeft.mixed_batch: argument 'adapter_names': expected one name per batch row "
                             f"({x.shape[0] if x.dim() else 'no batch dimension'}), got {len(names)}")
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(name if name in self.copies else BASE, []).append(row)
        out = None
        for name, rows in groups.items():
            module = self.original_module if name == BASE else self.copies[name]
            index = torch.tensor(rows, device=x.device)
            y = module(x.index_select(0, index), *args, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out.index_copy_(0, index, y)
        return out

    def __getattr__(self, name: str):
        # Model code sometimes reads attributes of its head (e.g. `.weight`,
        # `.out_features`): answer for the module currently in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__["_modules"]
            active = self.__dict__.get("active_adapter")
            copies = modules["copies"]
            target = copies[active] if active in copies and not self.is_disabled() else modules["original_module"]
            return getattr(target, name)
