"""BitFit (Ben Zaken et al., ACL 2022): train bias terms only, kept beside the originals."""

from pypeft.methods.bitfit.config import BitFitConfig
from pypeft.methods.bitfit.layer import BitFitLayer
from pypeft.methods.bitfit.method import BitFitMethod
from pypeft.registry import register_method

register_method(BitFitMethod())

__all__ = ["BitFitConfig", "BitFitLayer", "BitFitMethod"]
