"""Modules trained in full beside an adapter (PEFT's modules_to_save), such as
the freshly initialised head of a sequence classifier.

Each adapter gets its own trainable copy; the original stays untouched, so the
base model (pypeft.disabled, pypeft.unpatch) is exactly what it was, and
switching adapters switches heads too.
"""

from __future__ import annotations

import copy

from torch import nn


class TrainableCopies(nn.Module):
    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        for p in original.parameters():
            p.requires_grad_(False)
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        if name in self.copies:
            raise ValueError(f"modules_to_save: adapter {name!r} exists already")
        trainable = copy.deepcopy(self.original_module)
        for p in trainable.parameters():
            p.requires_grad_(True)
        self.copies[name] = trainable

    def delete_adapter(self, name: str) -> None:
        del self.copies[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        name = self.active_adapter
        if self.disabled or name is None or name not in self.copies:
            return self.original_module(*args, **kwargs)
        return self.copies[name](*args, **kwargs)

    def __getattr__(self, name: str):
        # Model code sometimes reads attributes of its head (e.g. `.weight`,
        # `.out_features`): answer for the module currently in use.
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__["_modules"]
            active = self.__dict__.get("active_adapter")
            copies = modules["copies"]
            target = copies[active] if active in copies and not self.__dict__.get("disabled") \
                else modules["original_module"]
            return getattr(target, name)
