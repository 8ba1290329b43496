"""Running a model's per-token modules as TokenTune's token-subset ops.

The modules stay where they are, with their parameters and state-dict keys:
TokenTune swaps their class for a subclass whose forward calls the
token-subset op while the model's TokenSelection is active, and the original
forward otherwise (eval, no_grad, inputs that are not [B, T, ...] of the
selection, e.g. a pooler's [B, H]). unswap() restores the class.

What is swapped: linear layers (nn.Linear, transformers' Conv1D), LayerNorm,
Llama-style RMSNorm, activations, dropout, the gated MLP of Llama-likes
(whose product act(gate) * up would otherwise keep two full tensors), and the
input embedding, whose output gets a gate that cuts unselected tokens'
gradients (where the token-subset region begins). pypeft's adapter layers
(LoRA, VeRA) run their token-subset op themselves (AdaptedLinear).
Modules find the selection under pypeft.layer.TOKENS_ATTR.
"""

from __future__ import annotations

import torch
from torch import nn

from pypeft import ops
from pypeft.models.linear import frozen_operands, is_linear_like
from pypeft.layer import TOKENS_ATTR, underlying
from pypeft.models.families import GATED_MLPS, LLAMA_RMS_NORMS



def _positions(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    return getattr(module, TOKENS_ATTR).positions_for(x)


def _dropout_seed(p: float, x: torch.Tensor) -> torch.Tensor | None:
    return torch.randint(0, 2**62, (), device=x.device) if p > 0.0 else None


def _own_storage(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x, copied when a selection is active and x is a slice of a much larger
    tensor: autograd saves a linear layer's input, and a slice keeps its whole
    storage alive (BERT's pooler reads hidden[:, 0], a view of the final
    hidden state of every token, which TokenTune otherwise does not keep).
    Under torch.compile x is returned as it is: dynamo cannot trace
    UntypedStorage.nbytes (a graph break per call), and the compiled graph's
    partitioner, not autograd, chooses what backward keeps."""
    if (getattr(module, TOKENS_ATTR).positions is None or not torch.is_grad_enabled()
            or torch.compiler.is_compiling()):
        return x
    if x.untyped_storage().nbytes() > 2 * x.numel() * x.element_size():
        return x.contiguous() if not x.is_contiguous() else x.clone()
    return x


class TokenSubsetLinear:
    def forward(self, x):
        pos = _positions(self, x)
        if pos is None:
            return super().forward(_own_storage(self, x))
        weight, bias, base = frozen_operands(self, x)
        return ops.token_subset_linear(x, weight, bias, pos, **base)


class TokenSubsetLayerNorm:
    def forward(self, x):
        pos = _positions(self, x)
        if pos is None or len(self.normalized_shape) != 1:
            return super().forward(x)
        return ops.token_subset_layer_norm(x, self.weight, self.bias, self.eps, pos)


class TokenSubsetRMSNorm:
    def forward(self, x):
        pos = _positions(self, x)
        if pos is None:
            return super().forward(x)
        return ops.token_subset_rms_norm(x, self.weight, self.variance_epsilon, pos)


class TokenSubsetActivation:
    activation_kind = ""

    def forward(self, x):
        pos = _positions(self, x)
        if pos is None:
            return super().forward(x)
        return ops.token_subset_activation(x, self.activation_kind, pos)


class TokenSubsetDropout:
    def forward(self, x):
        pos = _positions(self, x)
        if pos is None or not self.training:
            return super().forward(x)
        return ops.token_subset_dropout(x, self.p, _dropout_seed(self.p, x), pos)


class TokenSubsetGatedMLP:
    """down(act(gate(x)) * up(x)) with the product fused (Llama, Mistral, Qwen2)."""

    def forward(self, x):
        pos = _positions(self, x)
        if pos is None:
            return super().forward(x)
        h = ops.token_subset_gated_activation(self.gate_proj(x), self.up_proj(x), "silu", pos)
        return self.down_proj(h)


class TokenSubsetEmbedding:
    def forward(self, ids):
        out = super().forward(ids)
        pos = _positions(self, out)
        return out if pos is None else ops.token_subset_dropout(out, 0.0, None, pos)




def activation_kind(module: nn.Module) -> str | None:
    """The token_subset_activation kind computing `module`, or None."""
    name = type(module).__name__
    if name == "GELUActivation" or (isinstance(module, nn.GELU) and module.approximate == "none"):
        return "gelu"
    if name in ("NewGELUActivation", "GELUTanh", "FastGELUActivation") or isinstance(module, nn.GELU):
        return "gelu_tanh"
    if name == "SiLUActivation" or isinstance(module, nn.SiLU):
        return "silu"
    if isinstance(module, nn.ReLU):
        return "relu"
    return None


def mixin_for(module: nn.Module) -> type | None:
    """The token-subset forward for a module of the model, or None."""
    if isinstance(module, nn.Embedding):
        return None  # only the input embedding is gated (see swap_input_embedding)
    if is_linear_like(module):
        return TokenSubsetLinear
    if isinstance(underlying(module), nn.LayerNorm):  # a stand-in (BitFit's) runs as its base
        return TokenSubsetLayerNorm
    name = type(module).__name__
    if name in LLAMA_RMS_NORMS:
        return TokenSubsetRMSNorm
    if name in GATED_MLPS and activation_kind(module.act_fn) == "silu":
        return TokenSubsetGatedMLP
    if isinstance(module, nn.Dropout):
        return TokenSubsetDropout
    if activation_kind(module) is not None:
        return TokenSubsetActivation
    return None


_classes: dict[tuple, type] = {}


def _subclass(mixin: type, cls: type, module: nn.Module) -> type:
    """One subclass per (mixin, original class, activation kind), made once."""
    kind = activation_kind(module) if mixin is TokenSubsetActivation else None
    key = (mixin, cls, kind)
    if key not in _classes:
        attrs = {"__module__": __name__, "_pypeft_original_class": cls}
        if kind is not None:
            attrs["activation_kind"] = kind
        _classes[key] = type(f"TokenSubset{cls.__name__}", (mixin, cls), attrs)
    return _classes[key]


def swap(module: nn.Module, mixin: type, selection) -> None:
    module.__class__ = _subclass(mixin, type(module), module)
    setattr(module, TOKENS_ATTR, selection)


def unswap(module: nn.Module) -> None:
    module.__class__ = module._pypeft_original_class
    module.__dict__.pop(TOKENS_ATTR, None)


def is_swapped(module: nn.Module) -> bool:
    return hasattr(type(module), "_pypeft_original_class")
