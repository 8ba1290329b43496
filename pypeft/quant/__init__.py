"""Quantised storage of frozen base weights (QLoRA's NF4), bit-exact with
bitsandbytes and in its checkpoint layout.

    pypeft.quantize(model, "nf4")                      # in place; before or after pypeft.patch
    layer = pypeft.quant.NF4Linear.from_linear(linear)
    model = pypeft.quant.from_pretrained(AutoModelForCausalLM, path)   # quantised as it loads, or a bnb
                                                                       # NF4 checkpoint as stored
    model = pypeft.quant.from_config(LlamaForCausalLM, config)         # random weights, quantised as built
    model.save_pretrained(path)          # bitsandbytes' layout: transformers + bitsandbytes load it

Files: nf4_linear.py (the layer), bnb_format.py (bnb's state_dict layout),
targets.py (which layers), quantize_model.py (quantize()), hf_config.py
(config.quantization_config), loading.py (from_pretrained, from_config).
"""

from pypeft.quant.bnb_format import FormatError
from pypeft.quant.hf_config import quantization_config
from pypeft.quant.loading import from_config, from_pretrained
from pypeft.quant.nf4_linear import NF4Linear
from pypeft.quant.quantize_model import quantize

__all__ = ["FormatError", "NF4Linear", "from_config", "from_pretrained", "quantization_config", "quantize"]
