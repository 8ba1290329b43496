"""AdapterFusion (Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task
Composition for Transfer Learning") over a model's bottleneck adapters, as
the `adapters` library defines it, with its on-disk format both ways."""

from pypeft.methods.fusion.config import FusionConfig
from pypeft.methods.fusion.method import FusionMethod, regularization_loss
from pypeft.registry import register_method

register_method(FusionMethod())

__all__ = ["FusionConfig", "FusionMethod", "regularization_loss"]
