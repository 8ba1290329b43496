"""What autograd saves for backward, as DESIGN.md measures activation memory:
the tensors packed by torch.autograd.graph.saved_tensors_hooks during a
forward, and the bytes of their distinct storages with the parameters' (and
views of them) left out. The one helper every test uses for this."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch


@dataclass
class Saved:
    """The tensors packed while the `saved()` block ran, in packing order."""

    tensors: list = field(default_factory=list)
    exclude: set = field(default_factory=set)  # storage pointers left out: parameters

    def activations(self) -> list:
        """The saved tensors whose storage is not a parameter's."""
        return [t for t in self.tensors if t.untyped_storage().data_ptr() not in self.exclude]

    def storages(self) -> dict:
        """{storage pointer: bytes} of the distinct non-parameter storages."""
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.activations()}

    @property
    def nbytes(self) -> int:
        return sum(self.storages().values())

    def shapes(self) -> list:
        return [tuple(t.shape) for t in self.activations()]


def storage_ptrs(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors if t is not None}


@contextlib.contextmanager
def saved(exclude=()):
    """with saved(exclude=params) as s: forward ...  then s.nbytes, s.activations(), ...

    exclude: tensors (parameters, e.g. model.parameters()) whose storages are
    not counted; anything sharing their storage is left out too."""
    record = Saved(exclude=storage_ptrs(exclude))

    def pack(t):
        record.tensors.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield record
