"""TokenTune (Simoulin et al., EMNLP 2024): backpropagate through k tokens per sequence."""

from pypeft.methods.tokentune.config import TokenTuneConfig
from pypeft.methods.tokentune.method import TokenTuneMethod, TokenTuneRecord
from pypeft.methods.tokentune.selection import TokenSelection, is_decoder
from pypeft.registry import register_method

register_method(TokenTuneMethod())

__all__ = ["TokenSelection", "TokenTuneConfig", "TokenTuneMethod", "TokenTuneRecord", "is_decoder"]
