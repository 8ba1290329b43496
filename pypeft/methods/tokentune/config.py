"""TokenTuneConfig: what pypeft.patch(model, method="tokentune", ...) takes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

Selector = Callable[[torch.Tensor | None, torch.Tensor | None, int], torch.Tensor]


@dataclass
class TokenTuneConfig:
    """Options of pypeft.patch(model, method="tokentune", ...).

    k: tokens per sequence that carry gradients (clamped to the batch's
        sequence length T), or
    fraction: a share of T instead (k = ceil(fraction * T)); give one of them
        (neither: k = 16).
    keep: positions always selected by the random selector, counted among each
        sequence's non-padding tokens (negative from its end); "auto": the
        first token for encoders, the first and the last for decoders.
    selector: "random" (uniform without replacement among non-padding tokens,
        plus `keep`), or a callable (input_ids, attention_mask, k) ->
        LongTensor[batch, k] of distinct positions, which decides alone.
    seed: seeds the random selector's own generator (None: torch's global RNG,
        which data-parallel ranks seeded alike share: every rank then draws
        the same selections). Under torch.distributed, rank r seeds it with
        seed + r, so ranks draw different selections (one process: seed).
    loss_on_selected: with token-level labels ([batch, T]: causal LM,
        token classification), only the selected positions' loss terms count
        (for a causal LM, those predicted *at* a selected position) — the
        paper's setting. Without it, the loss averages over every token and
        only the selected ones send gradients.
    """

    k: int | None = None
    fraction: float | None = None
    keep: str | Sequence[int] = "auto"
    selector: str | Selector = "random"
    seed: int | None = None
    loss_on_selected: bool = False
    method: str = field(default="tokentune", init=False)

    def __post_init__(self):
        where = "pypeft.patch(method='tokentune')"
        if self.k is not None and self.fraction is not None:
            raise ValueError(f"{where}: give one of 'k' and 'fraction', got k={self.k} and fraction={self.fraction}")
        if self.k is None and self.fraction is None:
            self.k = 16
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0):
            raise ValueError(f"{where}: argument 'k': expected a positive int, got {self.k!r}")
        if self.fraction is not None:
            f = self.fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0.0 < f <= 1.0):
                raise ValueError(f"{where}: argument 'fraction': expected a number in (0, 1], got {f!r}")
        if isinstance(self.keep, str):
            if self.keep != "auto":
                raise ValueError(f"{where}: argument 'keep': expected 'auto' or a sequence of ints, got {self.keep!r}")
        else:
            keep = tuple(self.keep)
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in keep):
                raise ValueError(f"{where}: argument 'keep': expected 'auto' or a sequence of ints, got {self.keep!r}")
            self.keep = keep
        if not (self.selector == "random" or callable(self.selector)):
            raise ValueError(f"{where}: argument 'selector': expected 'random' or a callable "
                             f"(input_ids, attention_mask, k) -> LongTensor[batch, k], got {self.selector!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"{where}: argument 'seed': expected an int or None, got {self.seed!r}")

    def tokens_for(self, length: int) -> int:
        """k for a batch of sequence length T."""
        if self.fraction is not None:
            return max(1, min(length, math.ceil(self.fraction * length)))
        return min(self.k, length)
