"""What pypeft knows about model families: default targets, heads, linear-like layers."""

from pypeft.models.families import (
    classifier_head_names,
    default_lora_targets,
    model_type,
    output_head_names,
    task_type,
)
from pypeft.models.linear import LinearLike, is_linear_like, linear_dims

__all__ = [
    "LinearLike",
    "classifier_head_names",
    "default_lora_targets",
    "is_linear_like",
    "linear_dims",
    "model_type",
    "output_head_names",
    "task_type",
]
