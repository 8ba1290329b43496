"""VeRA (Kopiczko et al., ICLR 2024): two trained vectors per layer over shared random matrices, in PEFT's format."""

from pypeft.methods.vera.config import VeraConfig
from pypeft.methods.vera.layer import VeraLinear, VeraProjections, generate_projections
from pypeft.methods.vera.method import VeraMethod, projections_of
from pypeft.registry import register_method

register_method(VeraMethod())

__all__ = ["VeraConfig", "VeraLinear", "VeraMethod", "VeraProjections", "generate_projections", "projections_of"]
