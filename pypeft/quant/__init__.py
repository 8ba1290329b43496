"""Quantised storage of frozen base weights (QLoRA's NF4), bit-exact with
bitsandbytes and in its checkpoint layout.

    pypeft.quantize(model, "nf4")                      # in place; before or after pypeft.patch
    layer = pypeft.quant.NF4Linear.from_linear(linear)
    model = pypeft.quant.from_pretrained(AutoModelForCausalLM, path)   # quantised as it loads
"""

from pypeft.quant.bnb_format import FormatError
from pypeft.quant.nf4_linear import NF4Linear

__all__ = ["FormatError", "NF4Linear"]
