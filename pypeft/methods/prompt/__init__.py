"""Prompt tuning (Lester et al. 2021) and P-tuning (Liu et al. 2021): trainable
virtual tokens in front of the input embeddings, with peft's math and format."""

from pypeft.methods.prompt.config import PTuningConfig, PromptTuningConfig
from pypeft.methods.prompt.ensemble import prompt_ensemble
from pypeft.methods.prompt.encoders import PromptEmbedding, PromptEncoder, ScanLSTM
from pypeft.methods.prompt.layer import PromptAdapters
from pypeft.methods.prompt.method import PromptTuningMethod, PTuningMethod
from pypeft.registry import register_method

register_method(PromptTuningMethod())
register_method(PTuningMethod())

__all__ = ["PTuningConfig", "PromptAdapters", "PromptEmbedding", "PromptEncoder", "PromptTuningConfig",
           "ScanLSTM", "prompt_ensemble"]
