"""ReadConfig: what pypeft.patch(model, method="read", ...) takes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

RNN_TYPES = {"rnn": 1, "gru": 3, "lstm": 4}  # cell -> gates
AGGREGATES = ("mean", "last")


@dataclass
class ReadConfig:
    """Options of pypeft.patch(model, method="read", ...).

    rnn: the recurrent cell, "gru" (torch.nn.GRUCell's), "lstm" or "rnn"
        (tanh Elman).
    hidden: the RNN's hidden size.
    layers: indices into the final stack's layers whose outputs the RNN reads,
        in order (negative counts from the end); None: all of them.
    aggregate: what the joiner reads: the mean of the RNN's states over the
        layers, or the last one.
    modules_to_save: modules trained in full beside it (default: a sequence
        classifier's head).
    """

    rnn: str = "gru"
    hidden: int = 256
    layers: Sequence[int] | None = None
    aggregate: str = "mean"
    modules_to_save: list[str] | None = None
    adapter_name: str = "default"
    method: str = field(default="read", init=False)

    def __post_init__(self):
        where = "pypeft.patch(method='read')"
        if self.rnn not in RNN_TYPES:
            raise ValueError(f"{where}: argument 'rnn': expected one of {sorted(RNN_TYPES)}, got {self.rnn!r}")
        if isinstance(self.hidden, bool) or not isinstance(self.hidden, int) or self.hidden <= 0:
            raise ValueError(f"{where}: argument 'hidden': expected a positive int, got {self.hidden!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"{where}: argument 'aggregate': expected one of {list(AGGREGATES)}, "
                             f"got {self.aggregate!r}")
        if self.layers is not None:
            layers = tuple(self.layers) if not isinstance(self.layers, (str, bytes)) else None
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise ValueError(f"{where}: argument 'layers': expected None or a non-empty sequence of layer "
                                 f"indices, got {self.layers!r}")
            self.layers = layers

    def layer_indices(self, count: int) -> list[int]:
        """The layers' indices in [0, count), checked."""
        if self.layers is None:
            return list(range(count))
        chosen = []
        for i in self.layers:
            if not -count <= i < count:
                raise ValueError(f"pypeft.patch(method='read'): argument 'layers': index {i} is out of range "
                                 f"for a stack of {count} layers (expected -{count} <= index < {count})")
            chosen.append(i % count)
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"pypeft.patch(method='read'): argument 'layers': {list(self.layers)} names a "
                             "layer twice")
        return chosen

    def to_json(self) -> dict:
        return {"rnn": self.rnn, "hidden": self.hidden, "layers": None if self.layers is None else list(self.layers),
                "aggregate": self.aggregate}
