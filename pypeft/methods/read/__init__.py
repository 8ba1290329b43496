"""READ (Wang, Nguyen et al., arXiv 2305.15348): a small RNN beside a frozen backbone."""

from pypeft.methods.read.config import AGGREGATES, RNN_TYPES, ReadConfig
from pypeft.methods.read.method import ReadMethod
from pypeft.methods.read.network import ReadAdapters, ReadNetwork, ReadRecord
from pypeft.registry import register_method

register_method(ReadMethod())

__all__ = ["AGGREGATES", "RNN_TYPES", "ReadAdapters", "ReadConfig", "ReadMethod", "ReadNetwork", "ReadRecord"]
