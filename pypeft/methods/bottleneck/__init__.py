"""Bottleneck adapters (Houlsby et al. 2019, Pfeiffer et al. 2020, He et al.
2021's parallel form) as the `adapters` library (AdapterHub) defines them,
with its on-disk format both ways."""

from pypeft.methods.bottleneck.config import BottleneckConfig
from pypeft.methods.bottleneck.method import BottleneckMethod
from pypeft.methods.bottleneck.site import BottleneckSite
from pypeft.registry import register_method

register_method(BottleneckMethod())

__all__ = ["BottleneckConfig", "BottleneckMethod", "BottleneckSite"]
