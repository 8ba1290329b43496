"""PromptAdapters: the prompt and P-tuning adapters of one model, a
PypeftLayer that attach() adds as a child of the top-level model
(`model.pypeft_prompts`), so that parameters(), state_dict(), to() and
optimisers see the prompts; detach() removes it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pypeft.layer import BASE, PypeftLayer

ATTR = "pypeft_prompts"


@dataclass
class PromptSpec:
    """What the call rewriting needs to know of one adapter."""

    method: str                # "prompt_tuning" or "p_tuning"
    num_virtual_tokens: int
    submodules: int            # peft's num_transformer_submodules (2 for encoder-decoders)


class PromptAdapters(PypeftLayer):
    def __init__(self):
        super().__init__()
        self.encoders = nn.ModuleDict()
        self.specs: dict[str, PromptSpec] = {}
        self.active_adapter: str | None = None

    # --- the lifecycle pypeft.patch expects of its layers -----------------------------------
    def add_adapter(self, name: str, encoder: nn.Module, spec: PromptSpec) -> None:
        encoder.train(self.training)
        self.encoders[name] = encoder
        self.specs[name] = spec

    def adapter_names(self) -> list[str]:
        return list(self.encoders)

    def activate(self, name: str | None) -> None:
        self.active_adapter = name
        for adapter, encoder in self.encoders.items():
            encoder.requires_grad_(adapter == name)

    def delete_adapter(self, name: str) -> None:
        del self.encoders[name]
        del self.specs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    # --- what a forward reads ---------------------------------------------------------------
    def may_run(self) -> bool:
        """Whether some row of this thread's calls may get prompts (cheap: no batch needed)."""
        if self.is_disabled():
            return False
        rows = self.mixed_rows()
        if rows is not None:
            return any(r in self.encoders for r in rows)
        return self.active_adapter in self.encoders

    def row_adapters(self, batch: int) -> list[str | None] | None:
        """Per batch row, the prompt adapter whose virtual tokens go in front
        (None: none for that row), in this thread; None: no row has any. A
        mixed batch names each row's adapter (rows of other methods' adapters
        and "base" rows get none); otherwise every row has the active one."""
        if self.is_disabled():
            return None
        rows = self.mixed_rows()
        if rows is not None:
            if len(rows) != batch:
                raise ValueError(f"pypeft.mixed_batch: argument 'adapter_names': expected one name per batch row "
                                 f"({batch}), got {len(rows)}")
            names = [r if r in self.encoders else None for r in rows]
            return names if any(n is not None for n in names) else None
        name = self.active_adapter
        return [name] * batch if name in self.encoders and name != BASE else None

    def prompts(self, name: str) -> torch.Tensor:
        """[num_virtual_tokens * submodules, token_dim]: every virtual token's embedding."""
        return self.encoders[name]()
