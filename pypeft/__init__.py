"""pypeft: parameter-efficient fine-tuning as native PyTorch ops.

    import pypeft
    layer = pypeft.LoraLinear(nn.Linear(1024, 1024), r=8, alpha=16, dropout=0.1)
    y = pypeft.ops.lora_linear(x, W, b, A, B, scale, dropout_p, seed)
"""

from pypeft import ops
from pypeft.methods.lora import LoraLinear

__all__ = ["LoraLinear", "ops"]
__version__ = "0.1.0"
