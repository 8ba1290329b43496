"""Where each transformer layer's two sublayers (attention, feed-forward) end:
the seam for methods that act on a sublayer's output before the residual
connection (bottleneck adapters, AdapterFusion), as the `adapters` library
places them.

For every layer and sublayer a SublayerExit names
- `output`: the module whose output is the sublayer's output h (after its
  dropout, where the family has one there), before the residual add;
- `residual`: the module, and which argument of it, that receives the
  residual stream x the block adds h to;
- `norm`: in post-LN families (BERT, RoBERTa, DistilBERT) the LayerNorm the
  block applies to h + x; None in pre-LN ones (GPT-2, Llama-likes), whose
  block adds h + x and normalises later.

The block then computes norm(h + x) (post-LN) or h + x (pre-LN); a method
that changes h at `output` changes exactly that. Families are told apart by
structure, per layer, so renamed wrappers of the same layout work too.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from pypeft.models.layer_stacks import LayerStack, layer_stacks

ATTENTION, FEED_FORWARD = "attention", "feed_forward"


@dataclass(frozen=True)
class SublayerExit:
    layer: int                 # index of the layer in its stack
    sublayer: str              # ATTENTION or FEED_FORWARD
    layer_name: str            # module name of the transformer layer
    output: str                # module whose output is h
    residual: str              # module receiving x ...
    residual_arg: int          # ... as this positional argument
    residual_kwarg: str        # ... or under this keyword
    norm: str | None           # post-LN: the LayerNorm of h + x
    library_module: str        # where the `adapters` library keeps this exit's adapters (their keys' prefix)


def _has(module: nn.Module, *paths: str) -> bool:
    for path in paths:
        try:
            module.get_submodule(path)
        except AttributeError:
            return False
    return True


def _exits_of(layer: nn.Module, name: str, index: int) -> tuple[SublayerExit, SublayerExit] | None:
    def at(path: str) -> str:
        return f"{name}.{path}"

    def pair(attn_out, attn_res, attn_arg, attn_kw, attn_norm, ffn_out, ffn_res, ffn_arg, ffn_kw, ffn_norm,
             library=("attention_adapters", "output_adapters")):
        return (SublayerExit(index, ATTENTION, name, at(attn_out), at(attn_res) if attn_res else name, attn_arg,
                             attn_kw, attn_norm and at(attn_norm), at(library[0])),
                SublayerExit(index, FEED_FORWARD, name, at(ffn_out), at(ffn_res) if ffn_res else name, ffn_arg,
                             ffn_kw, ffn_norm and at(ffn_norm), at(library[1])))

    # BERT, RoBERTa, ELECTRA, XLM-R, ...: XxxSelfOutput / XxxOutput(hidden_states, input_tensor) run
    # dense -> dropout -> LayerNorm(h + input_tensor).
    if _has(layer, "attention.output.dropout", "attention.output.LayerNorm", "output.dropout", "output.LayerNorm"):
        return pair("attention.output.dropout", "attention.output", 1, "input_tensor", "attention.output.LayerNorm",
                    "output.dropout", "output", 1, "input_tensor", "output.LayerNorm",
                    library=("attention.output", "output"))
    # DistilBERT: the block adds and norms: sa_layer_norm(attention(x) + x), output_layer_norm(ffn(y) + y).
    if _has(layer, "attention.out_lin", "sa_layer_norm", "ffn.dropout", "output_layer_norm"):
        return pair("attention.out_lin", "", 0, "hidden_states", "sa_layer_norm",
                    "ffn.dropout", "ffn", 0, "input", "output_layer_norm")
    # GPT-2: x + attn(ln_1(x)) with attn ending in resid_dropout; y + mlp(ln_2(y)) ending in dropout.
    if _has(layer, "ln_1", "attn.resid_dropout", "ln_2", "mlp.dropout"):
        return pair("attn.resid_dropout", "ln_1", 0, "input", None, "mlp.dropout", "ln_2", 0, "input", None)
    # Llama, Mistral, Qwen2, ...: x + self_attn(input_layernorm(x)) ending in o_proj;
    # y + mlp(post_attention_layernorm(y)) ending in down_proj.
    if _has(layer, "input_layernorm", "self_attn.o_proj", "post_attention_layernorm", "mlp.down_proj"):
        return pair("self_attn.o_proj", "input_layernorm", 0, "hidden_states", None,
                    "mlp.down_proj", "post_attention_layernorm", 0, "hidden_states", None)
    return None


def sublayer_exits(model: nn.Module) -> tuple[LayerStack, list[tuple[SublayerExit, SublayerExit]]]:
    """(the stack, per layer its (attention, feed-forward) exits) of the
    model's one stack of transformer layers; ValueError when pypeft does not
    know where this family's sublayers end."""
    stacks = layer_stacks(model)
    if len(stacks) != 1:
        raise ValueError(f"{type(model).__name__} has {len(stacks)} stacks of transformer layers; bottleneck "
                         "adapters support encoder-only and decoder-only models (one stack)")
    stack = stacks[0]
    prefix = f"{stack.name}.{stack.layers_name}" if stack.name else stack.layers_name
    exits = []
    for i, layer in enumerate(stack.layers):
        found = _exits_of(layer, f"{prefix}.{i}", i)
        if found is None:
            raise ValueError(f"pypeft does not know where the sublayers of {type(layer).__name__} "
                             f"({type(model).__name__}) end; supported layouts: BERT/RoBERTa-like, DistilBERT, "
                             "GPT-2 and Llama-like layers")
        exits.append(found)
    return stack, exits
