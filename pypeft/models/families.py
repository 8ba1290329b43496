"""Per-family conventions of Hugging Face models, keyed by config.model_type.

The LoRA defaults are PEFT's (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING),
so that `pypeft.patch(model, method="lora")` adapts the layers a PEFT user
expects.
"""

from __future__ import annotations

from torch import nn

_LORA_TARGETS: dict[str, list[str]] = {
    # BERT-like encoders
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "layoutlm": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    # GPT-2-like (Conv1D with transposed weights)
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    # Llama-like and OPT-like decoders
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    # encoder-decoders
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
}

# RMSNorms computed as LlamaRMSNorm (float32 normalisation, then weight * x.to(dtype)).
LLAMA_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
# MLPs whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)).
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})

# Task heads that *ForSequenceClassification models add on top of the backbone
# (PEFT's SEQ_CLS_HEAD_NAMES).
_SEQ_CLS_HEADS = ("classifier", "score")


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_lora_targets(model: nn.Module) -> list[str] | None:
    """PEFT's default LoRA target names for this model's family, or None."""
    targets = _LORA_TARGETS.get(model_type(model) or "")
    return list(targets) if targets else None


def task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model class, or None."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForConditionalGeneration") or name.endswith("ForSeq2SeqLM"):
        return "SEQ_2_SEQ_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    return None


def classifier_head_names(model: nn.Module) -> list[str]:
    """Names of the freshly initialised task head of a sequence classifier,
    which stays trainable when the backbone is frozen (as PEFT does for SEQ_CLS)."""
    if task_type(model) != "SEQ_CLS":
        return []
    return [name for name in _SEQ_CLS_HEADS if isinstance(getattr(model, name, None), nn.Module)]


def output_head_names(model: nn.Module) -> set[str]:
    """Module names of the output head(s) that "all-linear" leaves alone: the
    output embeddings of a language model, the classifier of a classifier."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    candidates = [out] if out is not None else []
    candidates += [getattr(model, n) for n in classifier_head_names(model)]
    for name, module in model.named_modules():
        if any(module is c for c in candidates):
            heads.add(name)
            # a head may be a small module of its own (e.g. RoBERTa's classifier)
            heads.update(f"{name}.{sub}" for sub, _ in module.named_modules() if sub)
    return heads
