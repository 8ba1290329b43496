"""BitFitConfig: what pypeft.patch(model, method="bitfit", ...) takes."""

from __future__ import annotations

from dataclasses import dataclass, field

from pypeft.methods.config_checks import TargetModules, check_common

WHERE = "pypeft.patch(method='bitfit')"


@dataclass
class BitFitConfig:
    """Options of pypeft.patch(model, method="bitfit", ...) (Ben Zaken et al.,
    "BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based
    Masked Language-models", ACL 2022): train bias terms only.

    target_modules: which modules' biases train. None: every module with a
        bias parameter (and, with add_missing_biases, every module with an
        empty bias slot but the output head); a list of module-name suffixes
        (peft's matching: a name equal to the entry or ending with "." + it),
        e.g. ["query", "intermediate.dense"] for the paper's query and
        intermediate biases of BERT; a regular expression the whole name must
        match; or "all-linear" (every linear layer but the output head).
    exclude_modules: the same forms, removed from that selection.
    add_missing_biases: a selected module that has no bias (nn.Linear(bias=
        False), as in Llama) gets a zero-initialised trained bias (peft's
        BEFT does the same). Without it such modules are left out, and an
        entry of target_modules that selects only bias-less modules is
        refused by name.
    modules_to_save: modules trained in full beside the biases (default: a
        sequence classifier's head, "classifier" / "score").
    """

    target_modules: TargetModules = None
    exclude_modules: TargetModules = None
    add_missing_biases: bool = False
    modules_to_save: list[str] | None = field(default=None)
    adapter_name: str = "default"

    method = "bitfit"

    def __post_init__(self):
        check_common(WHERE, self)
        if not isinstance(self.add_missing_biases, bool):
            raise ValueError(f"{WHERE}: argument 'add_missing_biases': expected True or False, "
                             f"got {self.add_missing_biases!r}")
        for argument in ("target_modules", "exclude_modules"):
            value = getattr(self, argument)
            if isinstance(value, (tuple, set)):
                setattr(self, argument, sorted(value) if isinstance(value, set) else list(value))
