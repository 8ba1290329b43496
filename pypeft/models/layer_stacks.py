"""Where a transformer's layer stacks live: the module that runs a list of
identical layers and returns the stack's final hidden state (after its final
norm, when it has one).

READ needs both: the layers, whose outputs feed its RNN, and the stack, whose
output gets the correction. The rule is structural, so it covers the families
without a table: a stack is the parent of an nn.ModuleList of two or more
modules of one class that own parameters. BERT/RoBERTa: `bert.encoder` (its
output is the last layer's, already normed; the pooler runs after it); GPT-2:
`transformer` (ends with ln_f); Llama-likes: `model` (ends with norm); T5:
`encoder` and `decoder` (each ends with final_layer_norm and dropout).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerStack:
    name: str                # module name of the stack ("" for the model itself)
    module: nn.Module
    layers_name: str         # attribute of the stack holding the layers ("layer", "h", "layers", "block")
    layers: nn.ModuleList


def _is_layer_list(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList):
        return False
    children = list(module)
    return (len(children) >= 2
            and len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()))


def layer_stacks(model: nn.Module) -> list[LayerStack]:
    """Every stack of `model`, outermost first (a stack inside a layer of
    another stack is not one: e.g. a ModuleList inside an attention module)."""
    found: list[LayerStack] = []
    for name, module in model.named_modules():
        if not _is_layer_list(module):
            continue
        parent_name, _, attr = name.rpartition(".")
        if any(parent_name == s.name or parent_name.startswith(f"{s.name}.{s.layers_name}.") or
               (s.name == "" and parent_name.startswith(f"{s.layers_name}.")) for s in found):
            continue
        found.append(LayerStack(parent_name, model.get_submodule(parent_name), attr, module))
    return found


def final_stack(model: nn.Module) -> tuple[LayerStack, list[LayerStack]]:
    """(the stack whose output feeds the model's head, the other stacks).

    In an encoder–decoder the decoder's output feeds the head, so a correction
    there needs no backward through either frozen stack."""
    stacks = layer_stacks(model)
    if not stacks:
        raise ValueError(f"{type(model).__name__} has no stack of transformer layers (an nn.ModuleList of "
                         "identical layers) that pypeft can find")
    decoders = [s for s in stacks if "decoder" in s.name.rsplit(".", 1)[-1]]
    final = decoders[-1] if decoders and len(stacks) > 1 else stacks[-1]
    return final, [s for s in stacks if s is not final]
