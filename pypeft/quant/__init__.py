"""Quantised storage of frozen base weights (QLoRA's NF4), bit-exact with
bitsandbytes and in its checkpoint layout.

    pypeft.quantize(model, "nf4")                      # in place; before or after pypeft.patch
    layer = pypeft.quant.NF4Linear.from_linear(linear)
    model = pypeft.quant.from_pretrained(AutoModelForCausalLM, path)   # quantised as it loads
"""

from pypeft.quant.bnb_format import FormatError
from pypeft.quant.hf_config import quantization_config
from pypeft.quant.loading import from_config, from_pretrained
from pypeft.quant.nf4_linear import NF4Linear
from pypeft.quant.quantize_model import quantize

__all__ = ["FormatError", "NF4Linear", "from_config", "from_pretrained", "quantization_config", "quantize"]
